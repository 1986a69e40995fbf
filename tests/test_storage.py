"""rl/storage.py against a real S3-compatible server on loopback (moto) and a local folder."""
import json

import pytest

from rl.storage import (
    MANIFEST, StorageError, commit, complete_checkpoints, is_complete, open_storage, prune, public_uri,
)
from tests.s3server import bucket_uri, credentials_env, s3_server


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as ep:
        yield ep


@pytest.fixture(params=["s3", "local"])
def store(request, endpoint, tmp_path, monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    return open_storage(bucket_uri(endpoint, "nextscale-test", f"t-{tmp_path.name}"))


def _tree(root, files):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_upload_and_download_a_folder(store, tmp_path):
    files = {"learner/latest": b"learner", "learner/learner/mp_rank_00_model_states.pt": b"x" * 1000,
             "driver_state.json": b"{}"}
    _tree(tmp_path / "src", files)
    listed = store.upload(tmp_path / "src", "run/ck")
    assert sorted(listed) == sorted((f"run/ck/{k}", len(v)) for k, v in files.items())
    store.download("run/ck", tmp_path / "dst")
    assert {p.relative_to(tmp_path / "dst").as_posix(): p.read_bytes()
            for p in (tmp_path / "dst").rglob("*") if p.is_file()} == files


def _checkpoint(store, tmp_path, step, manifest=True):
    src = tmp_path / f"s{step}"
    _tree(src, {"learner/w.pt": bytes([step]) * 64, "driver_state.json": b"{}"})
    ckpt = f"run/checkpoints/step_{step:06d}"
    files = store.upload(src, ckpt)
    if manifest:
        commit(store, ckpt, files)
    return ckpt


def test_a_checkpoint_is_complete_only_with_its_manifest_and_every_file(store, tmp_path):
    a = _checkpoint(store, tmp_path, 1)
    b = _checkpoint(store, tmp_path, 2, manifest=False)  # upload cut before the manifest
    assert is_complete(store, a) and not is_complete(store, b)
    assert complete_checkpoints(store, "run/checkpoints") == [a]
    c = _checkpoint(store, tmp_path, 3)
    store.delete(f"{c}/learner/w.pt")  # a manifest naming a file that is not there
    assert complete_checkpoints(store, "run/checkpoints") == [a]
    assert json.loads(store.read_bytes(f"{a}/{MANIFEST}"))["files"] == {"driver_state.json": 2, "learner/w.pt": 64}


def test_prune_never_deletes_the_newest_complete_checkpoint(store, tmp_path):
    ckpts = [_checkpoint(store, tmp_path, s) for s in (1, 2, 3)]
    cut = _checkpoint(store, tmp_path, 4, manifest=False)
    prune(store, "run/checkpoints", keep=1)
    assert complete_checkpoints(store, "run/checkpoints") == [ckpts[-1]]
    assert store.exists(cut)  # a newer upload in progress is left alone
    prune(store, "run/checkpoints", keep=1)
    assert complete_checkpoints(store, "run/checkpoints") == [ckpts[-1]]


def test_bad_settings_are_one_line_naming_storage(endpoint, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    cases = ["runs/relative", bucket_uri(endpoint, "nextscale-test"), "nosuchscheme://bucket/x"]
    for uri in cases:
        with pytest.raises(StorageError) as e:
            open_storage(uri)
        assert str(e.value).startswith("storage: ") and "\n" not in str(e.value)
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageError, match="^storage: cannot write"):
        open_storage("s3://nextscale-test/x?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1")


def test_public_uri_hides_credentials():
    uri = "s3://b/p?endpoint_override=h:9000&access_key=AKIA123&secret_key=s3cr3t&region=x"
    shown = public_uri(uri)
    assert "AKIA123" not in shown and "s3cr3t" not in shown and "endpoint_override=h:9000" in shown
    assert public_uri("/abs/path") == "/abs/path"
