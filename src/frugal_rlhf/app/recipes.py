"""`frugal recipe math`: reinforcement learning from a verifiable reward on arithmetic problems.

    OUT/data/{train,test}.jsonl   generated problems; the test split never overlaps training
    OUT/grpo/                     the GRPO run (LoRA on the shared base, reward: math)
    OUT/report.md, OUT/result.json, OUT/grpo/rlvr.png

Held-out accuracy is measured greedily, strict (the answer in a recognised form) and lenient
(the last number), with the same adapter before (its LoRA starts at zero: the base model) and
after training, always on the trainer's own weights (the torch engine), whichever engine sampled
the rollouts: runs on different engines are then measured alike, problem by problem
(result.json keeps each problem's correctness, for paired comparisons between runs). A lenient
gain says the model got more answers right; a strict gain with lenient flat says it only
learned to state the answer in the expected form.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import PPOConfig, from_dict
from ..data.formats import load_dataset_file
from ..data.math_problems import generate, write_jsonl
from ..data.tokenize import stop_tokens
from ..generation import SampleConfig
from ..generation.engines import make_engine
from ..rl.rewards import parse_reward
from .prefs import generate_responses
from .stages import build_ppo, run_stage

log = logging.getLogger("frugal_rlhf")


@dataclass
class MathRecipeConfig:
    model: str = "default"
    output: str = "runs/math"
    level: int = 2                 # data/math_problems.py: 2 = two-digit addition
    train_problems: int = 2000
    eval_problems: int = 200       # held-out problems for accuracy before -> after
    seed: int = 0
    dtype: str = "auto"
    max_new_tokens: int = 12       # for the accuracy measurement (training: ppo.max_new_tokens)
    eval_batch_size: int = 50
    ppo: dict = field(default_factory=dict)  # PPOConfig fields


def load_recipe_config(path, overrides: dict) -> MathRecipeConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(MathRecipeConfig, data, source=str(path))


def accuracy(trainer, rows, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy answers of the trainer's actor to `rows` by its own weights: strict and lenient
    correctness per row, judged by the math reward functions themselves (what training rewards is
    what is measured). Not by the rollout engine: a greedy answer flips where two tokens' logits
    are within rounding, so another engine's numbers would measure the engine along with the model."""
    tok = trainer.tokenizer
    cfg = SampleConfig(max_new_tokens, 0.0, 0, 1.0, stop_tokens(tok), tok.pad_token_id)
    engine = make_engine("torch", autocast=trainer.strategy.autocast)
    answers = generate_responses(engine, trainer.policy(), tok, [r["prompt"] for r in rows], cfg, batch_size,
                                 256, 0, trainer.strategy.device)
    correct = lambda spec: parse_reward(spec).fn(None, answers, rows, None)  # noqa: E731
    return {"strict": correct("math:strict"), "lenient": correct("math"), "answers": answers}


def _mean_se(xs) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def compare(before: dict, after: dict) -> dict:
    """Accuracy before and after with standard errors; the change's SE is paired (same problems)."""
    out = {}
    for mode in ("strict", "lenient"):
        b, a = before[mode], after[mode]
        (mb, sb), (ma, sa) = _mean_se(b), _mean_se(a)
        diff, sd = _mean_se([y - x for x, y in zip(b, a)])
        out[mode] = {"before": mb, "before_se": sb, "after": ma, "after_se": sa, "change": diff, "change_se": sd}
    return out


def verdict(result: dict) -> str:
    def significant(mode):
        r = result[mode]
        return r["change"] > 2 * r["change_se"] and r["change"] > 0
    if significant("lenient"):
        return "learned: lenient accuracy (right answers, whatever the form) rose by more than 2 standard errors"
    if significant("strict"):
        return "format only: strict accuracy rose while lenient stayed within 2 standard errors"
    return "no significant change (neither accuracy moved by more than 2 standard errors)"


