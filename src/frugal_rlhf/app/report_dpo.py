"""The report of a `method: dpo` pipeline (SFT -> pairs -> DPO), beside PPO's when both exist.

DPO needs no reward model; its own measure is the held-out implicit-reward accuracy. When the
same run directory also holds the PPO path (a reward model and ppo/: run the pipeline once
with each method into one output), the DPO policy is scored on the same held-out prompts by
that reward model, and the two methods are tabled side by side.
"""
from __future__ import annotations

import json
from pathlib import Path

from .evaluation import summary_markdown, write_comparison
from .report import _fmt, _metrics, first_mean, held_out_comparison, last_mean


def write_dpo_report(out: Path, cfg) -> dict:
    out = Path(out)
    rows = _metrics(out / "dpo")
    train = [r for r in rows if r["step"] > 0]
    ev = json.loads((out / "dpo" / "eval.json").read_text())
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    summary = {"method": "dpo", "loss": ev["loss"], "steps": len(train),
               "train_loss_first": first_mean(train, "loss"), "train_loss_last": last_mean(train, "loss"),
               "eval_accuracy_first": next((r["eval_accuracy"] for r in rows if "eval_accuracy" in r), None),
               "eval_accuracy_last": ev["accuracy"], "n_held_out_pairs": ev["n_held_out"],
               "peak_mem_gb": max((r.get("peak_mem_gb", 0) for r in train), default=None),
               "seconds": timings.get("dpo")}
    md = [f"# DPO run report: {out}", "", f"Model: `{cfg.model}`; loss `{ev['loss']}`.", "",
          f"{summary['steps']} steps; training loss {_fmt(summary['train_loss_first'])} -> "
          f"{_fmt(summary['train_loss_last'])}; held-out implicit-reward accuracy "
          f"{_fmt(summary['eval_accuracy_first'])} -> **{_fmt(summary['eval_accuracy_last'])}** on "
          f"{ev['n_held_out']} pairs.", "", "![DPO](dpo/dpo.png)", ""]
    if (out / "rm" / "reward_model.json").exists():
        comparison = held_out_comparison(out, cfg, policy="dpo")
        write_comparison(comparison, out, "eval_dpo", model_name="DPO", baseline_name="SFT")
        summary["held_out"] = {k: comparison[k] for k in ("n_prompts", "reward_model", "win_rate", "kl_to_baseline")}
        if "gold" in comparison:
            summary["gold"] = {k: v for k, v in comparison["gold"].items() if not k.startswith("scores_")}
        md += [f"## Held-out prompts, scored by the PPO path's reward model ({comparison['n_prompts']} prompts)", "",
               summary_markdown(comparison, "DPO", "SFT"), ""]
        if (out / "summary.json").exists():
            md += _side_by_side(summary, json.loads((out / "summary.json").read_text()), timings)
    else:
        md += ["No reward model in this run directory: run the pipeline with `method: ppo` into the same output "
               "to score DPO and PPO on the same held-out prompts.", ""]
    (out / "dpo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "dpo_report.md").write_text("\n".join(md))
    print(f"\nreport: {out / 'dpo_report.md'}\n  {ev['loss']}: held-out implicit-reward accuracy "
          f"{_fmt(summary['eval_accuracy_first'])} -> {_fmt(summary['eval_accuracy_last'])}")
    return summary


def _side_by_side(dpo: dict, ppo: dict, timings: dict) -> list[str]:
    """One row per method: the same held-out prompts, reward model and baseline (the SFT model),
    and the hidden gold judge's score where the pairs came from it (the measure that counts)."""
    lines = ["## DPO and PPO on the same held-out prompts", "",
             "| method | gold SFT -> policy | gold gain (SE) | RM score SFT -> policy | gain (SE) | win rate (RM) "
             "| KL to SFT | wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, run, seconds in (("DPO", dpo, timings.get("dpo")),
                               ("PPO (+ RM)", ppo, _sum(timings.get("rm"), timings.get("ppo")))):
        held, g = run["held_out"], run.get("gold")
        rm = held["reward_model"]
        gold = (f"{g['baseline']:.3f} -> {g['model']:.3f} | {g['gain']:+.3f} ({g['gain_se']:.3f})" if g else "- | -")
        lines.append(f"| {name} | {gold} | {rm['baseline']:.3f} -> {rm['model']:.3f} | {rm['gain']:+.3f} "
                     f"({rm['gain_se']:.3f}) | {held['win_rate']:.2f} | {held['kl_to_baseline']:.2f} | {_fmt(seconds)} |")
    return lines + [""]


def _sum(*values):
    return None if any(v is None for v in values) else sum(values)
