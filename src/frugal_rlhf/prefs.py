"""Preference pairs for stage 2 without human rankers (`frugal prefs`).

The simulated labeler ("reference" labeler): for each prompt that has a human-written
reference answer in the data (ShareGPT's first answer), the pair is
    chosen   = the reference answer, cut to the same token budget as the samples
    rejected = a sample of the SFT model for that prompt.
It is independent of the reward model being trained (it never looks at one). Known biases,
documented in docs/preferences.md: it prefers the reference's style and vocabulary over
whatever the SFT model writes, including cases where the model's answer is better; it
says nothing about correctness; cutting both sides to one budget removes the length cue
only partly (the model may stop early, the reference rarely does).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .data.tokenize import PromptCollator, encode_prompt
from .generation import SampleConfig, sample
from .strategies.base import atomic_write

log = logging.getLogger("frugal_rlhf")


def cut_to_tokens(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n])


@torch.no_grad()
def generate_responses(model, tokenizer, prompts, sample_cfg: SampleConfig, batch_size: int, max_prompt_length: int,
                       seed: int, device, autocast, progress=None) -> list[str]:
    """Batched, KV-cached sampling of one response per prompt (messages lists)."""
    collate = PromptCollator(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [{"prompt_ids": encode_prompt(tokenizer, p, max_prompt_length)} for p in prompts[i:i + batch_size]]
        batch = collate(rows)
        with autocast:
            ro = sample(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), sample_cfg, gen)
        for seq, mask in zip(ro.sequences[:, ro.prompt_length:], ro.action_mask):
            ids = [int(t) for t, m in zip(seq, mask) if m and int(t) not in sample_cfg.eos_token_ids]
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        if progress:
            progress(len(out))
    return out


def build_reference_pairs(model, tokenizer, prompt_rows, output, max_new_tokens=64, temperature=0.8, top_p=0.95,
                          batch_size=8, max_prompt_length=256, seed=0, device=None, autocast=None) -> dict:
    """Write chosen=reference / rejected=model-sample pairs as JSONL; return a summary."""
    from .runlog import make_progress
    from .trainers.ppo import stop_tokens

    rows = [r for r in prompt_rows if r.get("reference")]
    if not rows:
        raise ValueError("no prompt has a reference answer: the reference labeler needs conversations with answers")
    cfg = SampleConfig(max_new_tokens, temperature, 0, top_p, stop_tokens(tokenizer), tokenizer.pad_token_id)
    t0 = time.perf_counter()
    with make_progress() as progress:
        task = progress.add_task("prefs", total=len(rows), info="sampling")
        samples = generate_responses(model, tokenizer, [r["prompt"] for r in rows], cfg, batch_size,
                                     max_prompt_length, seed, device, autocast,
                                     lambda n: progress.update(task, completed=n))
    pairs = []
    for row, text in zip(rows, samples):
        chosen = cut_to_tokens(tokenizer, row["reference"], max_new_tokens)
        if text and text != chosen:  # an empty or identical sample carries no preference
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": text, "labeler": "reference"})
    atomic_write(output, lambda tmp: Path(tmp).write_text("".join(json.dumps(p) + "\n" for p in pairs)))
    elapsed = time.perf_counter() - t0
    summary = {"pairs": len(pairs), "prompts": len(rows), "seconds": round(elapsed, 1),
               "pairs_per_s": round(len(pairs) / elapsed, 3), "labeler": "reference"}
    log.info("prefs: %d pairs from %d prompts in %.0f s -> %s", len(pairs), len(rows), elapsed, output)
    return summary
