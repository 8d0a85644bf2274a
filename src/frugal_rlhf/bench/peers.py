"""`frugal bench compare --peer trl --stage sft|rm|grpo|dpo`: one workload run by frugal-rlhf and by TRL.

Same model, same rows, same lengths, batch size, LoRA rank and targets, dtype and thread count;
each (tool, repeat) in its own process; the first step of every run is warm-up and excluded;
the median over repeats of each run's median step rate is reported with min/max, and the ratio.

The rows are built so both tools do the same work per step whatever their truncation and
padding rules: every conversation is cut to the same token count, below `max_length`, so no
row is truncated and a batch has (almost) no padding. Rates are samples (SFT) or pairs (reward
model) per second of optimizer step, data loading excluded on both sides.

GRPO (`--stage grpo`): TRL 1.16 has GRPOTrainer and no PPO trainer. Each step samples
GROUP completions for each of batch_size / GROUP prompts, scores them with a reward model (a
fresh one on the same base: its cost, not its scores, is measured), computes log-probs under
the reference (KL weight 0.04 on both sides, so both run the reference forward) and takes one
optimizer step. Every completion is `new_tokens` long on both sides (TRL: min_new_tokens; ours:
no stop token), so both do the same work; rates are completions per second of the whole step.
With `--reward math` the prompts are `frugal recipe math`'s two-digit additions and both sides
score completions with the same plain function (our lenient math reward), no reward model.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import PPOConfig, PreferenceConfig, RewardConfig, SFTConfig
from ..data.formats import load_dataset_file
from ..data.math_problems import generate
from ..device import compute_dtype, peak_memory_bytes
from ..models.loading import load_model, resolve_spec
from ..rl.rewards import parse_reward
from ..trainers.ppo import PPOTrainer
from ..trainers.preference import PreferenceTrainer
from ..trainers.reward import RewardTrainer
from ..trainers.supervised import SFTTrainer
from .common import fresh_reward_model, stats
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


GROUP = 4        # GRPO completions per prompt
KL_WEIGHT = 0.04  # GRPO's KL loss weight, > 0 on both sides so both compute reference log-probs


def math_rows(n: int) -> list[dict]:
    """n two-digit addition problems (the math recipe's level 2), prompts as one user message."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in generate(n, level=2, seed=0, split="train")]


def math_reward(completions, answer, **_) -> list[float]:
    """Our lenient math reward (1 if the last number is the answer) in TRL's reward-function form."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return parse_reward("math").fn(None, texts, [{"answer": a} for a in answer], None)


def _frugal(stage, model, rows_file, steps, batch_size, max_length, lora_rank, dtype, new_tokens,
            reward="rm", gradient_checkpointing=False) -> list[float]:
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "grpo":
            return _frugal_grpo(model, rows, steps, batch_size, lora_rank, dtype, new_tokens, Path(tmp), reward,
                                gradient_checkpointing)
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
                 gradient_checkpointing=False) -> list[float]:
    prompts = tmp / "prompts.jsonl"
    if reward == "math":
        prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
        scoring = {"reward": ["math"]}
    else:
        prompts.write_text("".join(json.dumps({"messages": r["prompt"]}) + "\n" for r in rows))
        scoring = {"reward_model": fresh_reward_model(model, lora_rank, dtype, tmp / "rm")}
    cfg = PPOConfig(model=model, **scoring, prompts=str(prompts), output=str(tmp / "grpo"), max_steps=steps, advantage="group",
                    group_size=GROUP, rollout_batch_size=batch_size // GROUP, batch_size=batch_size,
                    max_new_tokens=new_tokens, kl_coef=KL_WEIGHT, lora_rank=lora_rank, lr=1e-4, save_every=0,
                    eval_every=0, eval_prompts=0, dtype=dtype, gradient_checkpointing=gradient_checkpointing)

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
         reward="rm", gradient_checkpointing=False) -> list[float]:
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
        elif stage == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            if reward == "math":
                rm = math_reward
            else:
                rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dt)
                rm.config.pad_token_id = tok.pad_token_id
            lengths = []

            class Lengths(TrainerCallback):  # every completion must be new_tokens long, as ours
                def on_log(self, args, state, control, logs=None, **kw):
                    lengths.append(logs.get("completions/mean_length"))

            common["logging_steps"] = 1
            del common["max_length"]  # GRPO bounds the completion (max_completion_length), not the row
            trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=dt), reward_funcs=rm,
                                  args=GRPOConfig(output_dir=tmp, num_generations=GROUP, max_completion_length=new_tokens,
                                                  beta=KL_WEIGHT, generation_kwargs={"min_new_tokens": new_tokens},
                                                  **common),
                                  train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r.get("answer", "")}
                                                                   for r in rows]),
                                  processing_class=tok, reward_processing_classes=None if reward == "math" else tok,
                                  peft_config=LoraConfig(r=lora_rank, target_modules="all-linear"),
                                  callbacks=[StepTimer(), Lengths()])
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
    if stage == "grpo":
        assert all(n is None or n == new_tokens for n in lengths), lengths
    return [batch_size / t for t in times[1:]]  # the first step is warm-up


def _trl_pairs(dataset_cls, rows):
    """TRL's conversational preference form: the prompt's messages, each answer as one message."""
    return dataset_cls.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


RUNNERS = {"frugal": _frugal, "trl": _trl}


def run_one(tool, stage, model, rows_file, steps, batch_size, max_length, lora_rank, dtype, new_tokens, reward="rm",
            gradient_checkpointing=False):
    """Child-process entry: print the per-step rates as JSON."""
    torch.manual_seed(0)

    rates = RUNNERS[tool](stage, model, rows_file, steps, batch_size, max_length, lora_rank, dtype, new_tokens,
                          reward, gradient_checkpointing)
    print(f"PEAK {peak_memory_bytes()}")  # this process's peak: each (tool, repeat) runs in its own
    print("RATES " + json.dumps(rates))


def compare(peer="trl", stage="sft", model="default", steps=6, batch_size=8, max_length=256, lora_rank=8,
            dtype="auto", repeats=3, new_tokens=32, prompt_tokens=0, reward="rm", gradient_checkpointing=False, **_):
    if stage not in ("sft", "rm", "grpo", "dpo"):
        raise SystemExit(f"bench compare: stage '{stage}' is not implemented (sft, rm, grpo, dpo); see docs/benchmarks.md")
    if stage == "grpo" and batch_size % GROUP:
        raise SystemExit(f"bench compare grpo: --batch-size must be a multiple of {GROUP} (completions per prompt)")
    if reward == "math" and stage != "grpo":
        raise SystemExit("bench compare: --reward math is for --stage grpo")
    _, tok = load_model(model)
    rows = (math_rows(batch_size * steps) if reward == "math" else
            equal_length_rows(tok, batch_size * steps, max_length - 8, prompt_tokens))
    medians = {"frugal": [], peer: []}
    peaks = {"frugal": [], peer: []}
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = _write_rows(rows, Path(tmp))
        for r in range(repeats):
            for tool in medians:  # alternate the tools so drift in the machine hits both
                code = (f"from frugal_rlhf.bench.peers import run_one; run_one({tool!r}, {stage!r}, {model!r}, "
                        f"{str(rows_file)!r}, {steps}, {batch_size}, {max_length}, {lora_rank}, {dtype!r}, {new_tokens}, "
                        f"{reward!r}, {gradient_checkpointing})")
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"bench compare: {tool} {stage} failed:\n{proc.stderr[-3000:]}")
                rates = json.loads(proc.stdout.split("RATES ")[-1])
                peaks[tool].append(int(proc.stdout.split("PEAK ")[-1].split()[0]) / 2**30)
                medians[tool].append(statistics.median(rates))
                print(f"{tool} {stage} repeat {r + 1}: {medians[tool][-1]:.3f}/s", file=sys.stderr)
    unit = {"sft": "samples_per_s", "rm": "pairs_per_s", "grpo": "completions_per_s", "dpo": "pairs_per_s"}[stage]
    result = {"workload": "compare", "peer": peer, "stage": stage, "model": model, "batch_size": batch_size,
              "length": max_length - 8, "prompt_tokens": prompt_tokens or None, "lora_rank": lora_rank,
              "dtype": dtype, "threads": torch.get_num_threads(), "gradient_checkpointing": gradient_checkpointing,
              "unit": unit, "repeats": repeats, **({"new_tokens": new_tokens, "group": GROUP, "reward": reward} if stage == "grpo" else {})}
    for tool, values in medians.items():
        result[tool] = {**stats(values), "peak_mem_gb": max(peaks[tool])}
    result["ratio"] = result["frugal"]["median"] / result[peer]["median"]
    return result
