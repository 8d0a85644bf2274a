"""The run directory at its edges (issue 37), each fault as a hostile or clumsy user meets it:
bad numbers refused before anything loads, one run per directory, --overwrite and --resume
that never mix or lose runs, checkpoints that checksums guard, Ctrl-C, and a full disk."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import arithmetic_rows
from frugal_rlhf.config import SFTConfig
from frugal_rlhf.checkpoints import checkpoint_problem
from frugal_rlhf.errors import UserError
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.supervised import SFTTrainer
from test_run_safety import SRC, TINY, pref_rows, run_cli, sft, write_jsonl


def sft_args(tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(32))
    return ["sft", *TINY, "--data", data, "--output", out, "--eval-split", 0, *extra]


def start(args) -> subprocess.Popen:
    """`frugal ARGS` in another process (its own run, as a second user's would be)."""
    return subprocess.Popen([sys.executable, "-m", "frugal_rlhf.cli", *map(str, args)], text=True,
                            env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(proc, done, what):
    while not done():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
        time.sleep(0.05)


def steps_of(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- 1. numbers out of range: one line at parse time, nothing written --------------------------------
@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "1e38", "--lr must be in (0, 3.4e+37]"), ("--lr", "nan", "--lr must be a finite number"),
    ("--batch-size", "0", "--batch-size must be >= 1"), ("--batch-size", "-1", "--batch-size must be >= 1"),
    ("--grad-accum", "0", "--grad-accum must be >= 1"), ("--max-length", "0", "--max-length must be >= 2"),
    ("--max-length", "1", "--max-length must be >= 2"), ("--max-steps", "-3", "--max-steps must be >= 1"),
    ("--warmup-ratio", "2", "--warmup-ratio must be in [0, 1]"), ("--seed", "-1", "--seed must be in [0, "),
])
def test_out_of_range_flags_are_one_line_before_anything_is_written(tmp_path, capsys, flag, value, says):
    out = tmp_path / "out"
    code, _, errors = run_cli(capsys, *sft_args(tmp_path, out, "--max-steps", 2), flag, value)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"frugal sft: error: {says}"), errors
    assert not out.exists()


