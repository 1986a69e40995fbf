# Two entry points for a fresh machine: `make demo` and `make test`. Both create (or reuse) ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/shapes-tiny
	$(PY) -m rl train configs/shapes-tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs

# Reproduce the shipped tiny shapes checkpoints (checkpoints/shapes-tiny) from scratch on a local Ray.
.PHONY: checkpoints
checkpoints: $(STAMP)
	$(PY) -m policy.stages.tokenizer configs/stages/shapes-tokenizer.yaml
	$(PY) -m policy.stages.reward_model configs/stages/shapes-clip.yaml
	$(PY) -m policy.stages.pretrain configs/stages/shapes-pretrain.yaml
	$(PY) -m policy.stages.sft configs/stages/shapes-sft.yaml
	$(PY) -m policy.stages.ship --runs runs/stages --out checkpoints/shapes-tiny
