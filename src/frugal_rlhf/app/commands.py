"""What each `frugal` command does once its arguments are parsed (cli.py parses them): a stage
command gets its stage config, the others the parsed arguments. Each prints a one-line summary."""
from __future__ import annotations

import json
from pathlib import Path

from ..data.formats import load_dataset_file
from ..data.math_problems import generate, write_jsonl
from ..data.tokenize import stop_tokens
from ..device import autocast, compute_dtype, default_device
from ..engine_choice import check_engine
from ..generation import SampleConfig
from ..models.gguf_writer import write_gguf
from ..models.loading import load_model
from ..models.reward_io import load_reward_model
from ..rl.algorithms import preference_loss
from ..trainers.preference import PreferenceTrainer
from ..trainers.reward import RewardTrainer, evaluate_reward_model
from ..trainers.supervised import SFTTrainer
from .evaluation import compare_models, load_policy, sampling_engine, summary_markdown, write_comparison
from .pipeline_config import packaged_config
from .prefs import build_pairs
from .recipes import load_recipe_config, run_math_recipe
from .report import edge_window, first_mean, last_mean
from .stages import build_ppo, run_stage


def cmd_sft(cfg):
    metrics = run_stage(cfg, SFTTrainer)
    steps = [m for m in metrics if m["step"] > 0]
    if steps:
        held_out = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        # single steps are one batch each: means of a few steps at each end say more
        print(f"sft: {len(steps)} steps, training loss {first_mean(steps, 'loss'):.4f} -> {last_mean(steps, 'loss'):.4f} "
              f"(means of the first and last {edge_window(len(steps))} steps)"
              + (f", held-out loss {held_out[0]:.4f} -> {held_out[-1]:.4f}" if len(held_out) > 1 else "")
              + f"; model in {cfg.output}/final")


def cmd_rm(cfg):
    if cfg.eval_only:
        return _rm_eval_only(cfg)
    if run_stage(cfg, RewardTrainer):
        result = json.loads((Path(cfg.output) / "eval.json").read_text())
        if result["accuracy"] is None:  # --eval-split 0 (or too few rows to hold any out)
            print(f"rm: held-out accuracy not measured (no held-out pairs); reward model in {cfg.output}")
            return
        print(f"rm: held-out accuracy {result['accuracy']:.3f} on {result['n_pairs']} pairs, mean margin "
              f"{result['mean_margin']:.3f}; reward model in {cfg.output}")


def _rm_eval_only(cfg):
    rm = load_reward_model(cfg.model).to(default_device())
    rows = load_dataset_file(cfg.data, "preference", cfg.skip_bad_rows, cfg.max_rows)
    result = evaluate_reward_model(rm, rows, cfg.max_length, cfg.batch_size)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"rm eval: accuracy {result['accuracy']:.3f} on {result['n_pairs']} pairs, mean margin "
          f"{result['mean_margin']:.3f} -> {cfg.output}/eval.json")


def cmd_ppo(cfg):
    metrics = run_stage(cfg, build_ppo)
    if metrics:
        ev = [m for m in metrics if "eval_reward" in m]
        train = [m for m in metrics if "reward" in m]
        print(f"ppo: {len(train)} steps, reward {train[0]['reward']:.3f} -> {train[-1]['reward']:.3f}, KL "
              f"{train[-1]['kl']:.3f}" + (f"; held-out reward {ev[0]['eval_reward']:.3f} -> {ev[-1]['eval_reward']:.3f}"
                                         if len(ev) > 1 else "") + f"; policy in {cfg.output}/final")


def cmd_dpo(cfg):
    """DPO and its family, KTO included (`frugal kto` is this command with the KTO defaults)."""
    metrics = run_stage(cfg, PreferenceTrainer)
    if metrics:
        result = json.loads((Path(cfg.output) / "eval.json").read_text())
        start = next((m["eval_accuracy"] for m in metrics if "eval_accuracy" in m), None)
        accuracy = f"{start:.3f} -> {result['accuracy']:.3f}" if result["accuracy"] is not None else "n/a"
        print(f"{cfg.loss}: {len([m for m in metrics if m['step'] > 0])} steps, held-out implicit-reward accuracy "
              f"{accuracy} on {result['n_held_out']} {'pairs' if preference_loss(cfg.loss).paired else 'rows'}; "
              f"model in {cfg.output}/final")


