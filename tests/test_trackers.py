"""--report-to: every tracker holds exactly the scalars metrics.jsonl holds, at the same steps,
read back with each tracker's own reader; a tracker that cannot start stops the run at start-up."""
import json
from pathlib import Path

import pytest

from conftest import arithmetic_rows
from frugal_rlhf import cli
from frugal_rlhf.errors import UserError
from frugal_rlhf.trackers import parse_report_to, scalars
from test_sft import run_sft

pytest.importorskip("tensorboard")


def jsonl_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict = {}
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in scalars(row).items():
            curves.setdefault(key, []).append((row["step"], value))
    return curves


def tensorboard_curves(out: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={TENSORS: 0})
    acc.Reload()
    return acc, {tag: [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
                 for tag in acc.Tags()["tensors"]}


def wandb_records(run_file: Path):
    """The records of a W&B transaction log (.wandb): a 7-byte file header, then LevelDB-style
    32 KiB blocks of chunks (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, part, block = run_file.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            yield record
            part = b""


def wandb_curves(out: Path):
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    curves, config, images = {}, {}, set()
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config passed to wandb.init travels in the run record
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            for key, value in items.items():
                if key.startswith("plots/"):  # an image: plots/NAME/_type, .../path, ...
                    images.add(key.split("/")[1])
                elif not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    curves.setdefault(key, []).append((record.history.step.num, value))
    return curves, config, images


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's local file store, for the test
    return tmp_path


def test_trackers_hold_the_rows_of_metrics_jsonl(tracker_env, rows):
    trackers = "tensorboard,wandb" + (",mlflow" if _installed("mlflow") else "")
    trainer, _ = run_sft(tracker_env, rows, max_steps=4, eval_every=2, report_to=trackers)
    out = trainer.out
    expected = jsonl_curves(out)
    assert {"loss", "eval_loss", "lr", "grad_norm"} <= set(expected)

    acc, tb = tensorboard_curves(out)
    assert tb == expected  # double precision: the very numbers, at the very steps
    assert acc.Tags()["images"] == ["plots/loss"]  # the run's plot, loss.png
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")  # the config, in the HPARAMS tab

    curves, config, images = wandb_curves(out)
    assert curves == expected
    assert config["lr"] == trainer.config.lr and config["model"] == "tiny-llama"
    assert images == {"loss"}

    if "mlflow" in trackers:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        (run,) = client.search_runs([client.get_experiment_by_name("frugal-rlhf").experiment_id])
        assert run.data.params["model"] == "tiny-llama"
        for key, points in expected.items():
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == points


def test_resumed_run_keeps_tensorboard_equal_to_metrics_jsonl(tmp_path, rows):
    kw = dict(max_steps=6, save_every=2, report_to="tensorboard")
    run_sft(tmp_path, rows, stop_at=3, **kw)  # steps 1-3 logged, checkpoint at 2: step 3 is logged twice
    trainer, _ = run_sft(tmp_path, rows, resume=True, **kw)
    expected = jsonl_curves(trainer.out)
    assert [s for s, _ in expected["loss"]] == list(range(1, 7))
    assert tensorboard_curves(trainer.out)[1] == expected


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_report_to_names_are_checked():
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    assert parse_report_to(" tensorboard , wandb") == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="unknown tracker.*tensorbaord"):
        parse_report_to("tensorbaord")


def _cli_error(tmp_path, capsys, *flags):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(16)))
    code = cli.main(["sft", "--model", "tiny-llama", "--data", str(data), "--output", str(tmp_path / "out"),
                     "--max-steps", "2", "--save-every", "0", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_a_tracker_that_cannot_start_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    code, err = _cli_error(tmp_path, capsys, "--report-to", "wandb")
    assert code == 2 and err[-1].startswith("frugal sft: error: --report-to wandb: the wandb package is not "
                                            "installed") and "pip install" in err[-1]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before the first step

    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    code, err = _cli_error(tmp_path, capsys, "--report-to", "mlflow", "--overwrite")
    assert code == 2 and err[-1].startswith("frugal sft: error: --report-to mlflow: the tracking store "
                                            "http://127.0.0.1:9 is not usable")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_wandb_online_without_a_login_is_refused_at_start_up(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, err = _cli_error(tmp_path, capsys, "--report-to", "wandb")
    assert code == 2 and err[-1].startswith("frugal sft: error: --report-to wandb: not logged in")
