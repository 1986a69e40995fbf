"""A weight broadcast group outside the learners' own torch.distributed world: learner rank 0 (rank 0 here) and the
rollout workers (ranks 1..n), gloo on CPUs, NCCL on GPUs, as OpenRLHF and verl sync weights.

A group is a `ProcessGroupGloo`/`ProcessGroupNCCL` built directly on its own TCPStore, so it coexists with the
learner's DeepSpeed group in the same process and can be rebuilt whenever the workers change. The root sends to
each worker point to point (not a relay tree): a worker that dies mid-broadcast fails only its own send, and the
others get theirs. The state travels as one flat buffer per dtype; the layout (names, shapes, dtypes) is agreed
on beforehand, so what arrives is bit for bit what was sent.
"""
from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype name) in send order


def free_port() -> int:
    """A TCP port free on this node right now: the rendezvous of a process group whose rank 0 runs here."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def state_layout(state: dict[str, torch.Tensor]) -> Layout:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sorted(state.items())]


def flatten_state(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """{dtype name: one contiguous 1-D buffer of that dtype's tensors in layout order}."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, shape, dtype in layout:
        t = state[name]
        if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"weights: {name} is {tuple(t.shape)} {t.dtype}, the layout says {shape} {dtype}")
        parts.setdefault(dtype, []).append(t.detach().reshape(-1))
    return {dtype: torch.cat(ts) for dtype, ts in parts.items()}


def unflatten_state(buffers: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    out, offset = {}, dict.fromkeys(buffers, 0)
    for name, shape, dtype in layout:
        n = int(torch.Size(shape).numel())
        out[name] = buffers[dtype][offset[dtype]: offset[dtype] + n].view(shape)
        offset[dtype] += n
    return out


def buffer_sizes(layout: Layout) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for _, shape, dtype in layout:
        sizes[dtype] = sizes.get(dtype, 0) + int(torch.Size(shape).numel())
    return sizes


def open_group(addr: str, port: int, world: int, rank: int, timeout_s: float, backend: str = "gloo"):
    """Rank `rank` of a new `world`-sized group whose store rank 0 serves at addr:port (every rank calls this at
    about the same time). Returns the process group."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def send_state(group, state: dict[str, torch.Tensor], layout: Layout, ranks: list[int]) -> list[int]:
    """Root: send the flat buffers to each of `ranks`; returns the ranks whose send failed (a dead worker)."""
    buffers, works, failed = flatten_state(state, layout), {}, []
    for r in ranks:              # all sends posted before any wait: the transfers overlap
        try:
            works[r] = [group.send([buf], r, 0) for _, buf in sorted(buffers.items())]
        except RuntimeError:     # gloo: "Connection closed by peer"
            failed.append(r)
    for r, ws in works.items():
        try:
            for w in ws:
                w.wait()
        except RuntimeError:
            failed.append(r)
    return sorted(failed)


def recv_state(group, layout: Layout, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A worker: receive the root's buffers into fresh tensors of the layout."""
    buffers = {}
    for dtype, n in sorted(buffer_sizes(layout).items()):
        buf = torch.empty(n, dtype=getattr(torch, dtype), device=device)
        group.recv([buf], 0, 0).wait()
        buffers[dtype] = buf
    return unflatten_state(buffers, layout)
