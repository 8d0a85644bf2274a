"""The run directory: resolved config, metrics.jsonl, PNG plots, progress display; atomic
writes and the RNG state that checkpoints hold."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

log = logging.getLogger("frugal_rlhf")


def setup_logging(level=logging.INFO):
    """Logs go to stderr; results go to files."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    # Our own progress bars say what runs; transformers' per-load bars would drown them.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class RunDir:
    def __init__(self, path, config=None, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.metrics_path = self.path / "metrics.jsonl"
        if not enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if config is not None:
            data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
            (self.path / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        # A resumed run continues the curve from its checkpoint: drop rows logged after it.
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= resume_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(self, row: dict):
        if self.enabled:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, data: dict):
        if self.enabled:
            (self.path / name).write_text(json.dumps(data, indent=2) + "\n")

    def plot(self, keys: list[str], name: str, title: str | None = None) -> Path | None:
        """One PNG with a panel per metric key, over steps."""
        rows = self.read_metrics()
        keys = [k for k in keys if any(_finite(r.get(k)) for r in rows)]
        if not self.enabled or not keys:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = self.path / name
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def make_progress(enabled: bool = True):
    """A progress bar on stderr with rate and ETA."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            if not speed:
                return Text("-- s/it")
            return Text(f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=Console(stderr=True), disable=not enabled)


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: a crash never leaves a half-written file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
