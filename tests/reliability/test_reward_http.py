"""The reward service over real HTTP on loopback (one Serve app for the whole module, the cheap verifier reward).

Bad payloads get a 4xx with a message and the service keeps answering 200 afterwards; slow-loris clients (headers
and then a trickle, or nothing) are cut off after `service.body_timeout_s` with 408 while others are served; and a
load run: 5,000 requests (RELIABILITY_LONG=1; 2,000 in CI) from 32 keep-alive clients, 0 errors, p50/p99 latency and throughput written to
benchmarks/results/reward_load.{json,md}.
"""
import http.client
import json
import os
import platform
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rewards.config import RewardsConfig
from rewards.wire import batch_to_json
from tests.conftest import free_port
from tests.reliability.test_wire_fuzz import BAD_BODIES
from tests.test_rewards import make_batch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("RELIABILITY_LONG") == "1"
BODY_TIMEOUT_S = 6.0  # short for the slow-loris tests, long enough for a real body on 2 busy cores
LIMIT = 200_000


@pytest.fixture(scope="module")
def service():
    import ray
    from ray import serve

    from rewards.service import start_service

    cfg = RewardsConfig.model_validate({
        "rewards": [{"name": "verifier", "weight": 1.0, "kwargs": {"mode": "partial"}}],
        "service": {"num_cpus": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.005, "max_ongoing_requests": 64,
                    "port": free_port(), "max_request_bytes": LIMIT, "body_timeout_s": BODY_TIMEOUT_S},
    })
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        start_service(cfg)
        yield cfg
    finally:
        serve.shutdown()
        ray.shutdown()


GOOD = json.dumps(batch_to_json(make_batch(1))).encode()  # one 64x64 image: the smallest valid batch