def run_math_recipe(cfg: MathRecipeConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.output)
    train_file = write_jsonl(generate(cfg.train_problems, cfg.level, cfg.seed, "train"), out / "data" / "train.jsonl")
    test_file = write_jsonl(generate(cfg.eval_problems, cfg.level, cfg.seed, "test"), out / "data" / "test.jsonl")
    ppo = from_dict(PPOConfig, {"model": cfg.model, "dtype": cfg.dtype, "seed": cfg.seed, "output": str(out / "grpo"),
                                "prompts": str(train_file), "eval_data": str(test_file), "reward": ["math"],
                                **cfg.ppo}, source="recipe math: ppo")
    held_out = load_dataset_file(str(test_file), "prompt")
    before = {}

    def build(strategy, ppo_cfg):  # the trainer, and the accuracy before any update
        trainer = build_ppo(strategy, ppo_cfg)
        log.info("recipe math: held-out accuracy before training (%d problems, greedy)", len(held_out))
        before.update(accuracy(trainer, held_out, cfg.max_new_tokens, cfg.eval_batch_size))
        return trainer

    def report(strategy, trainer, metrics):
        trainer.run.plot(["reward", "reward_math", "response_length", "kl"], "rlvr.png", "GRPO on a verifiable reward")
        return metrics, accuracy(trainer, held_out, cfg.max_new_tokens, cfg.eval_batch_size)

    # run_stage: the stage's memory plan and strategy, as every other command
    metrics, after = run_stage(ppo, build, report)
    result = {"config": dataclasses.asdict(cfg), "n_eval": len(held_out), **compare(before, after),
              "wall_seconds": round(time.time() - t0, 1), "steps": len([m for m in metrics if m["step"] > 0])}
    result["verdict"] = verdict(result)
    result["correct"] = {mode: {"before": before[mode], "after": after[mode]} for mode in ("strict", "lenient")}
    result["examples"] = [{"prompt": r["prompt"][-1]["content"], "answer": r["answer"], "before": b, "after": a}
                          for r, b, a in list(zip(held_out, before["answers"], after["answers"]))[:8]]
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(result, metrics))
    return result


def report_markdown(result: dict, metrics: list[dict]) -> str:
    steps = [m for m in metrics if m["step"] > 0]
    lines = [f"# Math recipe: GRPO on a verifiable reward (level {result['config']['level']})", "",
             f"{result['steps']} steps, {result['n_eval']} held-out problems (greedy), "
             f"wall time {result['wall_seconds'] / 60:.1f} min, rollouts sampled by the "
             f"{result['config']['ppo'].get('rollout_engine', 'torch')} engine, accuracy by the trained weights "
             "(the torch engine).", "",
             "| accuracy | before | after | change |", "|---|---|---|---|"]
    for mode in ("strict", "lenient"):
        r = result[mode]
        lines.append(f"| {mode} | {r['before']:.3f} ± {r['before_se']:.3f} | {r['after']:.3f} ± {r['after_se']:.3f} "
                     f"| {r['change']:+.3f} ± {r['change_se']:.3f} |")
    lines += ["", "± one standard error; the change's is paired (the same problems before and after).", "",
              f"**Verdict:** {result['verdict']}.", ""]
    if steps:
        edge = max(1, min(5, len(steps) // 4))
        first, last = steps[:edge], steps[-edge:]
        lines.append(f"Over training (means of the first and last {edge} steps):")
        lines.append("")
        # the engine's log-probs against the trainer's, and the importance weights correcting for them
        for key in ("reward", "reward_math", "response_length", "kl", "gen_logprob_mismatch_mean", "gen_kl",
                    "tis_weight_mean", "tis_clipped_frac"):
            if all(key in m for m in first + last):
                lines.append(f"- {key}: {sum(m[key] for m in first) / edge:.3f} -> {sum(m[key] for m in last) / edge:.3f}")
    lines += ["", "![training](grpo/rlvr.png)", "", "## Examples (held-out)", "",
              "| problem | answer | before | after |", "|---|---|---|---|"]
    for ex in result["examples"]:
        cells = [ex["prompt"], ex["answer"], ex["before"], ex["after"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
