"""The pipeline's report: every number comes from the run's own files."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import PPOConfig
from ..data.formats import load_dataset_file
from ..data.tokenize import stop_tokens
from ..device import autocast, compute_dtype, default_device
from ..generation import SampleConfig
from ..models.build import reward_beside
from ..models.loading import load_model
from ..models.reward_io import load_reward_model
from ..models.roles import Actor, SharedLM
from ..rl.algorithms import estimator
from ..rl.gold import gold_scores
from . import overopt
from .evaluation import compare_models, load_policy, sampling_engine, summary_markdown, write_comparison

log = logging.getLogger("frugal_rlhf")


def _metrics(path: Path) -> list[dict]:
    f = path / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def edge_window(n: int) -> int:
    """How many steps at each end are averaged: single small batches are too noisy to compare."""
    return max(1, min(5, n // 4))


def _edge_mean(rows, key, last: bool):
    """Mean of `key` over the first (or last) edge_window steps that logged it."""
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return None
    k = edge_window(len(vals))
    return sum(vals[-k:] if last else vals[:k]) / k


def last_mean(rows, key):
    return _edge_mean(rows, key, last=True)


def first_mean(rows, key):
    return _edge_mean(rows, key, last=False)


def above_chance(accuracy: float, n_pairs: int) -> bool:
    """Is a held-out pairwise accuracy more than two standard errors above a coin flip?"""
    return accuracy > 0.5 + 2 * (0.25 / max(n_pairs, 1)) ** 0.5


def held_out_comparison(out: Path, cfg, policy: str = "ppo") -> dict:
    device = default_device()
    dtype = compute_dtype(device, cfg.dtype)
    sft, ppo, rm, tok = report_roles(out, policy, dtype, cfg.quantize_base)
    for m in (sft, ppo, rm):
        m.to(device).eval()
    ev = {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.95, "batch_size": 8, **cfg.eval}
    sample_cfg = SampleConfig(ev["max_new_tokens"], ev["temperature"], 0, ev["top_p"], stop_tokens(tok),
                              tok.pad_token_id)
    rows = load_dataset_file(str(out / "data" / "held_out.jsonl"), "prompt")
    engine = sampling_engine(cfg.rollout_engine, cfg.rollout_quant, tok, device, dtype)
    try:
        return compare_models(ppo, sft, tok, rm, rows, sample_cfg, seed=cfg.seed + 7, batch_size=ev["batch_size"],
                              autocast=autocast(device, dtype), samples_per_prompt=ev.get("samples_per_prompt", 1),
                              gold=gold_scores, engine=engine)
    finally:
        engine.close()


def report_roles(out: Path, policy: str, dtype, quantize: str):
    """SFT, the trained policy (ppo/ or dpo/) and the reward model for the comparison: one
    base in memory, as in training (SFT = the base, adapters off; the policy and the reward
    model its adapters), where the policy was trained with LoRA; else separate models."""
    base = str(out / "sft" / "final")
    if not (out / policy / "adapter").exists():  # full fine-tuning: three models
        sft, tok = load_policy(base, dtype)
        ppo, _ = load_policy(str(out / policy / "final"), dtype)
        return sft, ppo, load_reward_model(out / "rm", dtype=dtype), tok
    hf, tok = load_model(base, dtype, quantize=quantize)
    hf.requires_grad_(False)
    lm = SharedLM(hf)
    lm.load_adapter(out / policy / "adapter", "policy")
    rm = reward_beside(lm, out / "rm", base, quantize, dtype) if (out / "rm").exists() else None
    return Actor(lm, None), Actor(lm, "policy"), rm, tok


def method_label(advantage: str) -> str:
    """What the RL stage ran, for the report's first line (rl/algorithms.py)."""
    est = estimator(advantage)
    return (f"{est.method} with four roles (actor, critic, reference, reward model; GAE)" if est.critic
            else f"{est.method} ({est.name} advantages, no critic)")