def post(cfg, body: bytes, method="POST", headers=None, timeout=30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", cfg.service.port, timeout=timeout)
    try:
        conn.request(method, cfg.service.route_prefix, body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def assert_serving(cfg):
    status, body = post(cfg, GOOD)
    assert status == 200 and len(body["score"]) == 1, (status, body)


def test_good_request_is_scored(service):
    assert_serving(service)


def test_service_listens_on_loopback_only(service):
    """The default host is 127.0.0.1: the port is closed on the machine's other addresses."""
    import ray

    ip = ray.util.get_node_ip_address()
    if ip.startswith("127."):
        pytest.skip("this machine has no non-loopback address")
    with pytest.raises(OSError):
        socket.create_connection((ip, service.service.port), timeout=5).close()
    assert_serving(service)


def chunked(parts):
    yield from parts


EXTRA = [
    ("oversized-declared", b"x" * (LIMIT + 1), 413, "request larger than max_request_bytes=200000", {}),
    ("oversized-chunked", chunked([b"x" * 50_000] * 5), 413, "request larger than max_request_bytes", {}),
    ("wrong-method", b"", 405, "PUT not allowed", {"method": "PUT"}),
    ("metadata-without-spec", json.dumps({**json.loads(GOOD), "metadata": [{}]}).encode(), 500,
     "reward 'verifier': raised ValueError: metadata 0 has no 'spec'", {}),
]


@pytest.mark.parametrize("body, status, message, kw",
                         [(b, 400, f"bad payload: {m}", {}) for _, b, m in BAD_BODIES] + [c[1:] for c in EXTRA],
                         ids=[c[0] for c in BAD_BODIES] + [c[0] for c in EXTRA])
def test_bad_payload_is_4xx_with_a_message_and_the_service_keeps_serving(service, body, status, message, kw):
    if isinstance(body, bytes) and len(body) > LIMIT and status == 400:
        status, message = 413, "request larger than max_request_bytes"  # (the deeply nested JSON is large too)
    got, answer = post(service, body, kw.get("method", "POST"))
    assert got == status and answer["error"].startswith(message) and "\n" not in answer["error"], (got, answer)
    assert_serving(service)


# ------------------------------------------------------------------------------------------------ slow loris
def slow_client(cfg, declared: int, first: bytes, trickle_every_s: float | None, out: dict, key):
    """Send the headers and `first` bytes of a `declared`-byte body, then one byte per trickle_every_s (or
    nothing); record the HTTP status the server answers with and when."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", cfg.service.port), timeout=30) as s:
        s.sendall(f"POST {cfg.service.route_prefix} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {declared}\r\n\r\n".encode() + first)
        s.settimeout(trickle_every_s or 30)
        answer = b""
        while b"\r\n" not in answer and time.perf_counter() - t0 < 30:
            try:
                data = s.recv(4096)
            except socket.timeout:
                try:
                    s.sendall(b" ")  # the trickle: one more byte of the body
                except OSError:
                    break
                continue
            if not data:
                break
            answer += data
    out[key] = (answer.split(b"\r\n")[0].decode(errors="replace"), time.perf_counter() - t0, answer)


@pytest.mark.parametrize("trickle", [None, 0.2], ids=["stalled", "trickle"])
def test_slow_body_times_out_with_408_while_others_are_served(service, trickle):
    out: dict = {}
    threads = [threading.Thread(target=slow_client, args=(service, 5000, b'{"images": [', trickle, out, i))
               for i in range(3)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    served = 0
    while time.perf_counter() - t0 < BODY_TIMEOUT_S * 0.75:  # meanwhile others are answered at once
        t = time.perf_counter()
        assert_serving(service)
        assert time.perf_counter() - t < BODY_TIMEOUT_S / 2
        served += 1
    for t in threads:
        t.join(60)
    print(f"slow clients: {[(s, round(dt, 2)) for s, dt, _ in out.values()]}; served meanwhile: {served}")
    for status, elapsed, raw in out.values():
        assert status.startswith("HTTP/1.1 408"), raw[:300]
        assert BODY_TIMEOUT_S * 0.9 <= elapsed < BODY_TIMEOUT_S + 10
    assert served >= 3
    assert_serving(service)


def test_many_stalled_clients_do_not_starve_the_service(service):
    """More stalled bodies than the replica takes at once (max_ongoing_requests=64): all get 408, and good
    requests are answered meanwhile or as soon as the stalled ones are cut off."""
    out: dict = {}
    threads = [threading.Thread(target=slow_client, args=(service, 10_000, b"{", None, out, i)) for i in range(80)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t = time.perf_counter()
    assert_serving(service)
    waited = time.perf_counter() - t
    for th in threads:
        th.join(60)
    statuses = sorted({s for s, _, _ in out.values()})
    print(f"80 stalled clients -> {statuses}; a good request waited {waited:.2f} s")
    assert len(out) == 80 and statuses == ["HTTP/1.1 408 Request Timeout"]
    assert waited < BODY_TIMEOUT_S + 5
    assert_serving(service)


# ------------------------------------------------------------------------------------------------------ load
def test_load_many_requests_from_32_clients_no_errors(service):
    """2,000 requests in CI (about a minute on 2 busy cores); RELIABILITY_LONG=1: 5,000, written to
    benchmarks/results/reward_load.{json,md} (runs of 5,000 or more only); RELIABILITY_LOAD_REQUESTS=N: N."""
    n = int(os.environ.get("RELIABILITY_LOAD_REQUESTS", 5_000 if LONG else 2_000))
    clients = 32
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", service.service.port, timeout=60)
        mine, bad = [], []
        for _ in range(k):
            t = time.perf_counter()
            try:
                conn.request("POST", service.service.route_prefix, GOOD, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or len(json.loads(data)["score"]) != 1:
                    bad.append(f"HTTP {resp.status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                bad.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", service.service.port, timeout=60)
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    assert_serving(service)  # warm
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [n // clients + (i < n % clients) for i in range(clients)]))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100)
    result = {"requests": len(lat), "clients": clients, "images_per_request": 1, "errors": len(errors),
              "p50_ms": round(1000 * q[49], 1), "p99_ms": round(1000 * q[98], 1), "max_ms": round(1000 * lat[-1], 1),
              "throughput_rps": round(len(lat) / wall, 1), "wall_s": round(wall, 1),
              "reward": "verifier", "replicas": 1, "max_batch_size": service.service.max_batch_size,
              "transport": "HTTP/1.1 keep-alive on 127.0.0.1 (http.client, one thread per client)",
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
              "load_average_1m": round(os.getloadavg()[0], 1)}  # other jobs share these cores
    print("reward service load:", json.dumps(result))
    assert len(lat) == n and not errors, errors[:5]
    if n < 5_000:  # the published figures are the 5,000-request run (RELIABILITY_LONG=1)
        return
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_load.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "reward_load.md").write_text(
        "| requests | clients | errors | p50 ms | p99 ms | throughput req/s | wall s |\n|---|---|---|---|---|---|---|\n"
        f"| {result['requests']} | {clients} | {result['errors']} | {result['p50_ms']} | {result['p99_ms']} | "
        f"{result['throughput_rps']} | {result['wall_s']} |\n")
