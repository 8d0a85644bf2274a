"""`frugal bench compare --peer trl`: the runs of one comparison and their table.

Rows: `frugal` (our torch rollout engine) and `trl`; for `--stage grpo` also our other rollout
engines (`frugal-llamacpp`, `frugal-vllm`; `--rollout-engine` picks) and `trl-vllm`, TRL with
`use_vllm=True` in its own environment (bench/trl_grpo.py). A row whose engine, package or
environment is missing says how to install it instead of giving a number. Each (row, repeat)
runs in its own process, and the repeats alternate the rows so drift in the machine hits every
row alike; a row reports the median over repeats of each run's median step rate, with min and
max, and the peak memory of its runs (for `frugal-vllm`, its trainer's and its vLLM server's
peaks added, since the server is a process of its own; TRL's vLLM runs inside the trainer).
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..device import DTYPES, compute_dtype
from ..engine_choice import missing as engine_missing
from ..models.loading import load_model, resolve_spec
from .common import stats
from .peers import equal_length_rows, math_rows
from .trl_grpo import GROUP, TRL_VLLM_INSTALL, trl_vllm_python

ENGINE_ROWS = {"torch": "frugal", "llamacpp": "frugal-llamacpp", "vllm": "frugal-vllm"}
LABELS = {"frugal": "frugal-rlhf, torch engine", "frugal-llamacpp": "frugal-rlhf, llamacpp engine",
          "frugal-vllm": "frugal-rlhf, vllm engine", "trl": "TRL 1.16", "trl-vllm": "TRL 1.16, use_vllm (colocate)"}
UNITS = {"sft": "samples_per_s", "rm": "pairs_per_s", "grpo": "completions_per_s", "dpo": "pairs_per_s"}


def row_names(stage: str, rollout_engines=tuple(ENGINE_ROWS)) -> list[str]:
    if stage != "grpo":
        return ["frugal", "trl"]
    return [ENGINE_ROWS[e] for e in rollout_engines] + ["trl", "trl-vllm"]


def missing(name: str) -> str | None:
    """Why row `name` cannot run here, and how to install what it needs; None when it can."""
    if name in ("frugal-llamacpp", "frugal-vllm"):
        return engine_missing(name.removeprefix("frugal-"))
    if name == "trl" and importlib.util.find_spec("trl") is None:
        return "trl is not installed: pip install -e .[peers]"
    if name == "trl-vllm" and trl_vllm_python() is None:
        return f"TRL with vLLM runs in an environment of its own: {TRL_VLLM_INSTALL}"
    return None


def _trl_model(model: str, tokenizer, tmp: Path) -> tuple[str, str]:
    """The model directory and tokenizer TRL's GRPO child loads (it may run in another environment,
    without this package's loaders): the spec's own directory, or the model written out (tiny-*,
    built in memory, with the tokenizer beside it: vLLM reads it there); our prepared tokenizer."""
    tokenizer.save_pretrained(tmp / "tokenizer")
    path = resolve_spec(model)
    if not Path(path).is_dir():
        lm, _ = load_model(model)
        lm.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        path = tmp / "model"
    return str(path), str(tmp / "tokenizer")


def _commands(names, stage, model, tokenizer, rows_file: Path, tmp: Path, settings: dict) -> dict:
    """row name -> (argv, environment or None) of one run."""
    trl_grpo = [n for n in names if stage == "grpo" and n.startswith("trl")]
    files = _trl_model(model, tokenizer, tmp) if trl_grpo else None
    out = {}
    for name in names:
        if name in trl_grpo:
            out[name] = _trl_grpo_command(name, files, rows_file, tmp, settings)
            continue
        engine = next((e for e, row in ENGINE_ROWS.items() if row == name), "torch")
        tool = "trl" if name == "trl" else "frugal"
        # --rollout-quant is llama.cpp's weight format; the other engines refuse any but their own
        own = dict(settings, engine=engine, rollout_quant=settings["rollout_quant"] if engine == "llamacpp" else "f16")
        code = (f"from frugal_rlhf.bench.peers import run_one; "
                f"run_one({tool!r}, {stage!r}, {model!r}, {str(rows_file)!r}, {own!r})")
        out[name] = ([sys.executable, "-c", code], None)
    return out


def _trl_grpo_command(name: str, files: tuple[str, str], rows_file: Path, tmp: Path, settings: dict):
    """bench/trl_grpo.py as a module, in this environment (trl) or in TRL's vLLM one (trl-vllm)."""
    vllm = name == "trl-vllm"
    dtype = next(k for k, v in DTYPES.items() if v == compute_dtype(override=settings["dtype"]))
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({**settings, "rows": str(rows_file), "model": files[0], "tokenizer": files[1],
                                "dtype": dtype, "use_vllm": vllm, "output": str(tmp / f"{name}-output")}))
    python = trl_vllm_python() if vllm else sys.executable
    return [python, "-m", "frugal_rlhf.bench.trl_grpo", str(spec)], _package_only_path(tmp) if vllm else None


