"""The reward service: a Ray Serve deployment that holds a CombinedReward and batches requests.

Two doors to the same batch queue (`serve.batch`: up to max_batch_size requests, waiting up to
batch_wait_timeout_s, merged into one call of the rewards per image size):
  - `handle.score.remote(Batch)` from the driver (rewards/client.py), answering Scored JSON or {"error": ...};
  - HTTP on host:port + route_prefix (127.0.0.1 by default): POST the wire JSON (rewards/wire.py) -> 200 scores,
    400 bad payload, 408 body not received within body_timeout_s, 413 too large, 500 {"error": "reward 'name': cause"}; GET -> metrics.
"""
from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from rewards.base import Batch, RewardError, resolve
from rewards.combine import CombinedReward, score_many
from rewards.config import RewardsConfig
from rewards.wire import PayloadError, parse_request

SERVE_LOGGER = "ray.serve"  # the driver-side logger of Serve (its own stderr handler, does not propagate)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length") or "0"
    if not declared.isdigit() or int(declared) > limit:  # a malformed length never gets this far through uvicorn
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


@serve.deployment
class RewardService:
    def __init__(self, cfg: dict):
        self.cfg = RewardsConfig.model_validate(cfg)
        self.reward = CombinedReward(self.cfg.rewards)
        self._batched.set_max_batch_size(self.cfg.service.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.service.batch_wait_timeout_s)

    @serve.batch
    async def _batched(self, batches: list[Batch]) -> list[dict]:
        try:
            scored = await asyncio.to_thread(score_many, self.reward, batches)
        except RewardError as e:
            return [{"error": str(e)}] * len(batches)
        return [s.to_json() for s in scored]

    async def score(self, batch: Batch) -> dict:
        return await self._batched(batch)

    def metrics(self) -> dict:
        return self.reward.metrics.summary()

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(self.metrics())
        if request.method != "POST":
            return error(405, f"{request.method} not allowed; POST a batch or GET metrics")
        svc = self.cfg.service
        try:  # a client that stops sending (or trickles) its body must not hold a request slot for ever
            body = await asyncio.wait_for(read_body(request, svc.max_request_bytes), svc.body_timeout_s)
        except asyncio.TimeoutError:
            return error(408, f"request body not received within body_timeout_s={svc.body_timeout_s:g}")
        if body is None:
            return error(413, f"request larger than max_request_bytes={svc.max_request_bytes}")
        try:
            batch = parse_request(body)
        except PayloadError as e:
            return error(400, f"bad payload: {e}")
        out = await self._batched(batch)
        return JSONResponse(out, status_code=500 if "error" in out else 200)


def quiet_driver_logs(verbose: bool) -> None:
    """Serve's INFO lines in this process (`ray.serve` logger: started, deploying, ready) show only if `verbose`.

    The replicas' per-request access log and the controller's and proxy's lines are written to Ray's log files
    (RAY_TMP/session_latest/logs/serve/); they reach the terminal only when Ray streams worker output to the
    driver (`ray.init(log_to_driver=True)`, which rl/driver.py sets from `logging.verbose`).
    """
    logging.getLogger(SERVE_LOGGER).setLevel(logging.INFO if verbose else logging.WARNING)


def check_rewards(cfg: RewardsConfig) -> None:
    """Every reward can be found (entry point or import path); else one line naming it, before anything starts."""
    for e in cfg.rewards:
        resolve(e.name)


def start_service(cfg: RewardsConfig, verbose: bool = False) -> DeploymentHandle:
    """Deploy the service on the connected Ray cluster; fails fast here if a reward cannot be found."""
    check_rewards(cfg)
    svc = cfg.service
    quiet_driver_logs(verbose)
    serve.start(http_options={"host": svc.host, "port": svc.port})
    app = RewardService.options(
        num_replicas=svc.replicas, max_ongoing_requests=svc.ongoing_requests,
        graceful_shutdown_wait_loop_s=0.2,  # a replica leaves 0.2 s after its last request ends (Serve's default: 2 s)
        ray_actor_options={"num_cpus": svc.num_cpus, "num_gpus": svc.num_gpus, "runtime_env": svc.runtime_env},
    ).bind(cfg.model_dump())
    return serve.run(app, name=svc.name, route_prefix=svc.route_prefix)
