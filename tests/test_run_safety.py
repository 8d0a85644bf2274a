"""Runs that never lose work and never lie: non-finite guards, resume identity, run directories,
OS and data faults, each as a user meets it (the CLI's exit code and one-line error)."""
import json
import logging
import math
import os
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
from frugal_rlhf.cli import main
from frugal_rlhf.config import RewardConfig, SFTConfig
from frugal_rlhf.data.formats import load_dataset_file
from frugal_rlhf.errors import NonFiniteError, UserError
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.reward import RewardTrainer
from frugal_rlhf.trainers.supervised import SFTTrainer

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--model", "tiny-llama", "--dtype", "fp32", "--max-length", "64", "--batch-size", "4"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pref_rows(n=24):
    return [{"prompt": f"Say a word ({i})", "chosen": f"please {i}", "rejected": f"no {i}"} for i in range(n)]


def sft(tmp_path, stop_at=None, rows=None, **kw):
    cfg = SFTConfig(**{"model": "tiny-llama", "output": str(tmp_path / "sft"), "max_steps": 4, "batch_size": 4,
                       "lr": 3e-3, "max_length": 64, "save_every": 2, "eval_every": 0, "dtype": "fp32",
                       "eval_split": 0, **kw})
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    trainer = SFTTrainer(strategy, cfg, rows=rows)
    return trainer, [m for m in trainer.fit(stop_at=stop_at) if m["step"] > 0]


def run_cli(capsys, *argv):
    """(exit code, stdout, the error and traceback lines of stderr) of one `frugal` command."""
    logger = logging.getLogger("frugal_rlhf")
    logger.handlers.clear()  # the CLI's handler then writes to this test's (captured) stderr
    try:
        code = main([str(a) for a in argv])
    finally:
        logger.handlers.clear()
    err = capsys.readouterr()
    return code, err.out, [line for line in err.err.splitlines() if "error:" in line or "Traceback" in line]


def all_finite(directory: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for f in directory.rglob("*.safetensors") for t in load_file(f).values())


# ---- 1. non-finite numbers ----------------------------------------------------------------------
def test_sft_divergence_stops_with_one_line_and_saves_nothing_nonfinite(tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(32))
    out = tmp_path / "n5"
    code, _, errors = run_cli(capsys, "sft", *TINY, "--data", data, "--output", out, "--max-steps", 8,
                              "--save-every", 1, "--lr", 1e6, "--eval-split", 0)
    assert code == 1
    assert len(errors) == 1 and errors[0].startswith("frugal sft: error: sft: 3 updates in a row had a non-finite")
    assert not (out / "final").exists()
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts and all(all_finite(c) for c in ckpts)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the third skipped update stops the run inside its step: the two before it are logged as skipped
    assert [r.get("skipped_updates", 0) for r in rows][-2:] == [1, 1]


def test_one_nonfinite_update_is_skipped_and_the_run_goes_on(tmp_path):
    calls = {"n": 0}
    real = SFTTrainer.loss_sum

    def poisoned(self, batch):
        calls["n"] += 1
        loss, w, stats = real(self, batch)
        return (loss * float("nan"), w, stats) if calls["n"] == 2 else (loss, w, stats)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SFTTrainer, "loss_sum", poisoned)
        trainer, steps = sft(tmp_path / "run", max_steps=4, save_every=0)
    assert [m.get("skipped_updates", 0) for m in steps] == [0, 1, 0, 0]
    assert math.isnan(steps[1]["loss"]) and all(math.isfinite(m["loss"]) for m in steps[2:])
    assert all_finite(tmp_path / "run" / "sft" / "final")


def test_rm_divergence_is_refused_and_writes_no_reward_model(tmp_path):
    cfg = RewardConfig(model="tiny-llama", output=str(tmp_path / "rm"), max_steps=8, batch_size=4, lr=1e6,
                       max_length=64, save_every=0, eval_every=0, dtype="fp32", eval_split=0)
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    with pytest.raises(NonFiniteError, match="non-finite"):
        RewardTrainer(strategy, cfg, rows=load_dataset_file(write_jsonl(tmp_path / "p.jsonl", pref_rows()),
                                                             "preference")).fit()
    assert not (tmp_path / "rm" / "reward_model.json").exists()


