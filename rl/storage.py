"""Where a run's files live: a local or NFS folder, or any URI `pyarrow.fs` opens (s3://, gs://, hdfs://).

Every process writes on its own node's disk first (a scratch folder) and then uploads its own files; an object
store never sees a half-written file (one PUT per file). A checkpoint is complete when its manifest exists: the
manifest is uploaded last and lists every file with its size, so a checkpoint whose upload was cut is never picked
up, and pruning only ever deletes checkpoints older than the newest complete one.

    store = open_storage("s3://bucket/runs?endpoint_override=host:9000&scheme=http")   # StorageError names `storage`
    store.upload(Path("scratch/run/metrics.jsonl"), "run/metrics.jsonl")
    commit(store, "run/checkpoints/step_000010", files)                                 # the manifest, last
    complete_checkpoints(store, "run/checkpoints")                                      # oldest first
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MANIFEST = "manifest.json"
SECRET_PARAMS = {"access_key", "secret_key", "session_token"}


class StorageError(ValueError):
    """The storage setting cannot be used: one line naming `storage`."""


def public_uri(uri: str) -> str:
    """The URI with credentials in its query (access_key=, secret_key=, session_token=) or user info blanked out."""
    parts = urlsplit(uri)
    if not parts.scheme or len(parts.scheme) == 1:
        return uri
    query = urlencode([(k, "<redacted>" if k in SECRET_PARAMS else v) for k, v in parse_qsl(parts.query)], safe=":/<>")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _has_s3_credentials(uri: str) -> bool:
    query = dict(parse_qsl(urlsplit(uri).query))
    if "access_key" in query or query.get("anonymous", "").lower() == "true":
        return True
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    cred_file = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", str(Path.home() / ".aws" / "credentials"))
    return bool(os.environ.get("AWS_PROFILE") or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")
                or os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or Path(cred_file).is_file())


def _stream(src_fs, src: str, dst_fs, dst: str, dst_local: bool) -> None:
    """Copy one file in chunks (never whole in memory): an object store shows the upload only once it is complete;
    a local file is written aside and renamed into place (core.atomic.atomic_file)."""
    from pyarrow.fs import copy_files

    if not dst_local:
        copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return
    from core.atomic import atomic_file

    with atomic_file(dst) as tmp:
        copy_files(src, str(tmp), source_filesystem=src_fs, destination_filesystem=dst_fs)


@dataclass
class Storage:
    """A run store: `fs` (a pyarrow FileSystem) rooted at `root`; `local` when it is this machine's disk."""
    uri: str
    fs: object
    root: str
    local: bool

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}".rstrip("/") if rel else self.root

    def exists(self, rel: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.path(rel)).type != FileType.NotFound

    def size(self, rel: str) -> int | None:
        from pyarrow.fs import FileType

        info = self.fs.get_file_info(self.path(rel))
        return info.size if info.type == FileType.File else None

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object (remote) or an atomic rename (local): readers never see half of it."""
        if self.local:
            from core.atomic import atomic_write_bytes

            atomic_write_bytes(self.path(rel), data)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def upload(self, local: Path, rel: str) -> list[tuple[str, int]]:
        """Copy a file or a folder from this node's disk to `rel`; returns (relative path, size) of every file."""
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        from pyarrow.fs import LocalFileSystem

        out = []
        for f in files:
            dest = rel if f == local else f"{rel}/{f.relative_to(local).as_posix()}"
            _stream(LocalFileSystem(), str(f), self.fs, self.path(dest), self.local)
            out.append((dest, f.stat().st_size))
        return out

    def download(self, rel: str, local: Path) -> None:
        """Copy the file or folder `rel` to `local` on this node (each file streamed and renamed into place)."""
        from pyarrow.fs import FileSelector, FileType, LocalFileSystem

        base, here = self.path(rel), LocalFileSystem()
        if self.fs.get_file_info(base).type == FileType.File:
            _stream(self.fs, base, here, str(local), True)
            return
        for entry in self.fs.get_file_info(FileSelector(base, recursive=True)):
            if entry.type == FileType.File:
                _stream(self.fs, entry.path, here, str(Path(local) / entry.path[len(base.rstrip("/")) + 1:]), True)

    def listdir(self, rel: str) -> list[str]:
        from pyarrow.fs import FileSelector

        sel = FileSelector(self.path(rel), allow_not_found=True)
        return sorted(Path(e.path).name for e in self.fs.get_file_info(sel))

    def delete(self, rel: str) -> None:
        from pyarrow.fs import FileType

        info = self.fs.get_file_info(self.path(rel))
        if info.type == FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == FileType.File:
            self.fs.delete_file(self.path(rel))


def open_storage(uri: str, probe: bool = True) -> Storage:
    """Open a run store; a bad URI, an unreachable store or missing credentials is one StorageError line."""
    import pyarrow.fs as pafs

    shown = public_uri(uri)
    if "://" not in uri:
        if not Path(uri).is_absolute():
            raise StorageError(f"storage: {uri} is relative; give an absolute path (shared by every node) or a URI")
        Path(uri).mkdir(parents=True, exist_ok=True)
        return Storage(uri, pafs.LocalFileSystem(), str(Path(uri)), local=True)
    if urlsplit(uri).scheme == "s3" and not _has_s3_credentials(uri):
        raise StorageError(f"storage: no credentials for {shown} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           f"AWS_PROFILE, or anonymous=true)")
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as e:
        raise StorageError(f"storage: cannot open {shown} ({str(e).splitlines()[0][:200]})") from None
    store = Storage(uri, fs, root, local=isinstance(fs, pafs.LocalFileSystem))
    if probe:
        try:
            fs.create_dir(root)
            store.write_bytes(".nextscale-probe", b"ok")
            store.delete(".nextscale-probe")
        except OSError as e:
            raise StorageError(f"storage: cannot write to {shown} ({str(e).splitlines()[0][:200]})") from None
    return store


# ------------------------------------------------------------------------------------------------ checkpoints
def commit(store: Storage, ckpt: str, files: list[tuple[str, int]]) -> None:
    """Write the manifest of checkpoint folder `ckpt` last: (path relative to `ckpt`, size) of every file in it."""
    rel = [(p[len(ckpt) + 1:] if p.startswith(ckpt + "/") else p, n) for p, n in files]
    store.write_bytes(f"{ckpt}/{MANIFEST}", json.dumps({"files": dict(sorted(rel))}, indent=1).encode())


def is_complete(store: Storage, ckpt: str) -> bool:
    """The manifest exists and every file it lists is there with its size."""
    try:
        files = json.loads(store.read_bytes(f"{ckpt}/{MANIFEST}"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(store.size(f"{ckpt}/{name}") == size for name, size in files.items())


def complete_checkpoints(store: Storage, root: str) -> list[str]:
    """Complete `step_*` checkpoints under `root`, oldest first (relative paths)."""
    return [f"{root}/{n}" for n in store.listdir(root) if n.startswith("step_") and is_complete(store, f"{root}/{n}")]


def prune(store: Storage, root: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and older incomplete leftovers."""
    done = complete_checkpoints(store, root)
    if not done:
        return
    kept = set(done[-keep:])
    oldest_kept = min(kept)
    for name in store.listdir(root):
        path = f"{root}/{name}"
        if name.startswith("step_") and path not in kept and path < oldest_kept:
            store.delete(path)
