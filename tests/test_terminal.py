"""What a command prints: no library deprecation warnings unless -v, and progress rows that
keep every column when stderr is a file (a log, CI)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import arithmetic_rows

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(tmp_path, *flags):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(16)))
    # LoRA + activation checkpointing: the path where transformers and peft warned on every run
    cmd = [sys.executable, "-m", "frugal_rlhf.cli", *flags, "sft", "--model", "tiny-llama", "--data", str(data),
           "--output", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "4", "--save-every", "0",
           "--lora-rank", "4", "--gradient-checkpointing", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(tmp_path / "stderr.txt", "w") as err:  # a file, not a terminal
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=600)
    assert done.returncode == 0
    return (tmp_path / "stderr.txt").read_text()


def test_no_library_warnings_and_whole_progress_rows_in_a_log(tmp_path):
    err = run_cli(tmp_path)
    assert "Warning" not in err and "warnings.warn" not in err, err
    (row,) = [line for line in err.splitlines() if line.startswith("sft ")]
    assert "…" not in row and "ETA" in row and "loss=" in row, row


def test_verbose_shows_the_library_warnings(tmp_path):
    err = run_cli(tmp_path, "-v")
    assert "FutureWarning" in err  # peft still asks transformers' deprecated is_gradient_checkpointing
