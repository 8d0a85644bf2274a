"""`frugal bench compare --peer trl --stage sft|rm|grpo|dpo`: one workload, and the runners that do it
in frugal-rlhf and in TRL (bench/compare.py starts each run in a process of its own).

Same model, same rows, same lengths, batch size, LoRA rank and targets, dtype and thread count;
the first step of every run is warm-up and excluded.

The rows are built so both tools do the same work per step whatever their truncation and
padding rules: every conversation is cut to the same token count, below `max_length`, so no
row is truncated and a batch has (almost) no padding. Rates are samples (SFT) or pairs (reward
model) per second of optimizer step, data loading excluded on both sides.

GRPO (`--stage grpo`): TRL 1.16 has GRPOTrainer and no PPO trainer. Each step samples
GROUP completions for each of batch_size / GROUP prompts, scores them with a reward model (a
fresh one on the same base: its cost, not its scores, is measured), computes log-probs under
the reference (KL weight 0.04 on both sides, so both run the reference forward) and takes one
optimizer step. Every completion is `new_tokens` long on both sides (TRL: min_new_tokens, or
vLLM's min_tokens; ours: no stop token), so both do the same work; rates are completions per
second of the whole step. Ours samples with any rollout engine (`engine`); TRL's side, with or
without vLLM, is bench/trl_grpo.py. With `--reward math` the prompts are `frugal recipe math`'s
two-digit additions and both sides score completions with the same plain function (our lenient
math reward), no reward model.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from ..config import PPOConfig, PreferenceConfig, RewardConfig, SFTConfig
from ..data.formats import load_dataset_file
from ..data.math_problems import generate
from ..device import compute_dtype, peak_memory_bytes
from ..models.loading import load_model, resolve_spec
from ..trainers.ppo import PPOTrainer
from ..trainers.preference import PreferenceTrainer
from ..trainers.reward import RewardTrainer
from ..trainers.supervised import SFTTrainer
from .common import fresh_reward_model
from .trl_grpo import GROUP, KL_WEIGHT, LR
from .workloads import train_bench


def equal_length_rows(tokenizer, n: int, length: int, prompt_tokens: int = 0) -> list[dict]:
    """n (prompt, answer, worse answer) triples from ShareGPT whose chat-formatted text is
    `length` tokens or within a couple of tokens of it: the prompt is cut to 32 tokens, the
    answers fill the rest. With `prompt_tokens`, the prompt is a conversation of about that
    many tokens (the question, the start of its answer, a request to say it again) and the
    answers fill the rest: the shape of multi-turn preference data such as HH-RLHF."""
    def cut(text, k):
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:k])

    def templated(prompt, answer):
        # The rendered text's tokens (apply_chat_template(tokenize=True) returns a dict in
        # transformers 5, whose len() is its number of keys: an earlier version counted 2).
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit(prompt, text, k):
        # Decoding k tokens and encoding them again in the chat template can give more tokens
        # (other merges at the cut, the template's own tokens): cut until the templated row,
        # as every tool tokenizes it, is at most `length` (TRL drops longer rows; we'd truncate).
        answer = cut(text, k)
        while (over := templated(prompt, answer) - length) > 0:
            k -= over
            if k <= 0:
                raise ValueError(f"a prompt alone exceeds {length} tokens: raise --max-length")
            answer = cut(text, k)
        return answer

    out = []
    for row in load_dataset_file("sharegpt", "sft", limit=n * 8):
        msgs = row["messages"]
        k = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if k is None or len(tokenizer(msgs[k]["content"])["input_ids"]) < length:
            continue
        prompt = [{"role": "user", "content": cut(msgs[k - 1]["content"], 32)}]
        if prompt_tokens:
            again = [{"role": "user", "content": "Say that again in your own words."}]
            context = cut(msgs[k]["content"], prompt_tokens - templated(prompt + [{"role": "assistant", "content": ""}]
                                                                        + again, ""))
            prompt += [{"role": "assistant", "content": context}] + again
        room = length - templated(prompt, "")
        answer = fit(prompt, msgs[k]["content"], room)
        worse = fit(prompt, " ".join(reversed(msgs[k]["content"].split())), room)  # same words, no sense
        out.append({"prompt": prompt, "chosen": answer, "rejected": worse})
        if len(out) == n:
            return out
    raise ValueError(f"sharegpt: only {len(out)} conversations have answers of {length}+ tokens, {n} needed")


def _write_rows(rows, tmp: Path) -> Path:
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_rows(n: int) -> list[dict]:
    """n two-digit addition problems (the math recipe's level 2), prompts as one user message."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in generate(n, level=2, seed=0, split="train")]


def _frugal(stage, model, rows_file, steps, batch_size, max_length, lora_rank, dtype, new_tokens,
            reward="rm", gradient_checkpointing=False, engine="torch", rollout_quant="f16") -> list[float]:
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "grpo":
            return _frugal_grpo(model, rows, steps, batch_size, lora_rank, dtype, new_tokens, Path(tmp), reward,
                                gradient_checkpointing, engine, rollout_quant)
        # The run writes into a directory of its own: the SFT rows file beside it would make
        # the run-safety check refuse the directory as holding another run.
        common = dict(model=model, output=str(Path(tmp) / "run"), max_steps=steps, batch_size=batch_size,
                      max_length=max_length, lora_rank=lora_rank, save_every=0, eval_every=0, eval_split=0, dtype=dtype,
                      gradient_checkpointing=gradient_checkpointing)
        if stage == "sft":
            sft = Path(tmp) / "sft.jsonl"
            sft.write_text("".join(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]})
                                   + "\n" for r in rows))
            _, metrics = train_bench("sft", SFTConfig(data=str(sft), **common), SFTTrainer, "tokens_per_s")
        elif stage == "dpo":
            pairs = [{**r, "margin": None} for r in rows]
            _, metrics = train_bench("dpo", PreferenceConfig(loss="dpo", beta=0.1, **common),
                                      lambda s, c: PreferenceTrainer(s, c, rows=pairs), "tokens_per_s")
        else:
            pairs = [{**r, "margin": None} for r in rows]
            _, metrics = train_bench("rm", RewardConfig(**common), lambda s, c: RewardTrainer(s, c, rows=pairs),
                                      "tokens_per_s")
    # Samples (SFT) or pairs (RM, DPO: two sequences each) per second of step, loading excluded.
    per_item = 1 if stage == "sft" else 2
    return [m["tokens_per_s"] * m["sequences"] / m["tokens"] / per_item for m in metrics]


