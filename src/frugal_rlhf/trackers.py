"""Experiment trackers (`--report-to tensorboard,wandb,mlflow`): each gets exactly the rows
metrics.jsonl gets, with the same step numbers, the resolved config as hyper-parameters and
the run's plots as images. metrics.jsonl stays the record; a tracker is a view of it.

Each tracker is opened before the first step, so a missing package, a W&B login that is not
there or an MLflow server that does not answer is a one-line error at start-up, not a crash
at step 500.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

from .errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")


def parse_report_to(spec: str | None) -> list[str]:
    names = [n.strip() for n in (spec or "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise UserError(f"--report-to: unknown tracker(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(TRACKERS)} or none (comma-separated)")
    return [n for n in names if n != "none"]


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (bools, strings and lists are not curves)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_params(config) -> dict:
    """The config as hyper-parameters: numbers, strings and bools as they are, the rest as text."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in data.items()}


def _require(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report-to {name}: the {name} package is not installed; install it with "
                        f"pip install 'frugal-rlhf[trackers]' (or pip install {name})") from None


class _TensorBoard:
    def __init__(self, out: Path, config, start_step: int):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # A resumed run drops the events logged after its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if start_step == 0:
            for summary in hparams(flat_params(config), {}):  # on this run, not in a sub-run as add_hparams does
                self.writer.file_writer.add_summary(summary)

    def log(self, values: dict, step: int):
        for key, value in values.items():
            # double precision: the event file holds the very numbers metrics.jsonl holds
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)

    def image(self, path: Path, step: int):
        import numpy as np
        from PIL import Image

        self.writer.add_image(f"plots/{path.stem}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self):
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config, start_step: int):
        wandb = _require("wandb", "wandb")
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE", "online")
        if mode not in ("offline", "disabled", "dryrun") and not wandb.api.api_key:
            raise UserError("--report-to wandb: not logged in to Weights & Biases; run `wandb login`, set "
                            "WANDB_API_KEY, or log offline with WANDB_MODE=offline (then `wandb sync`)")
        try:
            self.run = wandb.init(dir=str(out), project=os.environ.get("WANDB_PROJECT", "frugal-rlhf"),
                                  name=str(out), config=flat_params(config), job_type=type(config).__name__,
                                  settings=wandb.Settings(console="off", silent=True, init_timeout=60))
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, the run must not start half-logged
            raise UserError(f"--report-to wandb: could not start a run ({' '.join(str(e).split())[:200]})") from None

    def log(self, values: dict, step: int):
        self.run.log(values, step=step)

    def image(self, path: Path, step: int):
        # under plots/: loss.png must not take the place of the loss curve at the last step
        self.run.log({f"plots/{path.stem}": self.wandb.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, config, start_step: int):
        # Fail in seconds when the server does not answer (MLflow's default retries for minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        mlflow = _require("mlflow", "mlflow")
        self.mlflow = mlflow
        try:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "frugal-rlhf"))
            self.run = mlflow.start_run(run_name=str(out))
            params = flat_params(config)
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})  # MLflow's limit per value
        except Exception as e:  # noqa: BLE001 - any failure here means the same: no tracking store
            raise UserError(f"--report-to mlflow: the tracking store {mlflow.get_tracking_uri()} is not usable "
                            f"({' '.join(str(e).split())[:200]}); set MLFLOW_TRACKING_URI") from None

    def log(self, values: dict, step: int):
        self.mlflow.log_metrics(values, step=step)

    def image(self, path: Path, step: int):
        self.mlflow.log_artifact(str(path), artifact_path="plots")

    def close(self):
        self.mlflow.end_run()


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The trackers a run reports to (none: every call does nothing)."""

    def __init__(self, spec: str | None, out, config, start_step: int = 0):
        self.sinks = []
        try:
            for name in parse_report_to(spec):
                self.sinks.append(_OPEN[name](Path(out), config, start_step))
        except BaseException:
            self.close()  # the ones already open
            raise
        self.last_step = start_step

    def log(self, row: dict):
        values = scalars(row)
        self.last_step = row.get("step", self.last_step)
        if values:
            for sink in self.sinks:
                sink.log(values, self.last_step)

    def image(self, path: Path):
        for sink in self.sinks:
            sink.image(Path(path), self.last_step)

    def close(self):
        for sink in self.sinks:
            sink.close()
        self.sinks = []