def test_ppo_nonfinite_reward_stops_with_the_same_error(tmp_path):
    from test_ppo import run_ppo

    with pytest.MonkeyPatch.context() as mp:
        import test_ppo

        mp.setattr(test_ppo, "letter_reward", lambda tok: lambda seq, attn, n: torch.full((seq.shape[0],), math.nan))
        with pytest.raises(NonFiniteError, match="3 updates in a row had a non-finite policy"):
            run_ppo(tmp_path, max_steps=3, rollout_batch_size=4, batch_size=4, ppo_epochs=1)


# ---- 2. resume checks the run's identity ------------------------------------------------------------
def test_resume_refuses_a_changed_run_and_records_what_may_change(tmp_path):
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, arithmetic_rows(32))
    sft(tmp_path, stop_at=2, data=str(data))
    for change, field in [({"lr": 1e-3}, "lr"), ({"seed": 7}, "seed"), ({"batch_size": 2}, "batch_size"),
                          ({"data": write_jsonl(tmp_path / "other.jsonl", arithmetic_rows(40))}, "data")]:
        with pytest.raises(UserError, match=f"other settings.*{field}"):
            sft(tmp_path, **{"data": str(data), "resume": True, **change})
    write_jsonl(data, arithmetic_rows(33))  # the same path, other contents
    with pytest.raises(UserError, match="contents of data"):
        sft(tmp_path, data=str(data), resume=True)
    write_jsonl(data, arithmetic_rows(32))
    trainer, steps = sft(tmp_path, data=str(data), resume=True, max_steps=6, save_every=3)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    # the schedule keeps the length the run started with: steps past it run at its final LR
    assert trainer.config.schedule_steps == 4
    assert [m["lr"] for m in steps[3:]] == pytest.approx([3e-4] * 3)  # 0.1 x the peak from step 4 on
    recorded = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert recorded["max_steps"] == 6 and recorded["save_every"] == 3 and recorded["schedule_steps"] == 4
    assert recorded["history"] == [{"resumed_at_step": 2, "changed": {"max_steps": [4, 6], "save_every": [2, 3]}}]


def test_ppo_resume_identity_covers_kl_and_the_reward_model(tmp_path):
    from frugal_rlhf.config import PPOConfig
    from frugal_rlhf.rundir import reconcile, run_identity

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "score_head.safetensors").write_bytes(b"head v1")
    then = PPOConfig(model="tiny-llama", reward_model=str(rm), max_steps=40, schedule_steps=40)
    recorded = run_identity(then)
    with pytest.raises(UserError, match=r"reward_model .* -> 'other'; kl_coef 0.05 -> 0.2"):
        reconcile(PPOConfig(model="tiny-llama", reward_model="other", kl_coef=0.2), recorded, step=10)
    (rm / "score_head.safetensors").write_bytes(b"head v2")  # retrained in place
    with pytest.raises(UserError, match="contents of reward_model"):
        reconcile(PPOConfig(model="tiny-llama", reward_model=str(rm)), recorded, step=10)
    (rm / "score_head.safetensors").write_bytes(b"head v1")
    with pytest.raises(UserError, match="--max-steps 5 is below the checkpoint's step 10"):
        reconcile(PPOConfig(model="tiny-llama", reward_model=str(rm), max_steps=5), recorded, step=10)
    now = PPOConfig(model="tiny-llama", reward_model=str(rm), max_steps=60, eval_every=5)
    assert reconcile(now, recorded, step=10) == {"eval_every": [0, 5], "max_steps": [40, 60]}
    assert now.schedule_steps == 40


# ---- 3. a fresh run never mixes with an old one ------------------------------------------------------
def test_fresh_run_into_an_old_run_is_refused_unless_overwrite(tmp_path, rows):
    sft(tmp_path, rows=rows, max_steps=6)
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        sft(tmp_path, rows=rows, max_steps=2)
    _, steps = sft(tmp_path, rows=rows, max_steps=2, overwrite=True)
    out = tmp_path / "sft"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---- 4. a fully fine-tuned reward model loads from its output directory -------------------------------------
