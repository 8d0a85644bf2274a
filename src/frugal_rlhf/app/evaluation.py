"""Held-out comparison of a model against a baseline (`frugal eval`, and the demo report).

For each prompt both models sample one answer (same seed, same settings); we report the
reward model's mean score and win rate, the KL of the model to the baseline on the model's
own samples (sum over tokens of log p_model - log p_baseline, an unbiased estimate of
KL(model || baseline)), answer length, and a quality measure the policy never optimized:
unigram F1 against the held-out human reference answers. With a gold scorer (the demo's
hidden judge, frugal_rlhf.rl.gold) it also reports the gold score of both models with the
paired standard error, the gold win rate, and the reward model's accuracy against the gold
order on held-out pairs of baseline answers (two answers to the same prompt).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import re
from pathlib import Path

import torch

from ..data.tokenize import PromptCollator, encode_prompt
from ..device import autocast as autocast_for
from ..generation import SampleConfig
from ..generation.engines import RolloutEngine, make_engine
from ..models.loading import load_model
from ..models.memory import sampling_batch
from ..models.modes import inference
from ..models.roles import Actor, SharedLM

_WORD = re.compile(r"\w+", re.UNICODE)


def unigram_f1(candidate: str, reference: str) -> float:
    """Word-overlap F1 (as in SQuAD's metric): a cheap, model-free similarity to a reference."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    common = sum((collections.Counter(a) & collections.Counter(b)).values())
    if not a or not b or not common:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def paired_gain(new: list[float], old: list[float]) -> tuple[float, float]:
    """Mean of the per-prompt differences new - old, and its standard error (the two models
    answer the same prompts with the same seed, so the differences are what varies)."""
    d = [a - b for a, b in zip(new, old)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("inf")
    return mean, (var / n) ** 0.5


def sampling_engine(name: str, quant: str, tokenizer, device, dtype) -> RolloutEngine:
    """The rollout engine of a command that samples (--rollout-engine, --rollout-quant), computing
    in `dtype` on `device` where it runs our own model."""
    return make_engine(name, autocast=functools.partial(autocast_for, device, dtype), tokenizer=tokenizer, quant=quant,
                       device_type=device.type, dtype=dtype)


@torch.no_grad()
def sample_with_logprobs(engine: RolloutEngine, actor: Actor, tokenizer, prompts, cfg: SampleConfig, seed: int,
                         batch_size: int, max_prompt_length: int, autocast, others=()):
    """Sample answers with `engine`; return texts, token counts and per-sequence log-prob sums
    under `actor` and each model in `others` (our forward under `autocast`, on the same tokens)."""
    collate = PromptCollator(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    device = next(actor.parameters()).device
    texts, lengths, logps = [], [], [[] for _ in range(1 + len(others))]
    inference(actor, *others)  # no dropout in sampling or scoring (models.modes)
    for i in range(0, len(prompts), batch_size):
        batch = collate([{"prompt_ids": encode_prompt(tokenizer, p, max_prompt_length)}
                         for p in prompts[i:i + batch_size]])
        ro = engine.generate(actor, batch["input_ids"].to(device), batch["attention_mask"].to(device), cfg, gen)
        n = ro.action_mask.shape[1]
        mask = ro.action_mask.float()
        for k, m in enumerate((actor, *others)):
            with autocast:
                lp, _ = m(ro.sequences, ro.attention_mask, n)
            logps[k].extend((lp.float() * mask).sum(1).tolist())
        for seq, am in zip(ro.sequences[:, ro.prompt_length:], ro.action_mask):
            ids = [int(t) for t, keep in zip(seq, am) if keep and int(t) not in cfg.eos_token_ids]
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        lengths.extend(ro.action_mask.sum(1).tolist())
    return texts, lengths, logps


def win_rate(new, old) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(new, old)) / max(1, len(new))


def pairwise_accuracy(proxy, gold, k: int) -> dict:
    """How often the proxy orders two answers to the same prompt as the gold scorer does:
    answers 2j and 2j+1 of each prompt's k form a pair; gold ties are left out."""
    pairs = [(i + j, i + j + 1) for i in range(0, len(gold), k) for j in range(0, k - 1, 2)]
    hits = [(proxy[a] > proxy[b]) == (gold[a] > gold[b]) for a, b in pairs if gold[a] != gold[b]]
    return {"accuracy": sum(hits) / len(hits) if hits else float("nan"), "n_pairs": len(hits)}


def gold_summary(new_texts, old_texts, prompts, r_old, gold, per_prompt, k) -> dict:
    g_new, g_old = gold(prompts, new_texts), gold(prompts, old_texts)
    gain, se = paired_gain(per_prompt(g_new), per_prompt(g_old))
    return {"model": sum(g_new) / len(g_new), "baseline": sum(g_old) / len(g_old), "gain": gain, "gain_se": se,
            "win_rate": win_rate(g_new, g_old), "rm_accuracy": pairwise_accuracy(r_old, g_old, k),
            "scores_model": g_new, "scores_baseline": g_old}


def compare_models(model: Actor, baseline: Actor, tokenizer, reward_model, rows, cfg: SampleConfig, seed=1,
                   batch_size=8, max_prompt_length=256, autocast=None, n_examples=4, samples_per_prompt=1,
                   gold=None, engine=None) -> dict:
    """rows: {"prompt": messages, "reference": str|None}. Returns a JSON-ready summary.

    With samples_per_prompt k > 1 each model answers every prompt k times: sampling noise,
    most of the noise in a small comparison, shrinks by sqrt(k); the gain's standard error is
    taken over the per-prompt means, since answers to one prompt are not independent.
    `gold(prompts, texts) -> scores` adds the hidden judge's verdict (summary["gold"]).
    `engine` samples both models' answers (default: our torch engine under `autocast`)."""
    autocast = autocast or contextlib.nullcontext()
    engine = engine or make_engine("torch", autocast=lambda: autocast)
    hf = model.lm.hf_model()  # sampling's memory plan: rows at a time that their KV cache and logits leave room for
    batch_size = sampling_batch(hf.config, next(hf.parameters()).element_size(), batch_size,
                                max_prompt_length + cfg.max_new_tokens)
    k = samples_per_prompt
    rows = [r for r in rows for _ in range(k)]
    prompts = [r["prompt"] for r in rows]
    new_texts, new_len, (lp_new, lp_base_on_new) = sample_with_logprobs(
        engine, model, tokenizer, prompts, cfg, seed, batch_size, max_prompt_length, autocast, others=(baseline,))
    old_texts, old_len, _ = sample_with_logprobs(engine, baseline, tokenizer, prompts, cfg, seed, batch_size,
                                                 max_prompt_length, autocast)
    inference(reward_model)
    r_new = reward_model.score(prompts, new_texts).tolist()
    r_old = reward_model.score(prompts, old_texts).tolist()
    refs = [r.get("reference") for r in rows]
    with_ref = [i for i, ref in enumerate(refs) if ref]
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    per_prompt = lambda xs: [mean(xs[i:i + k]) for i in range(0, len(xs), k)]  # noqa: E731
    gain, gain_se = paired_gain(per_prompt(r_new), per_prompt(r_old))
    summary = {
        "n_prompts": len(rows) // k,
        "samples_per_prompt": k,
        "reward_model": {"model": mean(r_new), "baseline": mean(r_old), "gain": gain, "gain_se": gain_se},
        "win_rate": win_rate(r_new, r_old),
        "kl_to_baseline": mean([a - b for a, b in zip(lp_new, lp_base_on_new)]),
        "length": {"model": mean(new_len), "baseline": mean(old_len)},
        "reference_f1": {"model": mean([unigram_f1(new_texts[i], refs[i]) for i in with_ref]),
                         "baseline": mean([unigram_f1(old_texts[i], refs[i]) for i in with_ref]),
                         "n": len(with_ref)},
        "examples": [{"prompt": prompts[i][-1]["content"], "baseline": old_texts[i], "model": new_texts[i],
                      "reward_baseline": r_old[i], "reward_model": r_new[i]}
                     for i in range(0, min(n_examples * k, len(rows)), k)],
    }
    if gold is not None:
        g = summary["gold"] = gold_summary(new_texts, old_texts, prompts, r_old, gold, per_prompt, k)
        for ex, i in zip(summary["examples"], range(0, len(rows), k)):
            ex.update(gold_baseline=g["scores_baseline"][i], gold_model=g["scores_model"][i])
    return summary


def load_policy(spec: str, dtype) -> tuple[Actor, object]:
    hf, tok = load_model(spec, dtype)
    hf.requires_grad_(False)
    actor = Actor(SharedLM(hf), None)
    actor.tokenizer = tok
    return actor, tok


def summary_markdown(s: dict, model_name="model", baseline_name="baseline") -> str:
    lines = [f"| metric | {baseline_name} | {model_name} |", "|---|---|---|"]
    if "gold" in s:
        g = s["gold"]
        lines += [f"| **gold score** (hidden judge, mean) | {g['baseline']:.3f} | **{g['model']:.3f}** "
                  f"(gain {g['gain']:+.3f}, standard error {g['gain_se']:.3f}) |",
                  f"| win rate by the gold judge | - | {g['win_rate']:.2f} |",
                  f"| reward model vs gold order, held-out {baseline_name} pairs (n={g['rm_accuracy']['n_pairs']}) "
                  f"| {g['rm_accuracy']['accuracy']:.2f} | - |"]
    lines += [
             f"| reward-model score (mean) | {s['reward_model']['baseline']:.3f} | {s['reward_model']['model']:.3f} "
             f"(gain standard error {s['reward_model']['gain_se']:.3f}) |",
             f"| win rate by the reward model | - | {s['win_rate']:.2f} |",
             f"| KL to {baseline_name} (nats/answer) | 0 | {s['kl_to_baseline']:.2f} |",
             f"| answer length (tokens) | {s['length']['baseline']:.1f} | {s['length']['model']:.1f} |",
             f"| unigram F1 vs human reference (n={s['reference_f1']['n']}) | {s['reference_f1']['baseline']:.3f} | "
             f"{s['reference_f1']['model']:.3f} |"]
    return "\n".join(lines) + "\n"


def write_comparison(summary: dict, out_dir, name="eval", **names):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{name}.md").write_text(summary_markdown(summary, **names))