def _frugal_grpo(model, rows, steps, batch_size, lora_rank, dtype, new_tokens, tmp: Path, reward="rm",
                 gradient_checkpointing=False, engine="torch", rollout_quant="f16") -> list[float]:
    prompts = tmp / "prompts.jsonl"
    if reward == "math":
        prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
        scoring = {"reward": ["math"]}
    else:
        prompts.write_text("".join(json.dumps({"messages": r["prompt"]}) + "\n" for r in rows))
        scoring = {"reward_model": fresh_reward_model(model, lora_rank, dtype, tmp / "rm")}
    cfg = PPOConfig(model=model, **scoring, prompts=str(prompts), output=str(tmp / "grpo"), max_steps=steps, advantage="group",
                    group_size=GROUP, rollout_batch_size=batch_size // GROUP, batch_size=batch_size,
                    max_new_tokens=new_tokens, kl_coef=KL_WEIGHT, lora_rank=lora_rank, lr=LR, save_every=0,
                    eval_every=0, eval_prompts=0, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                    rollout_engine=engine, rollout_quant=rollout_quant)

    def build(strategy, c):
        trainer = PPOTrainer.from_config(strategy, c)
        # No stop token: every completion is new_tokens long, as TRL's min_new_tokens makes its own.
        trainer.settings.sample = dataclasses.replace(trainer.settings.sample, eos_token_ids=())
        return trainer

    _, metrics = train_bench("grpo", cfg, build, "samples_per_s")
    for m in metrics:
        assert m["response_length"] == new_tokens, m["response_length"]
    return [batch_size / m["step_time"] for m in metrics]


def _trl(stage, model, rows_file, steps, batch_size, max_length, lora_rank, dtype, new_tokens,
         reward="rm", gradient_checkpointing=False, **_) -> list[float]:
    """TRL's SFT, reward and DPO trainers on the workload (its GRPO: bench/trl_grpo.py)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines()]
    dt = compute_dtype(override=dtype)
    _, tok = load_model(model, dt)
    path = resolve_spec(model)
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    common = dict(max_steps=steps, per_device_train_batch_size=batch_size, max_length=max_length, learning_rate=1e-4,
                  bf16=dt == torch.bfloat16, gradient_checkpointing=gradient_checkpointing, logging_steps=10**6, save_strategy="no",
                  report_to=[], dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=42)
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "sft":
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_list([{"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]}
                                      for r in rows])
            trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=dt),
                                 args=SFTConfig(output_dir=tmp, packing=False, **common), train_dataset=data,
                                 processing_class=tok,
                                 peft_config=LoraConfig(r=lora_rank, target_modules="all-linear"),
                                 callbacks=[StepTimer()])
        elif stage == "dpo":
            from trl import DPOConfig, DPOTrainer

            # ref_model None with a peft_config: TRL's reference is the model with the adapter disabled, as ours.
            trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=dt),
                                 args=DPOConfig(output_dir=tmp, beta=0.1, loss_type="sigmoid", **common),
                                 train_dataset=_trl_pairs(Dataset, rows), processing_class=tok,
                                 peft_config=LoraConfig(r=lora_rank, target_modules="all-linear"),
                                 callbacks=[StepTimer()])
        else:
            from trl import RewardConfig, RewardTrainer

            data = _trl_pairs(Dataset, rows)
            hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dt)
            hf.config.pad_token_id = tok.pad_token_id
            trainer = RewardTrainer(model=hf, args=RewardConfig(output_dir=tmp, **common), train_dataset=data,
                                    processing_class=tok,
                                    peft_config=LoraConfig(r=lora_rank, target_modules="all-linear",
                                                           task_type="SEQ_CLS"),
                                    callbacks=[StepTimer()])
        trainer.train()
    return [batch_size / t for t in times[1:]]  # the first step is warm-up


def _trl_pairs(dataset_cls, rows):
    """TRL's conversational preference form: the prompt's messages, each answer as one message."""
    return dataset_cls.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


RUNNERS = {"frugal": _frugal, "trl": _trl}


def run_one(tool, stage, model, rows_file, settings: dict):
    """Child-process entry (bench/compare.py starts it): print the peak memory and the per-step
    rates as JSON. `settings`: the keyword arguments of RUNNERS[tool]."""
    torch.manual_seed(0)
    rates = RUNNERS[tool](stage, model, rows_file, **settings)
    peak = peak_memory_bytes()  # this process's peak: each (row, repeat) runs in its own
    if settings.get("engine") == "vllm":  # its server is a child process, ended and waited for by now
        peak += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    print(f"PEAK {peak}")
    print("RATES " + json.dumps(rates))