def test_full_finetune_reward_model_loads_from_its_directory(tmp_path, capsys):
    from frugal_rlhf.models.reward_io import load_reward_model

    data = write_jsonl(tmp_path / "p.jsonl", pref_rows())
    assert run_cli(capsys, "rm", *TINY, "--data", data, "--output", tmp_path / "ra", "--max-steps", 2,
                   "--save-every", 0, "--lora-rank", 0)[0] == 0
    ids = torch.tensor([[5, 6, 7, 8]])
    a, b = load_reward_model(tmp_path / "ra", dtype=torch.float32), load_reward_model(tmp_path / "ra" / "final",
                                                                                      dtype=torch.float32)
    torch.testing.assert_close(a(ids, torch.ones_like(ids)), b(ids, torch.ones_like(ids)), rtol=0, atol=0)
    code, out, errors = run_cli(capsys, "rm", "--eval-only", "--model", tmp_path / "ra", "--data", data,
                                "--output", tmp_path / "ev")
    assert code == 0 and not errors and "accuracy" in out


# ---- 5. a torn metrics line and a corrupt checkpoint ----------------------------------------------------
def test_resume_survives_a_torn_metrics_line_and_a_corrupt_latest_checkpoint(tmp_path, rows, caplog):
    _, full = sft(tmp_path / "a", rows=rows, max_steps=6)
    sft(tmp_path / "b", rows=rows, max_steps=6, save_every=2, stop_at=4)
    out = tmp_path / "b" / "sft"
    (out / "checkpoints" / "step-0000004" / "state.pt").write_bytes(b"")  # a power loss before the data hit disk
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # killed mid-line
    caplog.set_level(logging.WARNING, "frugal_rlhf")
    _, resumed = sft(tmp_path / "b", rows=rows, max_steps=6, save_every=2, resume=True)
    assert "step-0000004 is incomplete or corrupt (state.pt has 0 bytes" in caplog.text
    assert "cut off by an interrupted write" in caplog.text
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full[2:], resumed[2:]):  # resumed from step 2 and still the uninterrupted run
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


# ---- 6. a kill leaves temporaries: the next start removes them --------------------------------------------
def test_killed_run_resumes_and_its_temporaries_are_removed(tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(32))
    out = tmp_path / "k"
    args = ["sft", *TINY, "--data", data, "--output", out, "--max-steps", 5, "--save-every", 1, "--eval-split", 0]
    proc = subprocess.Popen([sys.executable, "-m", "frugal_rlhf.cli", *map(str, args)],
                            env={**os.environ, "PYTHONPATH": SRC}, stderr=subprocess.DEVNULL)
    try:
        while not (out / "checkpoints" / "step-0000002").exists() and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (out / ".tmp-final-x1y2").mkdir()  # what a kill during the final export leaves
    (out / ".tmp-final-x1y2" / "model.safetensors").write_bytes(b"\0" * 1024)
    (out / "checkpoints" / ".tmp-step-0000009").mkdir()
    code, _, errors = run_cli(capsys, *args, "--resume")
    assert code == 0 and not errors
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


