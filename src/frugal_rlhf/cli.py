"""`frugal` command line: flags and an optional YAML file map onto the stage dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import types
import typing

from .config import STAGE_CONFIGS, from_dict, load_yaml
from .engine_choice import CHOICES, ROLLOUT_QUANTS
from .errors import FrugalError
from .runlog import setup_logging

log = logging.getLogger("frugal_rlhf")


def _field_type(f):
    tp = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {})  # noqa: S307 (our own annotations)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` gives each flag's help followed by its default (shown_default)."""

    def _get_help_string(self, action):
        text, default = action.help or "", shown_default(action)
        if default is None or text is argparse.SUPPRESS:
            return text
        return f"{text} (default: {str(default).replace('%', '%%')})".lstrip()


def shown_default(action):
    """What a flag is when not given: a config field's default (the flag's own default stays None,
    so that a YAML file can fill it) or argparse's; None: nothing to show."""
    default = getattr(action, "field_default", action.default)
    return None if default is argparse.SUPPRESS or default == [] else default


def add_config_flags(parser, cls):
    """One --flag per dataclass field, with the field's help; unset flags stay None so YAML/defaults fill them."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of field: value pairs, the flags' names with underscores (lora_rank: 8); "
                             "flags given too override it")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _field_type(f)
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help texts
        if tp is bool:
            action = parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                         help=text)
        elif typing.get_origin(tp) is list:  # repeatable: --reward math --reward format:...=0.2
            action = parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="SPEC", help=text)
        else:
            action = parser.add_argument(flag, dest=f.name, type=tp, default=None, metavar=tp.__name__.upper(),
                                         help=text)
        action.field_default = f.default


def config_from_args(cls, args):
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return from_dict(cls, data, source=getattr(args, "config", None) or "flags")


def add_preference_aliases(p):
    """The names the papers (and other frameworks) use, beside our field names."""
    p.add_argument("--gamma", dest="simpo_gamma", type=float, default=argparse.SUPPRESS,
                   help="the SimPO paper's name for --simpo-gamma")
    p.add_argument("--lambda", dest="orpo_lambda", type=float, default=argparse.SUPPRESS,
                   help="the ORPO paper's name for --orpo-lambda")


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
    p.add_argument("--output", default="prefs.jsonl", help="the JSONL file of pairs written (prompt, chosen, rejected)")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts to make pairs for (one pair each)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer sampled, in tokens")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature of the answers (contrast: of the chosen one)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of those answers; 1 = off")
    p.add_argument("--contrast-temperature", type=float, default=1.2,
                   help="contrast labeler: temperature of the rejected sample (no top-p cut)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts sampled together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 where fast, else fp32), bf16 or fp32")
    add_engine_args(p, default="torch")


def add_engine_args(p, default=None):
    """--rollout-engine and --rollout-quant of the commands that sample (the stage configs have them as fields)."""
    p.add_argument("--rollout-engine", default=default, choices=CHOICES,
                   help="what samples the answers: torch (ours), llamacpp, vllm (optional extras), auto (the fastest "
                        "installed for the device)" + (f"; default {default}" if default else ""))
    p.add_argument("--rollout-quant", default="f16" if default else None, choices=ROLLOUT_QUANTS,
                   help="llamacpp: its copy of the weights (base: the format nearest the base's --quantize-base)")


def add_pipeline_args(p):
    p.add_argument("--config", metavar="FILE", help="pipeline YAML: model, data, split and a section per stage "
                   "(configs/example.yaml); default: the packaged demo (demo) or quick (--quick) file")
    p.add_argument("--output", help="run directory (data/, sft/, prefs.jsonl, rm/, ppo/, report.md); default: the "
                   "config's (demo: runs/demo, --quick: runs/demo-quick)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test in ~1 minute")
    p.add_argument("--method", choices=["ppo", "dpo"], help="ppo: RM -> PPO; dpo: DPO on the pairs; default: the "
                   "config's (ppo)")
    p.add_argument("--seed", type=int, help="overrides the config's seed (every stage)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="overrides the config's compute dtype")
    p.add_argument("--quantize-base", choices=["none", "int8", "nf4", "int4"],
                   help="every stage's frozen base stored quantized (QLoRA); overrides the config's")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="every trained stage recomputes activations in backward: less memory, more time")
    p.add_argument("--memory-budget", help="every stage's memory plan: auto (what is free), a size (4GiB) or off; "
                   "overrides the config's (default: auto)")
    p.add_argument("--isolate-stages", action=argparse.BooleanOptionalAction, default=None,
                   help="run each stage in a process of its own (no heap carried from one stage to the next); "
                        "default: on with --quantize-base")
    p.add_argument("--report-to", help="experiment trackers of every stage: tensorboard,wandb,mlflow or none")
    p.add_argument("--advantage", help="the PPO stage's advantage estimator (gae: the critic; group: GRPO's, the "
                   "same samples); overrides the config's")
    add_engine_args(p)


def add_eval_args(p):
    p.add_argument("--model", required=True, help="the model to evaluate (e.g. runs/demo/ppo/final)")
    p.add_argument("--baseline", required=True, help="the model to compare against (and the KL reference)")
    p.add_argument("--prompts", default="held-out",
                   help="a prompt file, or held-out: the held-out prompts of the run the model belongs to")
    p.add_argument("--reward-model", help="the reward model scoring both; default: the rm/ of the model's run "
                   "directory")
    p.add_argument("--output", help="directory for eval.json and eval.md; default: beside --model")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer sampled, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of both models' answers")
    p.add_argument("--seed", type=int, default=1, help="sampling seed (the same for both models)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 where fast, else fp32), bf16 or fp32")
    add_engine_args(p, default="torch")


def add_export_args(p):
    p.add_argument("model", help="a model spec: a run's final/ (or adapter/) directory, default, a .gguf file")
    p.add_argument("--gguf", required=True, metavar="FILE", help="write a GGUF file (llama.cpp, Ollama, LM Studio)")
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0"],
                   help="weight format (norms stay f32): f16 ~ the trained model; q8_0 half its size; q4_0 a quarter")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code shipped with the model (only for a model you trust)")


def add_data_args(p):
    p.add_argument("kind", choices=["math"], help="math: arithmetic word problems with exact answers")
    p.add_argument("--n", type=int, default=2000, help="number of distinct problems")
    p.add_argument("--level", type=int, default=2, help="1 one-digit addition, 2 two-digit addition, 3 addition or "
                   "subtraction story, 4 multiplication story, 5 two steps")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="decided by a hash of each problem: the splits never overlap")
    p.add_argument("--seed", type=int, default=0, help="which problems are drawn")
    p.add_argument("--output", default="math.jsonl", help="the JSONL file written (prompt, answer)")


def add_recipe_args(p):
    p.add_argument("name", choices=["math"], help="math: GRPO with a verifiable reward on arithmetic problems")
    p.add_argument("--config", metavar="FILE", help="recipe YAML; default: the packaged configs/rlvr-math.yaml "
                   "(--quick: rlvr-math-quick.yaml)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test")
    p.add_argument("--output", help="run directory (data/, grpo/, result.json, report.md); default: the config's")
    p.add_argument("--model", help="model to train; default: the config's (default, SmolLM2-135M-Instruct)")
    p.add_argument("--level", type=int, help="problem level 1-5 (`frugal data --help`); default: the config's")
    p.add_argument("--eval-problems", type=int, help="held-out problems measured before and after; default: the "
                   "config's")
    p.add_argument("--max-steps", type=int, help="GRPO steps (the recipe's ppo.max_steps); default: the config's")
    p.add_argument("--seed", type=int, help="seed of the problems and of training; default: the config's")
    p.add_argument("--dtype", help="compute dtype: auto, bf16 or fp32; default: the config's")
    add_engine_args(p)


# name -> (what runs it, help, the stage config of its flags or what adds its arguments); "module:name"
# is imported only for the command being run (see _load).
COMMANDS = {
    "sft": ("app.commands:cmd_sft", "supervised fine-tuning on demonstrations", "sft"),
    "rm": ("app.commands:cmd_rm", "train (or --eval-only: score) a reward model on ranked pairs", "rm"),
    "dpo": ("app.commands:cmd_dpo", "offline preference optimization on pairs: --loss dpo|ipo|cdpo|simpo|orpo|kto",
            "dpo"),
    "kto": ("app.commands:cmd_dpo", "KTO on unpaired rows (prompt, completion, label) or on pairs", "kto"),
    "prefs": ("app.commands:cmd_prefs", "build preference pairs with the simulated labeler", add_prefs_args),
    "ppo": ("app.commands:cmd_ppo", "PPO against a reward model, four roles on one base", "ppo"),
    "pipeline": ("app.pipeline:cmd_pipeline", "SFT -> prefs -> RM -> PPO -> report from one YAML", add_pipeline_args),
    "demo": ("app.pipeline:cmd_demo", "the whole pipeline on the embedded default model and data", add_pipeline_args),
    "eval": ("app.commands:cmd_eval", "compare a model with a baseline on held-out prompts", add_eval_args),
    "export": ("app.commands:cmd_export", "write a model as a GGUF file for llama.cpp and Ollama", add_export_args),
    "data": ("app.commands:cmd_data", "generate data: arithmetic problems with exact answers (held-out split apart)",
             add_data_args),
    "recipe": ("app.commands:cmd_recipe", "recipes: math = GRPO on a verifiable reward, accuracy before -> after",
               add_recipe_args),
    "chat": ("app.chat:cmd_chat", "chat with a model in the terminal", "app.chat:add_chat_args"),
    "serve": ("serve.command:cmd_serve", "OpenAI-compatible HTTP API and a web chat page",
              "serve.command:add_serve_args"),
    "bench": ("bench.command:cmd_bench", "throughput and peak memory per stage (table + JSON)",
              "bench.command:add_bench_args"),
}


def _load(target: str):
    """"module:name" under this package, imported now. The one lazy import of the command line:
    the commands import torch and transformers, which `frugal --help`, a mistyped flag or
    `frugal sft --help` must not wait for."""
    module, name = target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


# What `frugal --help` lists, grouped by what the commands are for (each command once).
GROUPS = {"train": ("sft", "rm", "dpo", "kto", "ppo"), "data": ("data", "prefs"),
          "whole runs": ("pipeline", "demo", "recipe"), "use a model": ("eval", "chat", "serve", "export"),
          "measure": ("bench",)}


def _command_list() -> str:
    """The commands by group, one line of help each (wrapped at 100 columns)."""
    lines = []
    for group, names in GROUPS.items():
        lines.append(f"{group}:")
        lines += [textwrap.fill(COMMANDS[name][1], 100, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12)
                  for name in names]
    return "\n".join(lines)


def build_parser(command: str | None = None):
    """Every command is listed; only `command`'s arguments are added, so that parsing one
    command imports only what its own arguments need."""
    parser = argparse.ArgumentParser(prog="frugal", formatter_class=HelpFormatter,
                                     description="The whole RLHF process at the lowest cost.\n\n" + _command_list(),
                                     epilog="`frugal COMMAND --help` explains a command's flags; docs/commands.md "
                                            "lists every command's.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and the libraries' warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands above")
    for name, (target, help_text, stage) in COMMANDS.items():
        p = sub.add_parser(name, description=help_text, formatter_class=HelpFormatter)  # no help=: listed above
        p.set_defaults(target=target, config_stage=stage if stage in STAGE_CONFIGS else None)
        if name != command:
            continue
        if stage in STAGE_CONFIGS:
            add_config_flags(p, STAGE_CONFIGS[stage])
            p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                           help="start N processes on this machine with torchrun (with --strategy ddp|fsdp|deepspeed)")
            if stage in ("dpo", "kto"):
                add_preference_aliases(p)
        else:
            (_load(stage) if isinstance(stage, str) else stage)(p)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command, its arguments added."""
    sub = next(a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def commands_markdown() -> str:
    """docs/commands.md: every command's flags with their defaults and help, from the parsers
    themselves (`python -m frugal_rlhf.cli --markdown > docs/commands.md`)."""
    lines = ["# Commands", "",
             "Every `frugal` command and flag, with its default and meaning; `frugal COMMAND --help` prints the "
             "same.", "Generated from the command line by `python -m frugal_rlhf.cli --markdown > docs/commands.md` "
             "(a test fails when this page is out of date).", "",
             "The flags of the training stages (sft, rm, dpo, kto, ppo) are the fields of their config dataclasses "
             "(src/frugal_rlhf/config.py): `--config FILE` reads the same names, with underscores, from YAML "
             "(`lora_rank: 8`), and flags given too override the file.", ""]
    for group, names in GROUPS.items():
        lines += [f"## {group}", ""]
        for name in names:
            lines += [f"### frugal {name}", "", COMMANDS[name][1], "", "| flag | default | meaning |", "|---|---|---|"]
            for a in command_parser(name)._actions:
                if a.help is argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
                    continue
                value = "{" + ",".join(map(str, a.choices)) + "}" if a.choices else a.metavar or a.dest.upper()
                flag = ", ".join(a.option_strings) or a.dest
                flag += f" {value}" if a.nargs != 0 and (a.option_strings or a.choices) else ""
                default = shown_default(a)
                cells = (f"`{flag}`", "" if default is None else f"`{default}`", (a.help or "").replace("%%", "%"))
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            lines.append("")
    return "\n".join(lines)


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
    args = build_parser(next((a for a in argv if a in COMMANDS), None)).parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if args.config_stage and (args.nproc_per_node or 1) > 1 and "WORLD_SIZE" not in os.environ:
        try:
            return launch_torchrun(args, argv)
        except ValueError as e:
            print(f"frugal {args.command}: error: {e}", file=sys.stderr)
            return 2
    try:
        # A stage command gets its config (flags over YAML over defaults); the others their arguments.
        code = _load(args.target)(config_from_args(STAGE_CONFIGS[args.config_stage], args) if args.config_stage
                                  else args)
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
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, or pressed twice): nothing to save
        print(f"frugal {args.command}: interrupted", file=sys.stderr)
        return 130
    return code or 0  # chat and serve answer a refused argument with their exit code


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__  # an OSError's text names its path


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:  # writes docs/commands.md's text (tests/test_help.py checks the page)
        print(commands_markdown(), end="")
        sys.exit(0)
    sys.exit(main())