def _package_only_path(tmp: Path) -> dict:
    """An environment whose PYTHONPATH holds this package and nothing else: the vLLM environment
    has its own transformers, which a path to this environment's packages would shadow."""
    root = tmp / "package"
    root.mkdir(exist_ok=True)
    link = root / "frugal_rlhf"
    if not link.exists():
        link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(root)}


def _run(name: str, stage: str, argv: list[str], env: dict | None) -> tuple[float, float]:
    """One run: the median of its per-step rates and its peak memory in GiB."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench compare: {name} {stage} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()

    def last(key):
        return next(line[len(key):] for line in reversed(lines) if line.startswith(key))

    return statistics.median(json.loads(last("RATES "))), int(last("PEAK ")) / 2**30


def compare(peer="trl", stage="sft", model="default", steps=6, batch_size=8, max_length=256, lora_rank=8,
            dtype="auto", repeats=3, new_tokens=32, prompt_tokens=0, reward="rm", gradient_checkpointing=False,
            rollout_engines=tuple(ENGINE_ROWS), rollout_quant="f16", **_):
    if stage not in UNITS:
        raise SystemExit(f"bench compare: stage '{stage}' is not implemented (sft, rm, grpo, dpo); "
                         "see docs/benchmarks.md")
    if stage == "grpo" and batch_size % GROUP:
        raise SystemExit(f"bench compare grpo: --batch-size must be a multiple of {GROUP} (completions per prompt)")
    if reward == "math" and stage != "grpo":
        raise SystemExit("bench compare: --reward math is for --stage grpo")
    _, tok = load_model(model)
    rows = (math_rows(batch_size * steps) if reward == "math" else
            equal_length_rows(tok, batch_size * steps, max_length - 8, prompt_tokens))
    names = row_names(stage, rollout_engines)
    absent = {name: why for name in names if (why := missing(name))}
    medians, peaks = {n: [] for n in names if n not in absent}, {n: [] for n in names if n not in absent}
    settings = dict(steps=steps, batch_size=batch_size, max_length=max_length, lora_rank=lora_rank, dtype=dtype,
                    new_tokens=new_tokens, reward=reward, gradient_checkpointing=gradient_checkpointing,
                    rollout_quant=rollout_quant)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        commands = _commands(list(medians), stage, model, tok, rows_file, Path(tmp), settings)
        for r in range(repeats):
            for name, (argv, env) in commands.items():  # alternate the rows so drift in the machine hits all
                median, peak = _run(name, stage, argv, env)
                medians[name].append(median)
                peaks[name].append(peak)
                print(f"{name} {stage} repeat {r + 1}: {median:.3f}/s", file=sys.stderr)
    result = {"workload": "compare", "peer": peer, "stage": stage, "model": model, "batch_size": batch_size,
              "length": max_length - 8, "prompt_tokens": prompt_tokens or None, "lora_rank": lora_rank,
              "dtype": dtype, "threads": torch.get_num_threads(), "gradient_checkpointing": gradient_checkpointing,
              "unit": UNITS[stage], "repeats": repeats, "rows": names,
              **({"new_tokens": new_tokens, "group": GROUP, "reward": reward, "rollout_quant": rollout_quant}
                 if stage == "grpo" else {})}
    for name in names:
        result[name] = ({"not_installed": absent[name]} if name in absent else
                        {**stats(medians[name]), "peak_mem_gb": max(peaks[name])})
    return {**result, **_ratios(result, medians, peer)}


def _ratios(result: dict, medians: dict, peer: str) -> dict:
    """ratio: frugal (torch engine) over the peer's default row, as before there were more rows;
    best: our fastest row over the peer's fastest, the comparison that matters to a user."""
    ran = {name: result[name]["median"] for name in medians}
    ours = {n: v for n, v in ran.items() if n.startswith("frugal")}
    theirs = {n: v for n, v in ran.items() if n.startswith(peer)}
    out = {"ratio": ran["frugal"] / ran[peer] if "frugal" in ran and peer in ran else None, "best": None}
    if ours and theirs:
        a, b = max(ours, key=ours.get), max(theirs, key=theirs.get)
        out["best"] = {"frugal": a, peer: b, "ratio": ours[a] / theirs[b]}
    return out


def format_table(r: dict) -> str:
    """One line per row: its rate (median [min-max]), peak memory, and the ratio to the peer's fastest row."""
    best = max((r[n]["median"] for n in r["rows"] if n.startswith(r["peer"]) and "median" in r[n]), default=None)
    lines = [f"| run | {r['unit']}, median [min-max] | peak memory | vs {r['peer']}'s fastest |", "|---|---|---|---|"]
    for name in r["rows"]:
        v = r[name]
        label = LABELS[name] if r["stage"] == "grpo" else name  # only GRPO has rollout engines
        label += f" ({r['rollout_quant']})" if name == "frugal-llamacpp" else ""
        if "not_installed" in v:
            lines.append(f"| {label} | not installed: {v['not_installed']} | - | - |")
            continue
        vs = f"x{v['median'] / best:.2f}" if best else "-"
        lines.append(f"| {label} | {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}] | "
                     f"{v['peak_mem_gb']:.2f} GiB | {vs} |")
    return "\n".join(lines)
