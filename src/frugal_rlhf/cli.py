"""`frugal` command line: flags and an optional YAML file map onto the stage dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing

from .config import STAGE_CONFIGS, from_dict, load_yaml
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


def make_strategy(cfg):
    from .strategies import make_strategy as build

    return build(cfg.strategy, seed=cfg.seed, dtype=cfg.dtype, zero_stage=cfg.zero_stage, offload=cfg.offload)


def cmd_sft(args):
    from .trainers.supervised import SFTTrainer

    cfg = config_from_args(STAGE_CONFIGS["sft"], args)
    strategy = make_strategy(cfg)
    strategy.setup_distributed()
    try:
        metrics = SFTTrainer(strategy, cfg).fit()
        if metrics:
            first, last = metrics[0], metrics[-1]
            print(f"sft: {len(metrics)} steps, loss {first['loss']:.4f} -> {last['loss']:.4f}"
                  + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
                  + f"; model in {cfg.output}/final")
    finally:
        strategy.cleanup()


COMMANDS = {
    "sft": (cmd_sft, "supervised fine-tuning on demonstrations", "sft"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="frugal", description="The whole RLHF process at the lowest cost.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, stage) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if stage:
            add_config_flags(p, STAGE_CONFIGS[stage])
        p.set_defaults(fn=fn)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if args.verbose:
            raise
        print(f"frugal {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