def cmd_prefs(args):
    check_engine(args.rollout_engine)  # a missing extra says so before the model loads
    device = default_device()
    dtype = compute_dtype(device, args.dtype)
    model, tok = load_model(args.model, dtype)
    rows = load_dataset_file(args.prompts, "prompt", limit=args.num_prompts * 2)
    rows = [r for r in rows if r.get("reference") or args.labeler != "reference"][: args.num_prompts]
    engine = sampling_engine(args.rollout_engine, args.rollout_quant, tok, device, dtype)
    try:
        summary = build_pairs(model.to(device), tok, rows, args.output, args.labeler, args.max_new_tokens,
                              args.temperature, args.top_p, args.contrast_temperature, args.batch_size, seed=args.seed,
                              device=device, label_agreement=args.label_agreement, label_noise=args.label_noise,
                              samples_per_prompt=args.samples_per_prompt, engine=engine)
    finally:
        engine.close()
    print(f"prefs: {summary['pairs']} pairs from {summary['prompts']} prompts in {summary['seconds']} s "
          f"({summary['pairs_per_s']} pairs/s) -> {args.output}")


def _run_dir_of(model: str) -> Path:
    """runs/demo/ppo/final -> runs/demo (the directory holding data/held_out.jsonl)."""
    for parent in Path(model).resolve().parents:
        if (parent / "data" / "held_out.jsonl").exists():
            return parent
    raise FileNotFoundError(f"no run directory with data/held_out.jsonl above {model}; pass --prompts FILE")


def cmd_eval(args):
    check_engine(args.rollout_engine)
    prompts = str(_run_dir_of(args.model) / "data" / "held_out.jsonl") if args.prompts == "held-out" else args.prompts
    rm_path = args.reward_model or str(_run_dir_of(args.model) / "rm")
    device = default_device()
    dtype = compute_dtype(device, args.dtype)
    model, tok = load_policy(args.model, dtype)
    baseline, _ = load_policy(args.baseline, dtype)
    rm = load_reward_model(rm_path, dtype=dtype)
    for m in (model, baseline, rm):
        m.to(device).eval()
    cfg = SampleConfig(args.max_new_tokens, args.temperature, 0, 0.95, stop_tokens(tok), tok.pad_token_id)
    rows = load_dataset_file(prompts, "prompt")
    engine = sampling_engine(args.rollout_engine, args.rollout_quant, tok, device, dtype)
    try:
        summary = compare_models(model, baseline, tok, rm, rows, cfg, seed=args.seed, autocast=autocast(device, dtype),
                                 engine=engine)
    finally:
        engine.close()
    out = Path(args.output or Path(args.model).parent)
    write_comparison(summary, out, "eval")
    print(summary_markdown(summary))
    print(f"written: {out / 'eval.json'}, {out / 'eval.md'}")


def cmd_export(args):
    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    name = Path(args.model).parent.name if Path(args.model).name in ("final", "adapter") else Path(args.model).stem
    path = write_gguf(model.config, ((k, lambda v=v: v) for k, v in model.state_dict().items()), tok, args.gguf,
                      args.quant, name=name)
    print(f"export: {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.quant})")


def cmd_data(args):
    path = write_jsonl(generate(args.n, args.level, args.seed, args.split), args.output)
    print(f"data math: {args.n} level-{args.level} {args.split} problems -> {path}")


def cmd_recipe(args):
    path = args.config or packaged_config("rlvr-math-quick" if args.quick else "rlvr-math")
    cfg = load_recipe_config(path, {"output": args.output, "model": args.model, "level": args.level,
                                    "eval_problems": args.eval_problems, "seed": args.seed, "dtype": args.dtype})
    for field in ("max_steps", "rollout_engine", "rollout_quant"):  # the recipe's ppo section
        if getattr(args, field):
            cfg.ppo = {**cfg.ppo, field: getattr(args, field)}
    r = run_math_recipe(cfg)
    print(" ".join(f"{m} accuracy {r[m]['before']:.3f} -> {r[m]['after']:.3f} ({r[m]['change']:+.3f} ± "
                   f"{r[m]['change_se']:.3f});" for m in ("strict", "lenient"))
          + f" {r['verdict']}; {r['n_eval']} held-out problems, {r['wall_seconds'] / 60:.1f} min; "
          f"report in {cfg.output}/report.md")