def test_yaml_and_the_python_api_meet_the_same_rules(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-4\nmax_steps: 1\nsave_every: 0\n")  # YAML reads 1e-4 (no dot) as a string
    code, _, errors = run_cli(capsys, *sft_args(tmp_path, tmp_path / "a"), "--config", cfg)
    assert code == 0 and not errors
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["lr"] == 1e-4
    cfg.write_text("grad_accum: 0\n")
    code, _, errors = run_cli(capsys, *sft_args(tmp_path, tmp_path / "b"), "--config", cfg)
    assert code == 2 and errors == [f"frugal sft: error: {cfg}: --grad-accum must be >= 1, not 0"]
    with pytest.raises(UserError, match="--batch-size must be >= 1, not 0"):
        SFTTrainer(NaiveStrategy(), SFTConfig(model="tiny-llama", output=str(tmp_path / "c"), batch_size=0),
                   rows=arithmetic_rows(8))


# ---- 2. one run per directory -----------------------------------------------------------------------
def test_a_running_directory_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    args = sft_args(tmp_path, out, "--save-every", 1, "--lr", 1e-3)
    first = start([*args, "--max-steps", 400])
    try:
        wait_for(first, lambda: (out / "checkpoints" / "step-0000002").exists(), "its second checkpoint")
        code, _, errors = run_cli(capsys, *args, "--max-steps", 400, "--resume")  # while the first still trains
        assert code == 2 and len(errors) == 1, errors
        assert f"{out} is in use by another run (pid {first.pid} on " in errors[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = max(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    caplog.set_level(logging.WARNING, "frugal_rlhf")
    code, _, errors = run_cli(capsys, *args, "--resume", "--max-steps", done + 2)
    assert code == 0 and not errors
    assert f"the run of pid {first.pid} on" in caplog.text and "ended without releasing its lock" in caplog.text
    assert steps_of(out) == list(range(1, done + 3))  # each step once, in order


# ---- 3. --overwrite removes the whole old run and never its own input ------------------------------
def test_overwrite_removes_the_old_runs_reference_log_probs(tmp_path, capsys):
    """A DPO run with --precompute-ref over another run of the same row count must not read the
    old run's table: it trains exactly as in an empty directory."""
    first, other = write_jsonl(tmp_path / "a.jsonl", pref_rows()), tmp_path / "b.jsonl"
    write_jsonl(other, [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in pref_rows()])
    args = ["dpo", *TINY, "--max-steps", 2, "--save-every", 0, "--eval-split", 0, "--precompute-ref",
            "--lora-rank", 4]
    assert run_cli(capsys, *args, "--data", first, "--output", tmp_path / "run")[0] == 0
    assert run_cli(capsys, *args, "--data", other, "--output", tmp_path / "run", "--overwrite")[0] == 0
    assert run_cli(capsys, *args, "--data", other, "--output", tmp_path / "fresh")[0] == 0
    for name in ("final/model.safetensors", "ref_logprobs.safetensors"):
        got, fresh = load_file(tmp_path / "run" / name), load_file(tmp_path / "fresh" / name)
        assert all(torch.equal(got[k], fresh[k]) for k in fresh), name


def test_a_run_never_reads_inside_its_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *sft_args(tmp_path, out, "--max-steps", 1, "--save-every", 0))[0] == 0
    before = load_file(out / "final" / "model.safetensors")
    code, _, errors = run_cli(capsys, *sft_args(tmp_path, out, "--max-steps", 1, "--save-every", 0, "--overwrite"),
                              "--model", out / "final")
    assert code == 2 and errors == [f"frugal sft: error: --model {out / 'final'} is inside --output {out}: the run "
                                    "would replace or (with --overwrite) delete what it reads; copy it elsewhere or "
                                    "choose another --output"]
    after = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    code, _, errors = run_cli(capsys, *sft_args(tmp_path, out / "final" / "more", "--max-steps", 1),
                              "--model", out / "final")
    assert code == 2 and "is inside --model" in errors[0]
    assert not (out / "final" / "more").exists()


# ---- 4. --resume: the same run wherever it is started from, and never a silent fresh start -------------
def test_resume_from_another_directory_and_into_a_mistyped_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(32))
    args = ["sft", *TINY, "--eval-split", 0, "--save-every", 1]
    assert run_cli(capsys, *args, "--output", "run", "--data", "sft.jsonl", "--max-steps", 2)[0] == 0
    monkeypatch.chdir(tmp_path / "run")  # another working directory: another spelling of the same file
    code, _, errors = run_cli(capsys, *args, "--output", tmp_path / "run", "--data", tmp_path / "sft.jsonl",
                              "--max-steps", 3, "--resume")
    assert code == 0 and not errors
    history = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["history"]
    assert history[-1]["changed"]["data"] == ["sft.jsonl", str(tmp_path / "sft.jsonl")]
    write_jsonl(tmp_path / "other.jsonl", arithmetic_rows(33))
    code, _, errors = run_cli(capsys, *args, "--output", tmp_path / "run", "--data", tmp_path / "other.jsonl",
                              "--max-steps", 4, "--resume")
    assert code == 2 and f"data {str(tmp_path / 'sft.jsonl')!r} -> {str(tmp_path / 'other.jsonl')!r}" in errors[0]
    typo = tmp_path / "rnu"
    code, _, errors = run_cli(capsys, *args, "--output", typo, "--data", tmp_path / "sft.jsonl", "--resume")
    assert code == 2 and errors == [f"frugal sft: error: --resume: {typo} holds no run to resume (no such "
                                    "directory); check --output, or drop --resume"]
    assert not typo.exists()


# ---- 5. checkpoints carry checksums: a same-size corruption falls back ----------------------------------
def scramble(path: Path, where: str):
    data = bytearray(path.read_bytes())
    if where == "header":  # inside the JSON header of a safetensors file: swap two bytes of it
        i = data.index(b'"shape"')
        data[i + 1], data[i + 2] = data[i + 2], data[i + 1]
    elif where == "middle":
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(reversed(data[mid:mid + 64]))
    else:  # the last weights' bytes set to 0xff: NaN in fp32
        data[-256:] = b"\xff" * 256
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, where, legacy", [
    ("model.safetensors", "header", False), ("model.optim.pt", "middle", False),
    ("model.safetensors", "nan", False), ("model.safetensors", "nan", True),
])
def test_a_same_size_corruption_falls_back_to_the_previous_checkpoint(tmp_path, rows, caplog, name, where, legacy):
    """`legacy`: a checkpoint written before checksums (meta.json without them) whose weights
    turned to NaN: found by reading them, never trained on."""
    _, full = sft(tmp_path / "a", rows=rows, max_steps=6)
    sft(tmp_path / "b", rows=rows, max_steps=6, save_every=2, stop_at=4)
    ckpt = tmp_path / "b" / "sft" / "checkpoints" / "step-0000004"
    size = (ckpt / name).stat().st_size
    scramble(ckpt / name, where)
    assert (ckpt / name).stat().st_size == size
    if legacy:
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["xxh3_128"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    caplog.set_level(logging.WARNING, "frugal_rlhf")
    trainer, resumed = sft(tmp_path / "b", rows=rows, max_steps=6, save_every=2, resume=True)
    why = "holds non-finite or unreadable numbers" if legacy else "does not match its checksum"
    assert f"step-0000004 is incomplete or corrupt ({name} {why}" in caplog.text
    assert trainer.resume_from.name == "step-0000002"
    for a, b in zip(full[2:], resumed[2:]):  # resumed from step 2 and still the uninterrupted run
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


# ---- 6. Ctrl-C: the step finishes, its checkpoint is written, one line, exit 130 -----------------------
def test_ctrl_c_stops_after_the_steps_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = sft_args(tmp_path, out, "--save-every", 100, "--lr", 1e-3)
    proc = start([*args, "--max-steps", 400])
    wait_for(proc, lambda: (out / "metrics.jsonl").exists() and len(steps_of(out)) >= 3, "three steps")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step = steps_of(out)[-1]
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line or "Traceback" in line]
    assert lines == [f"frugal sft: error: interrupted after step {step}: its checkpoint is in {out / 'checkpoints'}; "
                     "continue with --resume"]
    assert checkpoint_problem(ckpt) is None and not (out / "final").exists()
    code, _, errors = run_cli(capsys, *args, "--resume", "--max-steps", step + 1)
    assert code == 0 and not errors and steps_of(out) == list(range(1, step + 2))


