"""A run's files on its storage: what the driver and the learner ranks upload, and what a resume downloads.

With `storage` unset (or an absolute local / NFS path) the run directory *is* the storage and nothing moves: the
checkpoints are the atomic folders of rl/checkpoint.py. With a URI (s3://, gs://, hdfs://) every process writes to
its node's scratch folder (RUN under `runs_dir`) and uploads its own files under `<storage>/<name>/`, with the same
layout as a local run directory:

    checkpoints/step_XXXXXX/learner/...     each learner rank uploads the files it wrote (own_files)
    checkpoints/step_XXXXXX/driver_state.json, manifest.json     the driver, manifest last (rl/storage.py)
    metrics.jsonl, eval_curve.jsonl, config.yaml, eval_*/, rollouts/, grids/, final_policy/, summary.json

A resume on an empty disk downloads the run files and the newest complete checkpoint's driver state; each learner
rank downloads the learner files it needs into its own scratch folder.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from core.atomic import atomic_write_text
from rl.storage import Storage, commit, complete_checkpoints, open_storage, prune

RUN_FILES = ("config.yaml", "metrics.jsonl", "eval_curve.jsonl", "eval_before")  # what a resume needs back
_RANK_FILE = re.compile(r"_pp_rank_(\d+)_")  # DeepSpeed's per-rank shards: zero_pp_rank_R_mp_rank_00_*.pt


CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "HADOOP_", "ARROW_")


def credential_env() -> dict[str, str]:
    """The storage settings of this process's environment (AWS_*, GOOGLE_*, ...), for the learner ranks that upload;
    they travel in the actors' runtime_env, never into a file of the run."""
    return {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_PREFIXES)}


def needed(name: str, rank: int) -> bool:
    """Whether learner rank `rank` needs the checkpoint file `name` to load (the shared files and its shards)."""
    m = _RANK_FILE.search(name)
    return m is None or int(m.group(1)) == rank


def own_files(folder: Path, rank: int) -> list[Path]:
    """The files of a DeepSpeed checkpoint folder that `rank` uploads: its own `*_pp_rank_R_*` shards; rank 0 also
    the shared ones (model states, the `latest` tag)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return [f for f in files if needed(f.name, rank) and (rank == 0 or _RANK_FILE.search(f.name))]


def upload_rank_files(uri: str, folder: Path, rel: str, rank: int) -> list[tuple[str, int]]:
    """Run on a learner rank: upload the files it wrote under `folder` to `rel`; (path, size) of each."""
    store, out = open_storage(uri, probe=False), []
    for f in own_files(folder, rank):
        out += store.upload(f, f"{rel}/{f.relative_to(folder).as_posix()}")
    return out


def download_rank_files(uri: str, ckpt: str, sub: str, folder: Path, rank: int) -> None:
    """Run on a learner rank: fetch the files of `ckpt/sub` it needs (from the manifest) into `folder`."""
    store = open_storage(uri, probe=False)
    files = json.loads(store.read_bytes(f"{ckpt}/manifest.json"))["files"]
    for name in files:
        if name.startswith(sub + "/") and needed(Path(name).name, rank):
            store.download(f"{ckpt}/{name}", Path(folder) / name[len(sub) + 1:])


def trim_eval_curve(path: Path, step: int) -> None:
    """On resume, drop the held-out evaluations a dead driver logged after the checkpoint it resumes from."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


class RunStore:
    """The driver's side: `remote` is None when the run directory is the storage itself."""

    def __init__(self, run_dir: Path, name: str, storage: str | None):
        self.run_dir, self.name = Path(run_dir), name
        self.remote: Storage | None = None
        if storage and "://" in storage:
            self.remote = open_storage(storage)
            self.uri = storage

    def rel(self, path: str = "") -> str:
        return f"{self.name}/{path}".rstrip("/")

    def push(self, *paths: str) -> None:
        """Upload run files or folders (relative to the run directory) that exist locally."""
        if self.remote is None:
            return
        for p in paths:
            if (self.run_dir / p).exists():
                self.remote.upload(self.run_dir / p, self.rel(p))

    def fetch_missing(self, *paths: str) -> None:
        """Download run files or folders this node does not have (written by a task on another node)."""
        for p in paths:
            if self.remote is not None and not (self.run_dir / p).exists() and self.remote.exists(self.rel(p)):
                self.remote.download(self.rel(p), self.run_dir / p)

    def latest_checkpoint(self) -> str | None:
        """The newest complete remote checkpoint (relative to the storage root), or None."""
        if self.remote is None:
            return None
        done = complete_checkpoints(self.remote, self.rel("checkpoints"))
        return done[-1] if done else None

    def restore(self) -> dict | None:
        """Download the run files and the newest complete checkpoint's driver state; None if there is none."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return None
        for p in RUN_FILES:
            if self.remote.exists(self.rel(p)):
                self.remote.download(self.rel(p), self.run_dir / p)
        return json.loads(self.remote.read_bytes(f"{ckpt}/driver_state.json"))

    def commit_checkpoint(self, step: int, state: dict, learner_files: list[tuple[str, int]], keep: int) -> str:
        """After the ranks uploaded their files: the driver state and run files, then the manifest, then pruning."""
        ckpt = self.rel(f"checkpoints/step_{step:06d}")
        data = json.dumps(state, indent=1).encode()
        self.remote.write_bytes(f"{ckpt}/driver_state.json", data)
        self.push(*RUN_FILES)
        commit(self.remote, ckpt, [*learner_files, (f"{ckpt}/driver_state.json", len(data))])
        prune(self.remote, self.rel("checkpoints"), keep)
        return ckpt
