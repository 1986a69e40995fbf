"""Malformed inputs on disk: prompt files, policy directories, safetensors and run checkpoints.

Each is a clear one-line error naming the field or file and the cause; a failed load never leaves a half-loaded
model (the weights are either all the file's or all unchanged).
"""
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from policy.io import Policy, PolicyConfig, build_policy, load_state_strict
from rl.__main__ import main
from rl.config import PromptsConfig
from rl.prompts import load_prompts
from tests.conftest import TINY_POLICY

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ prompt files
def invalid_utf8_strings() -> pa.Array:
    """A string column whose bytes are not UTF-8 (pyarrow writes it without validating)."""
    data, offsets = pa.py_buffer(b"a red circle\xff\xfe\xfd"), pa.array([0, 12, 15], pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, data])


def write_parquet(table):
    return lambda path: pq.write_table(table, path)


def truncated_parquet(path):
    pq.write_table(pa.table({"prompt": ["a red circle"] * 50}), path)
    path.write_bytes(path.read_bytes()[:-40])


PROMPT_FILES = [
    ("zero-bytes", lambda p: p.write_bytes(b""), r"is not a readable Parquet file \(ArrowInvalid: .*size is 0"),
    ("zero-rows", write_parquet(pa.table({"prompt": pa.array([], pa.string())})), r"no prompts in .* \(0 rows\)"),
    ("no-prompt-column", write_parquet(pa.table({"text": ["a red circle"]})), r"has no 'prompt' column"),
    ("garbage-bytes", lambda p: p.write_bytes(b"\xff\xfe\x00\x01" * 64), r"is not a readable Parquet file"),
    ("csv-file", lambda p: p.write_text("prompt\na red circle\n"), r"is not a readable Parquet file"),
    ("truncated-parquet", truncated_parquet, r"is not a readable Parquet file"),
    ("prompt-ints", write_parquet(pa.table({"prompt": [1, 2, 3]})), r"column 'prompt' holds int64, expected str"),
    ("prompt-binary", write_parquet(pa.table({"prompt": [b"\xff\xfe", b"ok"]})), r"holds binary, expected strings"),
    ("prompt-lists", write_parquet(pa.table({"prompt": [["a"], ["b"]]})), r"holds list<"),
    ("prompt-invalid-utf8", write_parquet(pa.table({"prompt": invalid_utf8_strings()})), r"not valid UTF-8"),
    ("prompt-null", write_parquet(pa.table({"prompt": ["a red circle", None]})), r"prompt at row 1 is null"),
    ("prompt-empty-string", write_parquet(pa.table({"prompt": ["a red circle", ""]})), r"empty prompt at row 1"),
    ("prompt-whitespace", write_parquet(pa.table({"prompt": [" \t\n"]})), r"empty prompt at row 0"),
]


