"""Resource checks shared by the RL run, the stages and the reward plug-ins (pure: no torch, no Ray)."""
from __future__ import annotations


def gpu_shortfall(asks: dict[str, float], available: float) -> str | None:
    """The one-line error for GPU requests {config field: GPUs it asks for in all} that the cluster cannot hold
    (`available` GPUs), naming the first field that does not fit; None when they all fit. Checked before anything
    starts: Ray would otherwise wait for the resources forever."""
    used = 0.0
    for name, n in asks.items():
        if n <= 0:
            continue
        used += n
        if used > available + 1e-9:
            total = ", ".join(f"{k} {v:g}" for k, v in asks.items() if v > 0)
            return (f"{name}: asks for {n:g} GPU(s) ({total} in all), the cluster has {available:g}"
                    + ("" if available else "; set it to 0 (false) to run on CPUs"))
    return None