# ---- 7. a full disk: one line naming the path, nothing already written lost ----------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (root only): a full fine-tune of tiny-llama (--lora-rank 0) writes checkpoints of
    ~9.9 MB (3.3 MB weights, 6.6 MB Adam moments) and a 3.3 MB export: one checkpoint fits, two do
    not, nor a checkpoint and the export."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_mid_checkpoint_and_at_the_export(tmp_path, capsys, small_disk):
    out = small_disk / "ckpt"
    code, _, errors = run_cli(capsys, *sft_args(tmp_path, out, "--max-steps", 3, "--save-every", 1, "--lora-rank", 0))
    tmp = out / "checkpoints" / ".tmp-step-0000002"
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"frugal sft: error: could not write checkpoint "
                                                                   f"{tmp}: Error while serializing"), errors
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]
    assert checkpoint_problem(out / "checkpoints" / "step-0000001") is None
    shutil.rmtree(out)
    # the last checkpoint fits, the final export does not: one line naming it; more room, --resume finishes
    out = small_disk / "export"
    args = sft_args(tmp_path, out, "--max-steps", 2, "--save-every", 2, "--lora-rank", 0)
    code, _, errors = run_cli(capsys, *args)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"frugal sft: error: could not write the results into {out / 'final'}") and \
        "No space left on device" in errors[0] and "the checkpoints in" in errors[0]
    assert not list(out.glob(".tmp-*")) and checkpoint_problem(out / "checkpoints" / "step-0000002") is None
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    code, _, errors = run_cli(capsys, *args, "--resume")
    assert code == 0 and not errors and (out / "final" / "model.safetensors").exists()


def test_a_full_disk_in_a_checkpoints_safetensors_is_one_line(tmp_path, capsys, monkeypatch):
    """The same fault on any machine (no tmpfs): safetensors' own error type, not an OSError."""
    from safetensors import SafetensorError

    import frugal_rlhf.strategies.base as base

    calls = {"n": 0}
    real = base.save_file

    def full(state, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(state, path, *a, **k)

    monkeypatch.setattr(base, "save_file", full)
    out = tmp_path / "run"
    code, _, errors = run_cli(capsys, *sft_args(tmp_path, out, "--max-steps", 3, "--save-every", 1))
    assert code == 2 and len(errors) == 1 and "No space left on device" in errors[0]
    assert errors[0].startswith(f"frugal sft: error: could not write checkpoint {out / 'checkpoints'}")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]


def test_logs_follow_stderr_when_it_is_redirected_after_setup():
    """The handler is made once per process: bound to the stderr of that moment, a later
    redirect (a notebook, another test's capture) lost every log line."""
    import contextlib
    import io
    import logging

    from frugal_rlhf.runlog import log, setup_logging

    saved = log.handlers[:]
    log.handlers.clear()  # the handler this process's first setup makes: the one under test
    try:
        setup_logging(logging.INFO)
        first, second = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(first):
            log.warning("to the first")
        with contextlib.redirect_stderr(second):
            log.warning("to the second")
    finally:
        log.handlers[:] = saved
    assert "to the first" in first.getvalue() and "to the first" not in second.getvalue()
    assert "to the second" in second.getvalue()


def test_transformers_imported_after_logging_is_set_up_stays_quiet():
    """setup_logging no longer imports transformers (the pipeline's own process stays without
    it); transformers imported later still shows no per-load progress bars or advisories."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    code = ("import sys\nfrom frugal_rlhf.runlog import setup_logging\nsetup_logging()\n"
            "assert 'transformers' not in sys.modules\n"
            "from transformers.utils import logging\n"
            "print(logging.is_progress_bar_enabled(), logging.get_verbosity() == logging.ERROR)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_an_isolated_stage_stops_when_its_pipeline_is_killed(tmp_path):
    """A pipeline killed from outside (a scheduler's SIGKILL) left its stage's process training
    on as an orphan; the stage now dies with it."""
    pid_file = tmp_path / "stage.pid"
    script = tmp_path / "pipeline_like.py"
    script.write_text(
        "import os, sys, time\n"
        "from frugal_rlhf.app.pipeline import run_isolated\n"
        "def sleep_stage():\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    run_isolated('sleep', sleep_stage)\n")
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        stage = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while Path(f"/proc/{stage}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{stage}").exists(), "the stage outlived its pipeline"
    finally:
        parent.kill()
