"""`frugal` command line: flags and an optional YAML file map onto the stage dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

from .config import STAGE_CONFIGS, from_dict, load_yaml
from .errors import FrugalError
from .runlog import setup_logging

log = logging.getLogger("frugal_rlhf")


def _field_type(f):
    tp = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {})  # noqa: S307 (our own annotations)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_config_flags(parser, cls):
    """One --flag per dataclass field; unset flags stay None so YAML/defaults fill them."""
    parser.add_argument("--config", help="YAML file with field: value pairs (flags override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _field_type(f)
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(tp) is list:  # repeatable: --reward math --reward format:...=0.2
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="SPEC",
                                help="repeatable")
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, metavar=tp.__name__.upper(),
                                help=f"default: {f.default}")


def config_from_args(cls, args):
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return from_dict(cls, data, source=getattr(args, "config", None) or "flags")


def cmd_sft(args):
    from .trainers.supervised import SFTTrainer

    cfg, metrics = _run_stage(STAGE_CONFIGS["sft"], SFTTrainer, args)
    steps = [m for m in metrics if m["step"] > 0]
    if steps:
        from .app.report import edge_window, first_mean, last_mean

        held_out = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        # single steps are one batch each: means of a few steps at each end say more
        print(f"sft: {len(steps)} steps, training loss {first_mean(steps, 'loss'):.4f} -> {last_mean(steps, 'loss'):.4f} "
              f"(means of the first and last {edge_window(len(steps))} steps)"
              + (f", held-out loss {held_out[0]:.4f} -> {held_out[-1]:.4f}" if len(held_out) > 1 else "")
              + f"; model in {cfg.output}/final")


def _run_stage(cls, build, args):
    from .app.stages import run_stage

    cfg = config_from_args(cls, args)
    return cfg, run_stage(cfg, build)


def cmd_rm(args):
    from .trainers.reward import RewardTrainer

    cfg = config_from_args(STAGE_CONFIGS["rm"], args)
    if cfg.eval_only:
        return _rm_eval_only(cfg)
    cfg, metrics = _run_stage(STAGE_CONFIGS["rm"], RewardTrainer, args)
    if metrics:
        result = json.loads((Path(cfg.output) / "eval.json").read_text())
        if result["accuracy"] is None:  # --eval-split 0 (or too few rows to hold any out)
            print(f"rm: held-out accuracy not measured (no held-out pairs); reward model in {cfg.output}")
            return
        print(f"rm: held-out accuracy {result['accuracy']:.3f} on {result['n_pairs']} pairs, mean margin "
              f"{result['mean_margin']:.3f}; reward model in {cfg.output}")


def _rm_eval_only(cfg):
    from .data.formats import load_dataset_file
    from .device import default_device
    from .models.reward_io import load_reward_model
    from .trainers.reward import evaluate_reward_model

    rm = load_reward_model(cfg.model).to(default_device())
    rows = load_dataset_file(cfg.data, "preference", cfg.skip_bad_rows, cfg.max_rows)
    result = evaluate_reward_model(rm, rows, cfg.max_length, cfg.batch_size)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"rm eval: accuracy {result['accuracy']:.3f} on {result['n_pairs']} pairs, mean margin "
          f"{result['mean_margin']:.3f} -> {cfg.output}/eval.json")


def cmd_ppo(args):
    from .trainers.ppo import PPOTrainer

    cfg, metrics = _run_stage(STAGE_CONFIGS["ppo"], PPOTrainer.from_config, args)
    if metrics:
        ev = [m for m in metrics if "eval_reward" in m]
        train = [m for m in metrics if "reward" in m]
        print(f"ppo: {len(train)} steps, reward {train[0]['reward']:.3f} -> {train[-1]['reward']:.3f}, KL "
              f"{train[-1]['kl']:.3f}" + (f"; held-out reward {ev[0]['eval_reward']:.3f} -> {ev[-1]['eval_reward']:.3f}"
                                         if len(ev) > 1 else "") + f"; policy in {cfg.output}/final")


def cmd_dpo(args, stage="dpo"):
    from .trainers.preference import PreferenceTrainer

    cfg, metrics = _run_stage(STAGE_CONFIGS[stage], PreferenceTrainer, args)
    if metrics:
        result = json.loads((Path(cfg.output) / "eval.json").read_text())
        start = next((m["eval_accuracy"] for m in metrics if "eval_accuracy" in m), None)
        accuracy = f"{start:.3f} -> {result['accuracy']:.3f}" if result["accuracy"] is not None else "n/a"
        print(f"{cfg.loss}: {len([m for m in metrics if m['step'] > 0])} steps, held-out implicit-reward accuracy "
              f"{accuracy} on {result['n_held_out']} {'pairs' if cfg.loss != 'kto' else 'rows'}; "
              f"model in {cfg.output}/final")


def cmd_kto(args):
    cmd_dpo(args, stage="kto")


def add_preference_aliases(p):
    """The names the papers (and other frameworks) use, beside our field names."""
    p.add_argument("--gamma", dest="simpo_gamma", type=float, default=argparse.SUPPRESS, help="= --simpo-gamma")
    p.add_argument("--lambda", dest="orpo_lambda", type=float, default=argparse.SUPPRESS, help="= --orpo-lambda")


def add_prefs_args(p):
    p.add_argument("--model", default="runs/sft/final", help="the SFT model whose samples are ranked")
    p.add_argument("--prompts", default="sharegpt", help="prompts (conversations with answers for --labeler reference)")
    p.add_argument("--labeler", default="contrast", choices=["contrast", "reference", "gold"],
                   help="simulated labeler (docs/preferences.md): contrast = normal vs high-temperature sample; "
                        "reference = dataset answer vs sample; gold = samples ranked by the hidden gold scorer")
    p.add_argument("--label-agreement", type=float, default=0.72,
                   help="gold labeler: probability that a random pair's label follows the gold order (human raters: "
                        "~0.73)")
    p.add_argument("--label-noise", default="thurstone", choices=["thurstone", "flip"],
                   help="gold labeler: thurstone = noisy perception of each answer (errs on close calls); flip = "
                        "any label flipped with the same probability")
    p.add_argument("--samples-per-prompt", type=int, default=2,
                   help="gold labeler: answers sampled a prompt; the pair is the labeler's first against its last")
    p.add_argument("--output", default="prefs.jsonl")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--contrast-temperature", type=float, default=1.2, help="temperature of the rejected sample")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")


def cmd_prefs(args):
    from .data.formats import load_dataset_file
    from .device import autocast, compute_dtype, default_device
    from .models.loading import load_model
    from .app.prefs import build_pairs

    device = default_device()
    dtype = compute_dtype(device, args.dtype)
    model, tok = load_model(args.model, dtype)
    rows = load_dataset_file(args.prompts, "prompt", limit=args.num_prompts * 2)
    rows = [r for r in rows if r.get("reference") or args.labeler != "reference"][: args.num_prompts]
    summary = build_pairs(model.to(device), tok, rows, args.output, args.labeler, args.max_new_tokens,
                          args.temperature, args.top_p, args.contrast_temperature, args.batch_size, seed=args.seed,
                          device=device, autocast=autocast(device, dtype), label_agreement=args.label_agreement,
                          label_noise=args.label_noise, samples_per_prompt=args.samples_per_prompt)
    print(f"prefs: {summary['pairs']} pairs from {summary['prompts']} prompts in {summary['seconds']} s "
          f"({summary['pairs_per_s']} pairs/s) -> {args.output}")


def add_pipeline_args(p):
    p.add_argument("--config", help="pipeline YAML (see configs/example.yaml)")
    p.add_argument("--output")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test in ~1 minute")
    p.add_argument("--method", choices=["ppo", "dpo"], help="ppo: RM -> PPO (default); dpo: DPO on the pairs")
    p.add_argument("--seed", type=int, help="overrides the config's seed (every stage)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="overrides the config's compute dtype")
    p.add_argument("--quantize-base", choices=["none", "int8", "nf4", "int4"],
                   help="every stage's frozen base stored quantized (QLoRA); overrides the config's")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="every trained stage recomputes activations in backward: less memory, more time")
    p.add_argument("--report-to", help="experiment trackers of every stage: tensorboard,wandb,mlflow or none")


def cmd_pipeline(args, default_config=None):
    from .app.pipeline import Pipeline, load_pipeline_config, packaged_config

    path = args.config or (packaged_config("quick" if args.quick else default_config) if default_config or
                           args.quick else None)
    if path is None:
        raise ValueError("frugal pipeline needs --config FILE (see configs/example.yaml)")
    Pipeline(load_pipeline_config(path, {"output": args.output, "method": args.method, "seed": args.seed,
                                         "dtype": args.dtype, "quantize_base": args.quantize_base,
                                         "gradient_checkpointing": args.gradient_checkpointing,
                                         "report_to": args.report_to})).run()


def cmd_demo(args):
    if not args.output:
        args.output = "runs/demo-quick" if args.quick else "runs/demo"
    cmd_pipeline(args, default_config="demo")


def add_eval_args(p):
    p.add_argument("--model", required=True)
    p.add_argument("--baseline", required=True, help="the model to compare against (and the KL reference)")
    p.add_argument("--prompts", default="held-out",
                   help="a prompt file, or held-out: the held-out prompts of the run the model belongs to")
    p.add_argument("--reward-model", help="default: the rm/ of the model's run directory")
    p.add_argument("--output", help="directory for eval.json and eval.md (default: beside --model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", default="auto")


def _run_dir_of(model: str) -> Path:
    """runs/demo/ppo/final -> runs/demo (the directory holding data/held_out.jsonl)."""
    for parent in Path(model).resolve().parents:
        if (parent / "data" / "held_out.jsonl").exists():
            return parent
    raise FileNotFoundError(f"no run directory with data/held_out.jsonl above {model}; pass --prompts FILE")


def cmd_eval(args):
    from .data.formats import load_dataset_file
    from .device import autocast, compute_dtype, default_device
    from .app.evaluation import compare_models, load_policy, summary_markdown, write_comparison
    from .data.tokenize import stop_tokens
    from .generation import SampleConfig
    from .models.reward_io import load_reward_model

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
    summary = compare_models(model, baseline, tok, rm, rows, cfg, seed=args.seed, autocast=autocast(device, dtype))
    out = Path(args.output or Path(args.model).parent)
    write_comparison(summary, out, "eval")
    print(summary_markdown(summary))
    print(f"written: {out / 'eval.json'}, {out / 'eval.md'}")


def add_export_args(p):
    p.add_argument("model", help="a model spec: a run's final/ (or adapter/) directory, default, a .gguf file")
    p.add_argument("--gguf", required=True, metavar="FILE", help="write a GGUF file (llama.cpp, Ollama, LM Studio)")
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0"],
                   help="weight format (norms stay f32): f16 ~ the trained model; q8_0 half its size; q4_0 a quarter")
    p.add_argument("--trust-remote-code", action="store_true")


def cmd_export(args):
    from .models.gguf_writer import write_gguf
    from .models.loading import load_model

    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    name = Path(args.model).parent.name if Path(args.model).name in ("final", "adapter") else Path(args.model).stem
    path = write_gguf(model.config, ((k, lambda v=v: v) for k, v in model.state_dict().items()), tok, args.gguf,
                      args.quant, name=name)
    print(f"export: {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.quant})")


def add_data_args(p):
    p.add_argument("kind", choices=["math"], help="math: arithmetic word problems with exact answers")
    p.add_argument("--n", type=int, default=2000, help="number of distinct problems")
    p.add_argument("--level", type=int, default=2, help="1 one-digit addition, 2 two-digit addition, 3 addition or "
                   "subtraction story, 4 multiplication story, 5 two steps")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="decided by a hash of each problem: the splits never overlap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="math.jsonl")


def cmd_data(args):
    from .data.math_problems import generate, write_jsonl

    path = write_jsonl(generate(args.n, args.level, args.seed, args.split), args.output)
    print(f"data math: {args.n} level-{args.level} {args.split} problems -> {path}")


def add_recipe_args(p):
    p.add_argument("name", choices=["math"], help="math: GRPO with a verifiable reward on arithmetic problems")
    p.add_argument("--config", help="recipe YAML (default: the packaged configs/rlvr-math.yaml)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test")
    p.add_argument("--output")
    p.add_argument("--model")
    p.add_argument("--level", type=int)
    p.add_argument("--eval-problems", type=int)
    p.add_argument("--max-steps", type=int, help="GRPO steps (the recipe's ppo.max_steps)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype")


def cmd_recipe(args):
    from .app.pipeline import packaged_config
    from .app.recipes import load_recipe_config, run_math_recipe

    path = args.config or packaged_config("rlvr-math-quick" if args.quick else "rlvr-math")
    cfg = load_recipe_config(path, {"output": args.output, "model": args.model, "level": args.level,
                                    "eval_problems": args.eval_problems, "seed": args.seed, "dtype": args.dtype})
    if args.max_steps:
        cfg.ppo = {**cfg.ppo, "max_steps": args.max_steps}
    r = run_math_recipe(cfg)
    print(" ".join(f"{m} accuracy {r[m]['before']:.3f} -> {r[m]['after']:.3f} ({r[m]['change']:+.3f} ± "
                   f"{r[m]['change_se']:.3f});" for m in ("strict", "lenient"))
          + f" {r['verdict']}; {r['n_eval']} held-out problems, {r['wall_seconds'] / 60:.1f} min; "
          f"report in {cfg.output}/report.md")


def _serve(args):
    from .serve.command import cmd_serve

    cmd_serve(args)


def _chat(args):
    from .app.chat import cmd_chat

    cmd_chat(args)


def _bench(args):
    from .bench.command import cmd_bench

    cmd_bench(args)


def _bench_args(p):
    from .bench.command import add_bench_args

    add_bench_args(p)


def _serve_args(p):
    from .serve.command import add_serve_args

    add_serve_args(p)


def _chat_args(p):
    from .app.chat import add_chat_args

    add_chat_args(p)


# name -> (function, help, stage config or a function adding arguments)
COMMANDS = {
    "sft": (cmd_sft, "supervised fine-tuning on demonstrations", "sft"),
    "rm": (cmd_rm, "train (or --eval-only: score) a reward model on ranked pairs", "rm"),
    "dpo": (cmd_dpo, "offline preference optimization on pairs: --loss dpo|ipo|cdpo|simpo|orpo|kto", "dpo"),
    "kto": (cmd_kto, "KTO on unpaired rows (prompt, completion, label) or on pairs", "kto"),
    "prefs": (cmd_prefs, "build preference pairs with the simulated labeler", add_prefs_args),
    "ppo": (cmd_ppo, "PPO against a reward model, four roles on one base", "ppo"),
    "pipeline": (cmd_pipeline, "SFT -> prefs -> RM -> PPO -> report from one YAML", add_pipeline_args),
    "demo": (cmd_demo, "the whole pipeline on the embedded default model and data", add_pipeline_args),
    "eval": (cmd_eval, "compare a model with a baseline on held-out prompts", add_eval_args),
    "export": (cmd_export, "write a model as a GGUF file for llama.cpp and Ollama", add_export_args),
    "data": (cmd_data, "generate data: arithmetic problems with exact answers (held-out split apart)", add_data_args),
    "recipe": (cmd_recipe, "recipes: math = GRPO on a verifiable reward, accuracy before -> after", add_recipe_args),
    "chat": (_chat, "chat with a model in the terminal", _chat_args),
    "serve": (_serve, "OpenAI-compatible HTTP API and a web chat page", _serve_args),
    "bench": (_bench, "throughput and peak memory per stage (table + JSON)", _bench_args),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="frugal", description="The whole RLHF process at the lowest cost.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, stage) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if isinstance(stage, str):
            add_config_flags(p, STAGE_CONFIGS[stage])
            p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                           help="start N processes on this machine with torchrun (with --strategy ddp|fsdp|deepspeed)")
            if stage in ("dpo", "kto"):
                add_preference_aliases(p)
        else:
            stage(p)
        p.set_defaults(fn=fn, config_stage=stage if isinstance(stage, str) else None)
    return parser


def launch_torchrun(args, argv) -> int:
    """`frugal STAGE --nproc-per-node N ...` = `torchrun --standalone --nproc_per_node N -m
    frugal_rlhf.cli STAGE ...`: the same command, one process per rank."""
    if config_from_args(STAGE_CONFIGS[args.config_stage], args).strategy == "naive":
        raise ValueError("--nproc-per-node needs a distributed strategy: add --strategy ddp, fsdp or deepspeed")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(args.nproc_per_node), "-m", "frugal_rlhf.cli", *rest]
    return subprocess.run(cmd).returncode


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if args.config_stage and (args.nproc_per_node or 1) > 1 and "WORLD_SIZE" not in os.environ:
        try:
            return launch_torchrun(args, argv)
        except ValueError as e:
            print(f"frugal {args.command}: error: {e}", file=sys.stderr)
            return 2
    try:
        args.fn(args)
    except FrugalError as e:  # a complete one-line explanation from below (errors.py)
        if args.verbose:
            raise
        print(f"frugal {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, KeyError, OSError) as e:  # bad input, or the OS refusing a path (it names the path)
        if args.verbose:
            raise
        print(f"frugal {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__  # an OSError's text names its path


if __name__ == "__main__":
    sys.exit(main())
