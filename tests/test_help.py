"""The command line explains itself: every config field and every flag of every command has a
line of help, `--help` prints it with the default, `frugal --help` lists each command once
under its group, and docs/commands.md is the same text."""
import dataclasses
import re
from pathlib import Path

import pytest

from frugal_rlhf.cli import COMMANDS, GROUPS, build_parser, command_parser, commands_markdown, config_from_args
from frugal_rlhf.config import STAGE_CONFIGS, TrainConfig

PAGE = Path(__file__).resolve().parents[1] / "docs" / "commands.md"


def _says_something(text) -> bool:
    """A sentence, not a bare default ("default: 0") or a one-word note ("repeatable")."""
    return isinstance(text, str) and len(text.split()) >= 2 and not text.lstrip().startswith("default")


@pytest.mark.parametrize("cls", [TrainConfig, *STAGE_CONFIGS.values()], ids=lambda c: c.__name__)
def test_every_config_field_has_help(cls):
    # dataclasses.fields gives a subclass's own override (e.g. PPOConfig.max_steps), with its own help
    missing = [f.name for f in dataclasses.fields(cls) if not _says_something(f.metadata.get("help"))]
    assert not missing, f"{cls.__name__}: fields without help: {missing}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_flag_of_every_command_has_help(command):
    parser = build_parser() if command is None else command_parser(command)
    hidden_on_purpose = {"--api-key"}  # serve: a key on the command line shows in `ps` (--api-key-file instead)
    missing = [a.option_strings or a.dest for a in parser._actions
               if not set(a.option_strings) & hidden_on_purpose and not _says_something(a.help)]
    assert not missing, f"frugal {command or ''}: flags without help: {missing}"


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_stage_help_prints_each_fields_help_and_default(stage, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: argparse breaks lines at hyphens
    text = " ".join(command_parser(stage).format_help().split())
    for f in dataclasses.fields(STAGE_CONFIGS[stage]):
        flag = "--" + f.name.replace("_", "-")
        expected = f.metadata.get("help", "") + ("" if f.default is None else f" (default: {f.default})")
        assert re.search(re.escape(flag) + r"\b[^()]{0,80}?" + re.escape(expected), text), (stage, f.name)


def test_flag_defaults_stay_unset_so_a_yaml_file_can_fill_them(tmp_path):
    """The defaults shown in --help are the fields', not argparse defaults (which would
    override the YAML file)."""
    config = tmp_path / "rm.yaml"
    config.write_text("pooling: mean\nlora_rank: 8\n")
    args = build_parser("rm").parse_args(["rm", "--config", str(config), "--center-coef", "0.01"])
    cfg = config_from_args(STAGE_CONFIGS["rm"], args)
    assert (cfg.pooling, cfg.lora_rank, cfg.center_coef, cfg.loss) == ("mean", 8, 0.01, "logsigmoid")


def test_top_level_help_lists_every_command_once_by_group():
    text = build_parser().format_help()
    listed = [line.split()[0] for line in text.splitlines() if re.match(r"^  [a-z]+ {2,}\S", line)]
    assert sorted(listed) == sorted(COMMANDS) and len(listed) == len(set(listed)), listed
    for group, names in GROUPS.items():  # each under its group's heading, in order
        block = text.split(f"\n{group}:\n", 1)[1].splitlines()[:len(names)]
        assert [line.split()[0] for line in block] == list(names), (group, block)


def test_commands_page_is_up_to_date():
    assert PAGE.read_text() == commands_markdown(), (
        "docs/commands.md is out of date: python -m frugal_rlhf.cli --markdown > docs/commands.md")
