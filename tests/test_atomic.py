"""core/atomic.py: the one atomic-write helper (temp, fsync, rename, fsync of the folder)."""
import pytest

from core import atomic
from core.atomic import atomic_dir, atomic_write_bytes, atomic_write_text, replace_dir


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _siblings(target) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _siblings(target) == ["a.txt"]


@pytest.mark.parametrize("exchange", [True, False])
def test_folder_is_swapped_in_and_the_old_one_removed_last(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "policy"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
        (tmp / "extra").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["extra", "w.bin"]
    assert (out / "w.bin").read_bytes() == b"v2"
    assert _siblings(out) == ["policy"]


def test_error_inside_the_block_keeps_the_old_folder(tmp_path):
    out = tmp_path / "policy"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert (out / "w.bin").read_bytes() == b"v1"
    assert _siblings(out) == ["policy"]


def test_exchange_swaps_two_folders_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a"), (b / "f").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available on this system")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_replace_dir_into_an_empty_place(tmp_path):
    tmp = tmp_path / "t"
    tmp.mkdir()
    (tmp / "f").write_text("x")
    replace_dir(tmp, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "x" and not tmp.exists()
