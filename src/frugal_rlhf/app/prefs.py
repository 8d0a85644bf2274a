"""Preference pairs for stage 2 without human rankers (`frugal prefs`).

Two simulated labelers, both independent of the reward model being trained (neither ever
looks at one); docs/preferences.md documents each one's known biases.

- "contrast" (the demo's): for each prompt, two samples of the SFT model,
      chosen   = a sample at the normal temperature (`temperature`, `top_p`)
      rejected = a sample at a high temperature (`contrast_temperature`, no top-p cut),
  the same model made worse on purpose, as in contrast-distillation recipes (RLCD, ALMoST).
  It ranks fluency and coherence, not helpfulness, and needs no reference answers.
- "reference": for each prompt that has a human-written answer (ShareGPT's first answer),
      chosen   = the reference answer, cut to the same token budget as the sample
      rejected = a sample of the SFT model.
  Its pairs differ mostly in style; a 135M reward model stayed at chance on them
  (docs/benchmarks.md).
- "gold" (the demo's): a simulated human with a hidden preference (frugal_rlhf.rl.gold):
  `samples_per_prompt` samples of the SFT model at the normal temperature, ranked by the gold
  scorer with human-like noise (`label_noise`, agreeing with the gold order on a random pair
  `label_agreement` of the time); the pair is the labeler's first against its last.
  Rows also carry the two gold scores (gold_chosen, gold_rejected), which no trainer reads.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch

from ..data.tokenize import PromptCollator, encode_prompt, stop_tokens
from ..generation import SampleConfig
from ..generation.engines import make_engine
from ..models.memory import sampling_batch
from ..models.roles import Actor, SharedLM
from ..rl.gold import check_labeler, gold_scores, label_groups
from ..rundir import atomic_write
from ..runlog import make_progress

log = logging.getLogger("frugal_rlhf")

LABELERS = ("contrast", "reference", "gold")
LABEL_AGREEMENT = 0.72  # human raters agree on ~73% of pairs (Ouyang et al. 2022)


def cut_to_tokens(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n])


@torch.no_grad()
def generate_responses(engine, policy, tokenizer, prompts, sample_cfg: SampleConfig, batch_size: int,
                       max_prompt_length: int, seed: int, device, progress=None) -> list[str]:
    """One response per prompt (messages lists) from `policy` (an Actor), sampled in batches by
    the rollout engine (generation/engines.py)."""
    collate = PromptCollator(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [{"prompt_ids": encode_prompt(tokenizer, p, max_prompt_length)} for p in prompts[i:i + batch_size]]
        batch = collate(rows)
        ro = engine.generate(policy, batch["input_ids"].to(device), batch["attention_mask"].to(device), sample_cfg,
                             gen)
        for seq, mask in zip(ro.sequences[:, ro.prompt_length:], ro.action_mask):
            ids = [int(t) for t, m in zip(seq, mask) if m and int(t) not in sample_cfg.eos_token_ids]
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        if progress:
            progress(len(out))
    return out


def build_pairs(model, tokenizer, prompt_rows, output, labeler="contrast", max_new_tokens=64, temperature=0.8,
                top_p=0.95, contrast_temperature=1.2, batch_size=8, max_prompt_length=256, seed=0, device=None,
                autocast=None, label_agreement=LABEL_AGREEMENT, label_noise="thurstone",
                samples_per_prompt=2, engine=None) -> dict:
    """Write the labeler's chosen/rejected pairs as JSONL (prompt, chosen, rejected, labeler); return a summary.
    `model` (a causal LM) is sampled by `engine` (default: our torch engine under `autocast`)."""
    if labeler not in LABELERS:
        raise ValueError(f"unknown labeler {labeler!r}: choose one of {', '.join(LABELERS)}")
    if samples_per_prompt < 2 or (samples_per_prompt > 2 and labeler != "gold"):
        raise ValueError(f"samples_per_prompt {samples_per_prompt}: the gold labeler ranks 2 or more answers a "
                         f"prompt, the {labeler} labeler exactly 2")
    if labeler == "gold":  # before sampling: a bad setting must not cost the sampling time first
        check_labeler(label_agreement, label_noise)
    rows = [r for r in prompt_rows if r.get("reference")] if labeler == "reference" else list(prompt_rows)
    if not rows:
        raise ValueError("no prompt has a reference answer: the reference labeler needs conversations with answers")
    prompts = [r["prompt"] for r in rows]
    stops = stop_tokens(tokenizer)
    configs = [SampleConfig(max_new_tokens, temperature, 0, top_p, stops, tokenizer.pad_token_id)]
    if labeler == "contrast":
        configs.append(SampleConfig(max_new_tokens, contrast_temperature, 0, 1.0, stops, tokenizer.pad_token_id))
    elif labeler == "gold":  # more samples from the same distribution (other seeds)
        configs += configs[:1] * (samples_per_prompt - 1)
    t0 = time.perf_counter()
    samples = []
    policy = Actor(SharedLM(model), None)
    engine = engine or make_engine("torch", autocast=lambda: autocast or contextlib.nullcontext())
    # the memory plan of sampling: as many rows at a time as their KV cache and logits leave room for
    batch_size = sampling_batch(model.config, next(model.parameters()).element_size(), batch_size,
                                max_prompt_length + max_new_tokens)
    with make_progress() as progress:
        task = progress.add_task("prefs", total=len(rows) * len(configs), info="sampling")
        for k, cfg in enumerate(configs):
            samples.append(generate_responses(engine, policy, tokenizer, prompts, cfg, batch_size, max_prompt_length,
                                              seed + k, device,
                                              lambda n, k=k: progress.update(task, completed=k * len(rows) + n)))
    if labeler == "gold":
        pairs = gold_pairs(prompts, samples, label_agreement, label_noise, seed)
    else:
        if labeler == "reference":
            sides = [(cut_to_tokens(tokenizer, r["reference"], max_new_tokens), s) for r, s in zip(rows, samples[0])]
        else:
            sides = list(zip(*samples))
        # An empty side, or two identical sides, carries no preference.
        pairs = [{"prompt": p, "chosen": c, "rejected": r, "labeler": labeler}
                 for p, (c, r) in zip(prompts, sides) if c and r and c != r]
    atomic_write(output, lambda tmp: Path(tmp).write_text("".join(json.dumps(p) + "\n" for p in pairs)))
    elapsed = time.perf_counter() - t0
    summary = {"pairs": len(pairs), "prompts": len(rows), "seconds": round(elapsed, 1),
               "pairs_per_s": round(len(pairs) / elapsed, 3), "labeler": labeler}
    if labeler == "gold":
        summary.update(label_agreement=label_agreement, label_noise=label_noise, samples_per_prompt=samples_per_prompt)
        summary["observed_agreement"] = sum(p["gold_chosen"] > p["gold_rejected"] for p in pairs) / max(1, len(pairs))
    log.info("prefs: %d pairs (%s labeler) from %d prompts in %.0f s -> %s", len(pairs), labeler, len(rows), elapsed,
             output)
    return summary


def gold_pairs(prompts, samples: list[list[str]], agreement: float, noise: str, seed: int) -> list[dict]:
    """The simulated human's pairs: each prompt's non-empty answers (samples[k][i] is answer k
    to prompt i) ranked by the gold scorer with noise, its first against its last; a gold tie
    (or fewer than two answers) labels nothing."""
    scores = [gold_scores(prompts, s) for s in samples]
    groups = [[(s[i], g[i]) for s, g in zip(samples, scores) if s[i]] for i in range(len(prompts))]
    labels = label_groups([[g for _, g in group] for group in groups], agreement,
                          torch.Generator().manual_seed(seed + 1000), noise)
    pairs = []
    for p, group, label in zip(prompts, groups, labels):
        if label is None:
            continue
        (c, gc), (r, gr) = group[label[0]], group[label[1]]  # two texts the same would have tied
        pairs.append({"prompt": p, "chosen": c, "rejected": r, "labeler": "gold", "gold_chosen": gc,
                      "gold_rejected": gr})
    return pairs