def gold_verdict(comparison: dict, method: str = "PPO") -> str:
    """The report's first line: did the RL stage raise the hidden judge's score beyond noise?"""
    g, kl = comparison["gold"], comparison["kl_to_baseline"]
    gain, se = g["gain"], g["gain_se"]
    if gain > 2 * se:
        return (f"{method} raised the hidden gold judge's score by {gain:+.3f} ({g['baseline']:.3f} -> "
                f"{g['model']:.3f}; more than two paired standard errors, {2 * se:.3f}; gold win rate "
                f"{g['win_rate']:.2f}) at a KL of {kl:.2f} nats per answer.")
    if gain > 0:
        return (f"{method}: the hidden gold judge's score rose by {gain:+.3f}, but that is within noise (two "
                f"standard errors are {2 * se:.3f} on {comparison['n_prompts']} prompts): this run does NOT show "
                "that it made the answers better.")
    return (f"{method} did NOT improve the hidden gold judge's score ({gain:+.3f}, two standard errors "
            f"{2 * se:.3f}); see the over-optimization curve below.")


def write_report(out: Path, cfg) -> dict:
    out = Path(out)
    sft, ppo = _metrics(out / "sft"), _metrics(out / "ppo")
    rm_eval = json.loads((out / "rm" / "eval.json").read_text())
    prefs = json.loads((out / "prefs.json").read_text()) if (out / "prefs.json").exists() else {}
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    peaks = json.loads((out / "memory.json").read_text()) if (out / "memory.json").exists() else {}
    comparison = held_out_comparison(out, cfg)
    write_comparison(comparison, out, "eval", model_name="PPO", baseline_name="SFT")
    ppo_eval = [r for r in ppo if "eval_reward" in r]
    gain, se = comparison["reward_model"]["gain"], comparison["reward_model"]["gain_se"]
    summary = {
        "model": cfg.model,
        "sft": {"loss_first": first_mean(sft, "loss"), "loss_last": last_mean(sft, "loss"),
                "eval_loss_last": next((r["eval_loss"] for r in reversed(sft) if "eval_loss" in r), None),
                "steps": len([r for r in sft if r["step"] > 0])},
        "prefs": prefs,
        "rm": rm_eval,
        "ppo": {"steps": len([r for r in ppo if r.get("step", 0) > 0]),
                "train_reward_first": first_mean(ppo, "reward"), "train_reward_last": last_mean(ppo, "reward"),
                "eval_reward_first": ppo_eval[0]["eval_reward"] if ppo_eval else None,
                "eval_reward_last": ppo_eval[-1]["eval_reward"] if ppo_eval else None,
                "kl_last": last_mean(ppo, "kl"), "peak_mem_gb": max((r.get("peak_mem_gb", 0) for r in ppo), default=None),
                "explained_variance_first": first_mean(ppo, "explained_variance"),
                "explained_variance_last": last_mean(ppo, "explained_variance")},
        "held_out": {k: comparison[k] for k in ("n_prompts", "reward_model", "win_rate", "kl_to_baseline", "length",
                                                "reference_f1")},
        "gold": {k: v for k, v in comparison["gold"].items() if not k.startswith("scores_")},
        "gold_gain_significant": comparison["gold"]["gain"] > 2 * comparison["gold"]["gain_se"],
        "overoptimization": overopt.curve(ppo),
        "held_out_reward_gain": gain,
        "held_out_reward_gain_significant": gain > 2 * se,
        "rm_above_chance": above_chance(rm_eval["accuracy"], rm_eval["n_pairs"]),
        "timings_s": timings,
        "peak_mem_gb": peaks,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if gain > 2 * se:
        proxy = (f"PPO raised the held-out reward-model score by {gain:+.3f} (more than two standard errors, "
                 f"{2 * se:.3f}; win rate {comparison['win_rate']:.2f}) at a KL of "
                 f"{comparison['kl_to_baseline']:.2f} nats per answer.")
    elif gain > 0:
        proxy = (f"The held-out reward-model score rose by {gain:+.3f}, but that is within noise (two standard "
                 f"errors are {2 * se:.3f} on {comparison['n_prompts']} prompts): this run does NOT show that PPO "
                 "improved it.")
    else:
        proxy = f"PPO did NOT improve the held-out reward-model score ({gain:+.3f}); see the curves below."
    method = method_label(cfg.ppo.get("advantage", PPOConfig.advantage))
    verdict = gold_verdict(comparison, method)
    if not summary["rm_above_chance"]:
        # A score gain under a reward model that cannot rank held-out pairs is not evidence of better answers.
        proxy += (f" Caution: the reward model's held-out accuracy ({rm_eval['accuracy']:.2f} on "
                  f"{rm_eval['n_pairs']} pairs) is not distinguishable from chance, so its score says little about "
                  "answer quality: judge by the gold score and the examples.")
    curve_png = overopt.plot(summary["overoptimization"], out / "overoptimization.png")
    md = [verdict, "", f"# RLHF run report: {out}", "",
          f"Model: `{cfg.model}`. The gold judge (docs/preferences.md) is never seen by the policy"
          + ("; it labeled the preference pairs with human-like noise, and the reward model is its learned proxy"
             if prefs.get("labeler") == "gold" else f"; the pairs came from the {prefs.get('labeler', '?')} labeler")
          + f". Proxy (reward model): {proxy}", "",
          "## Stage 1: supervised fine-tuning", "",
          f"Loss {summary['sft']['loss_first']:.3f} -> {summary['sft']['loss_last']:.3f} (means of the first and "
          f"last {edge_window(summary['sft']['steps'])} steps) over "
          f"{summary['sft']['steps']} steps (held-out loss {summary['sft']['eval_loss_last'] or float('nan'):.3f}).",
          "", "![SFT loss](sft/loss.png)", "",
          "## Stage 2: reward model", "",
          f"Preference pairs: {prefs.get('pairs', '?')} (labeler: {prefs.get('labeler', '?')}; see "
          "docs/preferences.md). Held-out pairwise accuracy "
          f"**{rm_eval['accuracy']:.3f}** on {rm_eval['n_pairs']} pairs, mean margin {rm_eval['mean_margin']:.3f}.",
          "", "![reward model](rm/reward.png)", "",
          "## Stage 3: PPO", "",
          f"{method}, {summary['ppo']['steps']} steps; held-out reward during training "
          f"{_fmt(summary['ppo']['eval_reward_first'])} -> {_fmt(summary['ppo']['eval_reward_last'])}, "
          f"KL to the reference {_fmt(summary['ppo']['kl_last'])} nats per answer (mean of the last "
          f"{edge_window(len([r for r in ppo if 'kl' in r]))} steps)."
          + (f" The critic explained {_fmt(summary['ppo']['explained_variance_first'])} -> "
             f"{_fmt(summary['ppo']['explained_variance_last'])} of the returns' variance (explained variance, "
             "first and last steps; 1 = perfect, 0 = a constant)." if summary["ppo"]["explained_variance_last"]
             is not None else ""), "",
          "![PPO](ppo/ppo.png)", "", "![PPO diagnostics](ppo/ppo_diagnostics.png)", "",
          "## Over-optimization: gold vs proxy against sqrt(KL)", "",
          overopt.describe(summary["overoptimization"]), "",
          *(["![over-optimization](overoptimization.png)", ""] if curve_png else []),
          f"## Before / after on {comparison['n_prompts']} held-out prompts "
          f"({comparison['samples_per_prompt']} answers each)", "",
          summary_markdown(comparison, "PPO", "SFT"),
          "Unigram F1 against the held-out human answers is a measure the policy never optimized.", "",
          "## Examples", ""]
    for ex in comparison["examples"]:
        md += [f"**Prompt:** {ex['prompt'][:300]}", "",
               f"- SFT (reward {ex['reward_baseline']:.2f}, gold {ex['gold_baseline']:.2f}): {ex['baseline'][:400]}",
               f"- PPO (reward {ex['reward_model']:.2f}, gold {ex['gold_model']:.2f}): {ex['model'][:400]}", ""]
    if timings:
        md += ["## Wall time and memory", "", "| stage | seconds | peak memory (GiB) |", "|---|---|---|"]
        md += [f"| {k} | {v} | {peaks.get(k, '-')} |" for k, v in timings.items()] + [""]
    (out / "report.md").write_text("\n".join(md))
    print(f"\nreport: {out / 'report.md'}\n  SFT loss {_fmt(summary['sft']['loss_first'])} -> "
          f"{_fmt(summary['sft']['loss_last'])}; RM held-out accuracy {rm_eval['accuracy']:.3f}; "
          f"held-out reward SFT {comparison['reward_model']['baseline']:.3f} -> PPO "
          f"{comparison['reward_model']['model']:.3f}; gold SFT {comparison['gold']['baseline']:.3f} -> PPO "
          f"{comparison['gold']['model']:.3f}; KL {comparison['kl_to_baseline']:.2f}\n  {verdict}")
    return summary


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"
