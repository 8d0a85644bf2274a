"""The run directory: resolved config, metrics.jsonl, PNG plots, progress display; atomic
writes and the RNG state that checkpoints hold."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

import yaml

from .errors import UserError
from .rundir import atomic_write

log = logging.getLogger("frugal_rlhf")


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is emitted, not as it was at setup: a caller
    that redirects stderr later (a notebook cell, contextlib.redirect_stderr, pytest's capture)
    still sees the logs instead of a closed stream receiving them."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(level=logging.INFO):
    """Logs go to stderr; results go to files. Python warnings (deprecations inside torch,
    transformers, peft: nothing a user can act on) reach the terminal only with -v (DEBUG)."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers = log.handlers
    warnings_log.propagate = False
    warnings_log.setLevel(logging.WARNING if level <= logging.DEBUG else logging.CRITICAL + 1)
    # Our own progress bars say what runs; transformers' per-load bars would drown them. Said
    # through the environment it reads when imported (a user's own setting wins), and at once if
    # it is imported: importing it here would cost the pipeline's own process 0.2 GiB (app/pipeline.py).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


class RunDir:
    def __init__(self, path, config=None, resume_step: int = 0, enabled: bool = True,
                 history_entry: dict | None = None, trackers=None):
        """`history_entry` (a resume, and the settings it changed) is appended to the history
        that config.yaml keeps below the settings in effect. `trackers` (trackers.Trackers) get
        every row logged and every plot."""
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = trackers
        self.metrics_path = self.path / "metrics.jsonl"
        if not enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if config is not None:
            data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
            history = self._history() + ([history_entry] if history_entry else [])
            if history:
                data["history"] = history
            write_text_durably(self.path / "config.yaml", yaml.safe_dump(data, sort_keys=False))
        # A resumed run continues the curve from its checkpoint: drop rows logged after it.
        rows = [r for r in self.read_metrics(repair=True) if r.get("step", 0) <= resume_step]
        write_text_durably(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def _history(self) -> list:
        try:
            return (yaml.safe_load((self.path / "config.yaml").read_text()) or {}).get("history", [])
        except (OSError, yaml.YAMLError, AttributeError):
            return []

    def log(self, row: dict):
        if self.enabled:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.trackers:
                self.trackers.log(row)

    def read_metrics(self, repair: bool = False) -> list[dict]:
        """The logged rows. A last line cut by a crash mid-write is dropped (with `repair`, with a
        warning: the rewrite then truncates it); a bad line elsewhere is an error naming it."""
        if not self.metrics_path.exists():
            return []
        lines = [(i, line) for i, line in enumerate(self.metrics_path.read_text().splitlines(), 1) if line.strip()]
        rows = []
        for k, (lineno, line) in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if k < len(lines) - 1:
                    raise UserError(f"{self.metrics_path}, line {lineno}: not a JSON row ({e.msg}); "
                                    "the file was edited or damaged") from None
                if repair:
                    log.warning("%s: the last line (%d) was cut off by an interrupted write: dropped",
                                self.metrics_path, lineno)
        return rows

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
        if self.trackers:
            self.trackers.image(out)
        return out


def write_text_durably(path: Path, text: str):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def make_progress(enabled: bool = True):
    """A progress bar on stderr with rate and ETA."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            if not speed:
                return Text("-- s/it")
            return Text(f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it")

    # Written to a file (a log, CI), rich assumes 80 columns and cuts the row with "…": give it
    # room for every column instead; in a terminal, the terminal's width.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, disable=not enabled)
