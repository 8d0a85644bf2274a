"""`frugal_rlhf.cli` as one node of tests/test_multinode.py runs it, under torchrun.

    torchrun --nnodes 2 ... tests/multinode_worker.py sft --strategy ddp ...

The worker writes its pid to FRUGAL_TEST_PID_FILE: torchrun starts workers in their own
session, so killing a launcher's process group leaves its worker running; the test kills both.
With FRUGAL_TEST_STALL_AT=K, this node's rank stops at the start of training step K (after step
K-1's checkpoint) and sleeps: the test then kills the whole node (kill -9), as a machine that
fails mid-run.
"""
import os
import sys
import time
from pathlib import Path

import torch

from frugal_rlhf.cli import main
from frugal_rlhf.trainers.supervised import SFTTrainer

torch.set_num_threads(1)  # two ranks on a 2-core machine: OpenMP threads must not spin against each other
STALL_AT = int(os.environ.get("FRUGAL_TEST_STALL_AT", "0"))
PID_FILE = Path(os.environ["FRUGAL_TEST_PID_FILE"])

if STALL_AT:
    step_of = SFTTrainer.train_step

    def train_step(self, step):
        if step == STALL_AT:
            PID_FILE.with_suffix(".stalled").write_text(str(os.getpid()))
            time.sleep(3600)
        return step_of(self, step)

    SFTTrainer.train_step = train_step

if __name__ == "__main__":
    PID_FILE.write_text(str(os.getpid()))
    sys.exit(main())