# ---- 7. OS faults are one line, found before training where they can be ----------------------------------------
def test_os_faults_are_one_line_errors(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(32))
    base = ["sft", *TINY, "--data", data, "--max-steps", 3, "--save-every", 1, "--eval-split", 0]
    (tmp_path / "afile").write_text("x")
    code, _, errors = run_cli(capsys, *base, "--output", tmp_path / "afile")
    assert code == 2 and errors == [f"frugal sft: error: --output {tmp_path / 'afile'} is a file, not a directory"]
    # checkpoints/ cannot be written: found before step 1, not at the first save
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "checkpoints").write_text("in the way")
    code, _, errors = run_cli(capsys, *base, "--output", tmp_path / "ro")
    assert code == 2 and len(errors) == 1 and f"cannot write to {tmp_path / 'ro' / 'checkpoints'}" in errors[0]
    assert not (tmp_path / "ro" / "metrics.jsonl").exists()
    # too little free disk for one checkpoint: refused before step 1
    import frugal_rlhf.rundir as rundir

    with monkeypatch.context() as mp:
        mp.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
        code, _, errors = run_cli(capsys, *base, "--output", tmp_path / "full")
    assert code == 2 and len(errors) == 1 and "0 MiB free, one checkpoint needs about" in errors[0]
    assert not (tmp_path / "full" / "metrics.jsonl").exists()
    # the disk fills up during the second checkpoint: one line, the first checkpoint kept, no temporary left
    import frugal_rlhf.trainers.base as base_mod

    saves = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        saves["n"] += 1
        if saves["n"] > 2:  # the first checkpoint's optimizer and state, then a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4048")
        return real_save(obj, f, *a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(base_mod.torch, "save", failing_save)
        code, _, errors = run_cli(capsys, *base, "--output", tmp_path / "df")
    assert code == 2 and len(errors) == 1
    assert f"could not write checkpoint {tmp_path / 'df' / 'checkpoints' / '.tmp-step-0000002'}" in errors[0]
    assert [p.name for p in (tmp_path / "df" / "checkpoints").iterdir()] == ["step-0000001"]


# ---- 8. data faults -------------------------------------------------------------------------------------
def test_data_faults_name_file_and_place_and_torn_records_are_skippable(tmp_path):
    from frugal_rlhf.data.readers import DataError

    good = pref_rows(5)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(json.dumps(r) + "\n" for r in good) + json.dumps(good[0])[:20])
    with pytest.raises(DataError, match=r"torn.jsonl, row 6: .*cut off.*--skip-bad-rows"):
        load_dataset_file(str(torn), "preference")
    assert len(load_dataset_file(str(torn), "preference", skip_bad_rows=True)) == 5
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(good)[:-30])
    assert len(load_dataset_file(str(cut), "preference", skip_bad_rows=True)) == 4
    binary = tmp_path / "bin.jsonl"
    head = (json.dumps(good[0]) + "\n").encode()
    binary.write_bytes(head + b'{"prompt": "caf\xff"}\n')
    with pytest.raises(DataError, match=rf"bin.jsonl, row 2: not UTF-8 text: byte 0xff at byte offset {len(head) + 15}"):
        load_dataset_file(str(binary), "preference")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"empty.parquet: the file is empty"):
        load_dataset_file(str(tmp_path / "empty.parquet"), "preference")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        load_dataset_file(str(tmp_path / "bad.parquet"), "preference")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl: no records in the file"):
        load_dataset_file(str(tmp_path / "blank.jsonl"), "sft")
    # an empty answer is a preference too (Anthropic HH has deliberate non-answers): kept
    rows = load_dataset_file(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Insult me", "chosen": "",
                                                                 "rejected": "You fool"}]), "preference")
    assert rows[0]["chosen"] == ""


# ---- 9. --keep-checkpoints 0 keeps them all ------------------------------------------------------------
def test_keep_checkpoints_zero_keeps_all_and_resume_continues(tmp_path, rows):
    sft(tmp_path, rows=rows, max_steps=4, save_every=1, keep_checkpoints=0, stop_at=3)
    assert [p.name for p in sorted((tmp_path / "sft" / "checkpoints").iterdir())] == [
        "step-0000001", "step-0000002", "step-0000003"]
    trainer, steps = sft(tmp_path, rows=rows, max_steps=4, save_every=1, keep_checkpoints=0, resume=True)
    assert trainer.resume_from.name == "step-0000003" and [m["step"] for m in steps] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="keep-checkpoints must be >= 0"):
        sft(tmp_path / "neg", rows=rows, keep_checkpoints=-1)


def test_resume_without_a_checkpoint_never_silently_restarts(tmp_path, rows):
    sft(tmp_path, rows=rows, max_steps=4, save_every=0, stop_at=2)
    with pytest.raises(UserError, match="no complete checkpoint to resume; add --overwrite"):
        sft(tmp_path, rows=rows, max_steps=4, save_every=0, resume=True)


# ---- 10. a finished run exits 0 and says what it did not measure ---------------------------------------------
def test_rm_without_held_out_pairs_exits_0_and_says_not_measured(tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", pref_rows())
    code, out, errors = run_cli(capsys, "rm", *TINY, "--data", data, "--eval-split", 0, "--max-steps", 2,
                                "--save-every", 0, "--output", tmp_path / "rm", "--lora-rank", 4)
    assert code == 0 and not errors
    assert "held-out accuracy not measured" in out