@pytest.mark.parametrize("make, cause", [c[1:] for c in PROMPT_FILES], ids=[c[0] for c in PROMPT_FILES])
def test_bad_prompt_file_is_one_line_naming_prompts_path(tmp_path, make, cause):
    path = tmp_path / "prompts.parquet"
    make(path)
    with pytest.raises(ValueError) as e:
        load_prompts(PromptsConfig(path=str(path)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prompts.path: "), msg
    assert re.search(cause, msg), msg


@pytest.mark.parametrize("case", ["zero-bytes", "prompt-empty-string"])
def test_bad_prompt_file_stops_the_run_before_anything_starts(tmp_path, capsys, case):
    import ray

    from tests.reliability.test_bad_configs import base

    make = next(c[1] for c in PROMPT_FILES if c[0] == case)
    make(tmp_path / "prompts.parquet")
    cfg = {**base(tmp_path / "runs"), "prompts": {"path": str(tmp_path / "prompts.parquet")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith("config error: prompts.path: "), line
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


# ------------------------------------------------------------------------------------------ policy directories
@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    build_policy(PolicyConfig(seed=3, **TINY_POLICY)).save(root / "p")
    return root / "p"


def truncate(rel, keep=0.5):
    def f(d):
        data = (d / rel).read_bytes()
        (d / rel).write_bytes(data[: int(len(data) * keep)])
    return f


def write(rel, data: bytes):
    return lambda d: (d / rel).write_bytes(data)


def edit_state(rel, fn):
    def f(d):
        state = load_file(d / rel)
        fn(state)
        save_file(state, d / rel)
    return f


def first_matrix(state) -> str:
    return next(k for k, v in state.items() if v.ndim == 2)


def edit_json(rel, fn):
    def f(d):
        data = json.loads((d / rel).read_text())
        (d / rel).write_text(json.dumps(fn(data)))
    return f


W, V = "transformer/model.safetensors", "vq/model.safetensors"
BAD_POLICIES = [
    ("weights-truncated", truncate(W), W, "not a readable safetensors file"),
    ("weights-truncated-to-header", truncate(W, 0.001), W, "not a readable safetensors file"),
    ("weights-zero-bytes", write(W, b""), W, "not a readable safetensors file"),
    ("weights-garbage", write(W, bytes(range(256)) * 40), W, "not a readable safetensors file"),
    ("weights-huge-header", write(W, (1 << 60).to_bytes(8, "little") + b"{}"), W, "not a readable safetensors"),
    ("weights-missing", lambda d: (d / W).unlink(), W, "weights file not found"),
    ("tensor-missing", edit_state(W, lambda s: s.pop(first_matrix(s))), W, "weights do not match the model (missing"),
    ("tensor-unexpected", edit_state(W, lambda s: s.update(extra=torch.zeros(2))), W, "unexpected ['extra']"),
    ("tensor-wrong-shape", edit_state(W, lambda s: s.update({first_matrix(s): torch.zeros(3, 5)})), W,
     "has shape (3, 5), model expects"),
    ("tensor-wrong-dtype", edit_state(W, lambda s: s.update({k: v.long() for k, v in s.items() if v.ndim == 2})), W,
     "has dtype torch.int64, model expects torch.float32"),
    ("vq-weights-truncated", truncate(V), V, "not a readable safetensors file"),
    ("vq-tensor-wrong-shape", edit_state(V, lambda s: s.update({first_matrix(s): torch.zeros(1, 1)})), V, "has shape"),
    ("config-not-json", write("transformer/config.json", b"{'schedule': [[1, 1]],"), "transformer/config.json",
     "not a readable JSON config (JSONDecodeError"),
    ("config-not-utf8", write("transformer/config.json", b"\xff\xfe{}"), "transformer/config.json",
     "not a readable JSON config (UnicodeDecodeError"),
    ("config-a-list", write("transformer/config.json", b"[1, 2]"), "transformer/config.json", "expected a JSON object"),
    ("config-unknown-field", edit_json("transformer/config.json", lambda c: {**c, "layers": 3}),
     "transformer/config.json", "layers: Extra inputs"),
    ("config-bad-schedule", edit_json("vq/config.json", lambda c: {**c, "schedule": [[2, 2]]}), "vq/config.json",
     "schedule: "),
    ("config-missing", lambda d: (d / "vq/config.json").unlink(), "vq/config.json", "config file not found"),
    ("tokenizer-garbage", write("text_tokenizer/tokenizer.json", b"\x00garbage"), "text_tokenizer",
     "not a readable tokenizer"),
]


@pytest.mark.parametrize("damage, rel, cause", [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES])
def test_damaged_policy_directory_is_one_line_naming_the_file(saved_policy, tmp_path, damage, rel, cause):
    d = tmp_path / "p"
    shutil.copytree(saved_policy, d)
    damage(d)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        Policy.load(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(d / rel)) and cause in msg, msg


def test_missing_policy_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^policy.path: .* is not a policy directory$"):
        Policy.load(tmp_path / "nope")


@pytest.mark.parametrize("damage", [c[1] for c in BAD_POLICIES if c[2] == W], ids=[c[0] for c in BAD_POLICIES
                                                                                  if c[2] == W])
def test_failed_load_leaves_the_model_unchanged_and_a_good_one_loads_fully(saved_policy, tmp_path, damage):
    other = build_policy(PolicyConfig(seed=11, **TINY_POLICY)).model  # different weights, same architecture
    before = {k: v.clone() for k, v in other.state_dict().items()}
    d = tmp_path / "p"
    shutil.copytree(saved_policy, d)
    damage(d)
    with pytest.raises((ValueError, FileNotFoundError)):
        load_state_strict(other, d / W, ignore_missing={"lm_head.weight"})
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # not one tensor touched
    load_state_strict(other, saved_policy / W, ignore_missing={"lm_head.weight"})
    good = load_file(saved_policy / W)
    after = other.state_dict()
    assert all(torch.equal(after[k], v) for k, v in good.items())  # every tensor of the file, not some


# ------------------------------------------------------------------------------------------- run checkpoints
@pytest.fixture(scope="module")
def learner_ckpt(saved_policy, tmp_path_factory):
    """A learner checkpoint folder in DeepSpeed's layout (latest -> tag/mp_rank_00_model_states.pt) and the state
    it must match."""
    from policy.weights import trainable_state

    model = Policy.load(saved_policy).model
    expected = trainable_state(model)
    root = tmp_path_factory.mktemp("ckpt") / "step_000002"
    (root / "learner" / "learner").mkdir(parents=True)
    (root / "learner" / "latest").write_text("learner")
    torch.save({"module": {f"model.{k}": v for k, v in expected.items()}, "global_steps": 2},
               root / "learner" / "learner" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"state": {}}}, root / "learner" / "learner" / "optim_states.pt")
    (root / "driver_state.json").write_text(json.dumps({"step": 2, "cursor": 6, "version": 2}))
    return root, expected


class NotAWeight:  # a pickled object that weights_only loading must refuse to build
    pass


STATES = "learner/learner/mp_rank_00_model_states.pt"
BAD_LEARNER = [
    ("states-truncated", truncate(STATES), STATES, "truncated or not a torch checkpoint"),
    ("states-garbage", write(STATES, b"\x80\x04garbage" * 100), STATES, "truncated or not a torch checkpoint"),
    ("optimizer-truncated", truncate("learner/learner/optim_states.pt", 0.7), "learner/learner/optim_states.pt",
     "truncated or not a torch checkpoint"),
    ("states-missing", lambda d: (d / STATES).unlink(), STATES, "model states missing"),
    ("tag-missing", lambda d: (d / "learner/latest").unlink(), "learner/latest", "unreadable checkpoint tag"),
    ("tag-escapes", write("learner/latest", b"../../etc"), "learner/latest", "bad checkpoint tag"),
    ("states-pickled-object", lambda d: torch.save({"module": NotAWeight()}, d / STATES), STATES,
     "unreadable model states (UnpicklingError"),
    ("states-no-module", lambda d: torch.save({"modules": {}}, d / STATES), STATES, "no 'module' state dict"),
    ("states-tensor-missing", lambda d: torch.save({"module": {}}, d / STATES), STATES, "missing tensor"),
]


@pytest.mark.parametrize("damage, rel, cause", [c[1:] for c in BAD_LEARNER], ids=[c[0] for c in BAD_LEARNER])
def test_damaged_learner_checkpoint_is_one_line_naming_the_file(learner_ckpt, tmp_path, damage, rel, cause):
    from rl.checkpoint import check_learner_checkpoint

    src, expected = learner_ckpt
    d = tmp_path / src.name
    shutil.copytree(src, d)
    assert check_learner_checkpoint(d / "learner", expected) == d / STATES  # intact before
    damage(d)
    with pytest.raises(ValueError) as e:
        check_learner_checkpoint(d / "learner", expected)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(d / rel)) and cause in msg, msg


def test_learner_checkpoint_of_another_model_is_refused(learner_ckpt):
    from policy.weights import trainable_state
    from rl.checkpoint import check_learner_checkpoint

    src, _ = learner_ckpt
    bigger = build_policy(PolicyConfig(seed=3, vq=TINY_POLICY["vq"], backbone={**TINY_POLICY["backbone"],
                                                                              "hidden_size": 48})).model
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt: tensor .* has shape .*, the model expects"):
        check_learner_checkpoint(src / "learner", trainable_state(bigger))


@pytest.mark.parametrize("text", ["", "{not json", "\udcff", "[1, 2]"])
def test_unreadable_driver_state_names_the_checkpoint(learner_ckpt, tmp_path, text):
    from rl.checkpoint import latest_checkpoint, load_state

    src, _ = learner_ckpt
    run = tmp_path / "run"
    shutil.copytree(src, run / "checkpoints" / src.name)
    state = run / "checkpoints" / src.name / "driver_state.json"
    state.write_bytes(text.encode("utf-8", "surrogateescape"))
    ckpt = latest_checkpoint(run)
    assert ckpt == state.parent
    with pytest.raises(ValueError) as e:
        load_state(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg and "driver state" in msg, msg
