"""Two nodes on one machine: two torchrun launchers with --nnodes 2 meet at a c10d rendezvous on
localhost (one process each, gloo on CPU), as two machines would at HOST0:PORT. Their
checkpoints go to one shared directory (rank 0 writes the full files and meta.json; with FSDP's
sharded checkpoints each node writes its own shard). One node is killed (kill -9 of its whole
process group, mid-step), the other fails on the lost peer; `--resume` on both then gives
exactly the weights of the run that was never interrupted: the same world size computes the
same sums in the same order, and a checkpoint holds everything the next step reads (weights,
optimizer moments, schedule, data position, RNG), so equality is exact, not a tolerance.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import arithmetic_rows

HERE = Path(__file__).parent
WORKER = HERE / "multinode_worker.py"
SRC = str(HERE.parent / "src")
STEPS, STALL_AT = 6, 4  # the killed node stops at the start of step 4: checkpoints 1..3 are complete
HANG_GUARD = 300  # seconds: a launcher still running after this is stuck (the test fails, it never waits more)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One node: its launcher (in its own process group) and its worker (its pid from the worker)."""

    def __init__(self, launcher: subprocess.Popen, pid_file: Path):
        self.launcher, self.pid_file = launcher, pid_file

    def kill(self):
        """kill -9 of the launcher's group and of the worker (torchrun starts it in its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.launcher.pid, signal.SIGKILL)
        if self.pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(self.pid_file.read_text()), signal.SIGKILL)
        self.launcher.wait()

    def finish(self) -> int:
        try:
            return self.launcher.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"a launcher was still running after {HANG_GUARD} s")


def start_node(name: str, args: list, port: int, rdzv_id: str, host: bool, logs: Path, **env) -> Node:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
           "--rdzv-conf", f"is_host={int(host)}", "--max-restarts", "0", str(WORKER), *map(str, args)]
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    pid_file = logs / f"{rdzv_id}-{name}.pid"
    environ.update(PYTHONPATH=f"{SRC}{os.pathsep}{HERE}", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   FRUGAL_TEST_PID_FILE=str(pid_file), **env)
    with open(logs / f"{rdzv_id}-{name}.log", "w") as log:
        return Node(subprocess.Popen(cmd, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                    pid_file)


@contextlib.contextmanager
def nodes(*started: Node):
    """No process of a node outlives the test, whatever fails."""
    try:
        yield started
    finally:
        for node in started:
            node.kill()


def two_nodes(args: list, logs: Path, rdzv_id: str) -> None:
    port = _free_port()
    with nodes(*(start_node(n, args, port, rdzv_id, n == "a", logs) for n in ("a", "b"))) as (a, b):
        codes = [a.finish(), b.finish()]
    assert codes == [0, 0], "\n".join((logs / f"{rdzv_id}-{n}.log").read_text()[-3000:] for n in ("a", "b"))


def killed_mid_run(args: list, logs: Path) -> int:
    """Both nodes start; node b stops at step STALL_AT and is killed; node a's exit code."""
    port = _free_port()
    with nodes(start_node("a", args, port, "killed", True, logs),
               start_node("b", args, port, "killed", False, logs, FRUGAL_TEST_STALL_AT=str(STALL_AT))) as (a, b):
        stalled = b.pid_file.with_suffix(".stalled")
        deadline = time.monotonic() + HANG_GUARD
        while not stalled.exists():
            assert b.launcher.poll() is None and a.launcher.poll() is None, \
                (logs / "killed-b.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "node b never reached the step it stops at"
            time.sleep(0.1)
        b.kill()  # the machine is gone: launcher and worker at once
        return a.finish()


@pytest.mark.parametrize("strategy", [["--strategy", "ddp"],
                                      ["--strategy", "fsdp", "--zero-stage", "3", "--checkpoint-format", "sharded"]],
                         ids=["ddp", "fsdp"])
def test_two_nodes_killed_and_resumed_equal_the_uninterrupted_run(tmp_path, strategy):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(64)))
    logs = tmp_path / "logs"
    logs.mkdir()

    def args(out):
        return ["sft", "--model", "tiny-llama", "--data", data, "--output", out, "--dtype", "fp32", "--max-length", 64,
                "--batch-size", 4, "--lr", 1e-3, "--eval-split", 0, "--max-steps", STEPS, "--save-every", 1,
                "--keep-checkpoints", 0, *strategy]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    two_nodes(args(whole), logs, "whole")
    assert killed_mid_run(args(cut), logs) != 0  # the survivor fails on the lost peer
    # ... in one line that says what to do, not gloo's traceback (torchrun's own report follows it)
    said = (logs / "killed-a.log").read_text()
    assert "[rank0]: Traceback" not in said, said[-3000:]
    assert ("frugal sft: error: sft: another process of the run stopped or cannot be reached (Connection closed by "
            f"peer" in said and f"its last complete checkpoint is {cut / 'checkpoints' / 'step-0000003'}: when every "
            "node is back, run the same command with --resume on each" in said), said[-3000:]
    assert not (cut / "final").exists()
    assert sorted(p.name for p in (cut / "checkpoints").glob("step-*")) == [f"step-{s:07d}" for s in range(1, STALL_AT)]
    if "sharded" in strategy:  # each node wrote its own shard into the shared directory
        assert sorted(p.name for p in (cut / "checkpoints" / "step-0000003").glob("model.rank*")) == [
            f"model.rank0000{r}-of-00002.safetensors" for r in (0, 1)]
    two_nodes([*args(cut), "--resume"], logs, "resumed")

    got, ref = load_file(cut / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    assert got.keys() == ref.keys() and ref
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert yaml.safe_load((cut / "config.yaml").read_text())["history"][-1]["resumed_at_step"] == STALL_AT - 1
