"""A reward for the fault suite: the shapes verifier, slowed down, announcing every call in a folder.

`marker_dir/call-N` (N = 0, 1, ... over the service's life) holds the pid of the replica that is scoring call N,
so a test can SIGKILL the replica while a batch is in flight. Its scores are the verifier's exactly.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from rewards.builtin import VerifierReward


class SlowVerifier(VerifierReward):
    def __init__(self, marker_dir: str, delay_s: float = 1.0, mode: str = "partial"):
        super().__init__(mode)
        self.dir, self.delay_s = Path(marker_dir), delay_s

    def __call__(self, images, prompts, metadata) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".call-{os.getpid()}"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self.dir / f"call-{len(list(self.dir.glob('call-*')))}")
        time.sleep(self.delay_s)
        return super().__call__(images, prompts, metadata)
