"""DDP and FSDP2 strategies: 2-process gloo runs on CPU against the single-process run.

Each distributed case launches tests/dist_worker.py under torchrun (2 ranks, global batch 8 =
4 rows per rank) and compares with the naive strategy on the same global batches (one process,
batch 8). The equalities, and their tolerances:

- losses and pre-clipping gradient norms: relative 1e-5. The same sums are taken in another
  order (per-rank partial sums, then an all-reduce), so they differ by fp32 rounding (~1e-7
  relative measured). The gradient norm is what proves the *scale* of the averaged gradient
  (Adam is scale invariant, so weights alone would not reveal a gradient off by world_size).
- trained weights after 3 AdamW steps: absolute 2% of one step (0.02 * lr; 6e-5 at lr 3e-3).
  Adam divides by sqrt(v), which turns rounding noise on near-zero gradients into visible but
  small moves: measured 4.8e-6 for DDP/FSDP SFT at lr 3e-3 and 8.2e-7 for the SAME single
  process with the batch split into 2 accumulated micro-batches. A wrong gradient moves
  weights by ~lr.
- the shared-base actor + critic task steps with plain SGD, so weights differ by exactly lr x
  the gradient difference: absolute 1e-6. Measured 7.5e-9 under DDP; with the all-reduce
  deliberately broken (sum, not mean) the actor's weights moved 3e-4. (Under AdamW the same
  task once moved one critic LoRA-A element by 5.4e-4: its gradient is exactly 0 on step 1,
  as LoRA B starts at zero, and tiny after, where Adam's ~lr * sign(g) step follows noise.)
- the reward head's bias is exempt: the pairwise loss depends on r_chosen - r_rejected only,
  so its true gradient is exactly 0 and what it gets is pure rounding noise that Adam scales
  up to ~lr per step (measured 4.5e-4 between two single-process runs that differ only in
  micro-batching). It is checked against steps * lr.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"
STEPS, LR = 3, 3e-3  # the worker's steps and learning rate of the supervised tasks
RTOL_LOSS, ATOL_STEP = 1e-5, 0.02  # weights: absolute, as a fraction of one Adam step (lr)
ATOL_SGD = 1e-6  # weights of the shared-base task (SGD), absolute

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(args: list[str], timeout=120):
    """Run `args` (a module or script and its flags) under torchrun with 2 CPU ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def launch(out: Path, *flags: str) -> dict:
    torchrun([str(WORKER), "--out", str(out), "--steps", str(STEPS), *flags])
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def naive(tmp_path_factory):
    """The single-process reference: every task the distributed runs are compared with."""
    out = tmp_path_factory.mktemp("naive")
    proc = subprocess.run([sys.executable, str(WORKER), "--strategy", "naive", "--tasks", "sft,resume,rm,shared,ppo",
                           "--greedy", "--steps", str(STEPS), "--out", str(out)], env=_env(), capture_output=True, text=True,
                          timeout=120, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lora = tmp_path_factory.mktemp("naive-lora")
    proc = subprocess.run([sys.executable, str(WORKER), "--strategy", "naive", "--tasks", "sft", "--lora", "4",
                           "--steps", str(STEPS), "--out", str(lora)], env=_env(), capture_output=True, text=True,
                          timeout=120, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "lora": lora, "result": json.loads((out / "result.json").read_text()),
            "lora_result": json.loads((lora / "result.json").read_text())}


@pytest.fixture(scope="module")
def naive_accum(tmp_path_factory):
    """One process, each global batch of 8 as 2 accumulated micro-batches of 4."""
    out = tmp_path_factory.mktemp("naive-accum")
    proc = subprocess.run([sys.executable, str(WORKER), "--strategy", "naive", "--tasks", "sft,rm", "--accum", "2",
                           "--steps", str(STEPS), "--out", str(out)], env=_env(), capture_output=True, text=True,
                          timeout=120, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "result": json.loads((out / "result.json").read_text())}


def assert_same_supervised(result: dict, ref: dict, run: Path, ref_run: Path):
    for task in ("sft", "rm"):
        assert_same_run(result[task], ref[task])
    assert_same_weights(run / "sft.safetensors", ref_run / "sft.safetensors")
    assert_same_weights(run / "rm.safetensors", ref_run / "rm.safetensors", noisy=("head.bias",))


def assert_same_run(got: dict, ref: dict):
    # Relative to the run's own scale: a late value near zero (a reward model that has
    # separated its pairs) carries the rounding of the early, large ones.
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(ref[key], rel=RTOL_LOSS, abs=RTOL_LOSS * max(map(abs, ref[key])))


def assert_same_weights(path: Path, ref_path: Path, noisy: tuple[str, ...] = (), atol_all: float = ATOL_STEP * LR):
    got, ref = load_file(path), load_file(ref_path)
    assert got.keys() == ref.keys() and len(ref) > 0
    for k in ref:
        atol = STEPS * LR if k in noisy else atol_all
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_export_is_trained_model(run: Path):
    """rank 0's merged export (gathered through full_models under FSDP) holds exactly the
    trained weights (role names are "body." + the Hugging Face names)."""
    final, trained = load_file(run / "sft/final/model.safetensors"), load_file(run / "sft.safetensors")
    assert len(final) > 0
    for k, v in final.items():
        assert torch.equal(v, trained["body." + k]), k


def test_make_strategy_and_launch_errors(monkeypatch, capsys):
    from frugal_rlhf.strategies import make_strategy
    from frugal_rlhf.strategies.ddp import DDPStrategy
    from frugal_rlhf.strategies.fsdp import FSDPStrategy

    assert isinstance(make_strategy("ddp"), DDPStrategy)
    fsdp = make_strategy("fsdp", zero_stage=2, offload="cpu")
    assert isinstance(fsdp, FSDPStrategy) and (fsdp.stage, fsdp.offload) == (2, "cpu")
    with pytest.raises(ValueError, match="stage"):
        make_strategy("fsdp", zero_stage=1)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("horovod")
    # an evaluation set whose last batch would leave a rank without rows is refused up front
    ddp = make_strategy("ddp")
    ddp.rank, ddp.world_size = 0, 2
    with pytest.raises(ValueError, match="last batch"):
        ddp.setup_dataloader(list(range(9)), 4, list, shuffle=False, drop_last=False)
    assert len(list(ddp.setup_dataloader(list(range(10)), 4, list, shuffle=False, drop_last=False))) == 2
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        make_strategy("ddp").setup_distributed()
    # several processes of the one-process strategy would each train alone: refused
    from frugal_rlhf.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["sft", "--model", "tiny-llama", "--data", "x.jsonl", "--nproc-per-node", "2"]) == 2
    assert "needs a distributed strategy" in capsys.readouterr().err


def test_ddp_matches_single_process(naive, tmp_path):
    """SFT, reward model, and actor + critic on one shared base (manual all-reduce) under DDP."""
    result = launch(tmp_path, "--strategy", "ddp", "--tasks", "sft,rm,shared,ppo", "--greedy")
    ref = naive["result"]
    assert result["world_size"] == 2
    assert_same_supervised(result, ref, tmp_path, naive["out"])
    # Shared base: both roles' grads averaged by one all-reduce each, equal to one process.
    assert result["shared"]["loss"] == pytest.approx(ref["shared"]["loss"], rel=RTOL_LOSS)
    assert (pytest.approx(sum(result["shared"]["grad_norm"], []), rel=RTOL_LOSS)
            == sum(ref["shared"]["grad_norm"], []))
    for role in ("actor", "critic"):
        assert_same_weights(tmp_path / f"shared-{role}.safetensors", naive["out"] / f"shared-{role}.safetensors",
                            atol_all=ATOL_SGD)
    assert result["shared"]["whiten_err"] < 1e-12  # global whitening statistics over both ranks
    assert_export_is_trained_model(tmp_path)
    assert_same_ppo(result["ppo"], naive, tmp_path)
    assert result["ppo"]["drift"] == [0.0, 0.0]  # both ranks' replicas identical


def assert_same_ppo(got: dict, naive: dict, run: Path):
    """A greedy PPO run (2 epochs over one mini-batch of the rollout) on 2 x 4 rows equals one
    process on 8 rows: the rewards, losses (metrics averaged over ranks) and trained weights.
    Every answer is 8 tokens long, so the mean of the ranks' token means is the global mean."""
    ref = naive["result"]["ppo"]
    assert got["response_length"] == ref["response_length"] == [8.0] * STEPS
    assert got["reward"] == pytest.approx(ref["reward"], rel=1e-6)
    for key in ("policy_loss", "value_loss"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
    for role in ("actor", "critic"):
        assert_same_weights(run / f"ppo-{role}.safetensors", naive["out"] / f"ppo-{role}.safetensors")


@pytest.mark.parametrize("stage,offload", [(2, "none"), (3, "cpu")])
def test_fsdp_matches_single_process(naive, tmp_path, stage, offload):
    """SFT, reward model and greedy PPO under FSDP equal one process, and so does an SFT run
    resumed from a sharded checkpoint (each rank saved and reloaded only its shard of the model
    and of the AdamW state)."""
    result = launch(tmp_path, "--strategy", "fsdp", "--stage", str(stage), "--offload", offload, "--tasks",
                    "sft,resume,rm,ppo", "--ckpt-format", "sharded", "--greedy")
    assert_same_supervised(result, naive["result"], tmp_path, naive["out"])
    assert_same_run(result["resume"], naive["result"]["resume"])
    assert_same_ppo(result["ppo"], naive, tmp_path)
    assert_same_weights(tmp_path / "resumed.safetensors", naive["out"] / "resumed.safetensors")
    ckpt = tmp_path / "sft/checkpoints" / f"step-{STEPS:07d}"
    assert sorted(p.name for p in ckpt.glob("model*")) == [f"model.rank0000{r}-of-00002.safetensors" for r in (0, 1)]
    # after the resumed run, the export is the 5-step model, as in one process
    assert_same_weights(tmp_path / "sft/final/model.safetensors", naive["out"] / "sft/final/model.safetensors")


def test_fsdp3_sharding_checkpoints_and_resume(naive, tmp_path):
    """ZeRO-3: half the parameters per rank; checkpoints cross strategies both ways; a resumed
    run (model + optimizer state loaded under FSDP) equals the single-process resumed run."""
    result = launch(tmp_path, "--strategy", "fsdp", "--stage", "3", "--tasks", "sft,resume,rm",
                    "--load", str(naive["out"] / "sft.safetensors"))
    ref = naive["result"]
    sft = result["sft"]
    assert sft["sum_local_numel"] == sft["full_numel"]  # the shards cover the model once
    assert 0.45 < sft["local_numel"] / sft["full_numel"] < 0.55  # each rank holds about half
    for task in ("sft", "resume", "rm"):
        assert_same_run(result[task], ref[task])
    assert_same_weights(tmp_path / "sft.safetensors", naive["out"] / "sft.safetensors")
    assert_same_weights(tmp_path / "resumed.safetensors", naive["out"] / "resumed.safetensors")
    # after the resumed run, the export is the 5-step model, as in one process
    assert_same_weights(tmp_path / "sft/final/model.safetensors", naive["out"] / "sft/final/model.safetensors")
    assert_same_weights(tmp_path / "rm.safetensors", naive["out"] / "rm.safetensors", noisy=("head.bias",))
    # naive -> FSDP: loaded into a sharded model and gathered back, bit for bit.
    assert_same_weights(tmp_path / "reloaded.safetensors", naive["out"] / "sft.safetensors")
    got, ref_state = load_file(tmp_path / "reloaded.safetensors"), load_file(naive["out"] / "sft.safetensors")
    assert all(torch.equal(got[k], ref_state[k]) for k in ref_state)
    # FSDP -> naive: the FSDP checkpoint loads into a plain model under NaiveStrategy.
    from frugal_rlhf.models.roles import Actor
    from frugal_rlhf.strategies import NaiveStrategy

    actor = Actor("tiny-llama", dtype="fp32")
    NaiveStrategy(dtype="fp32").load_model(actor, tmp_path / "sft.safetensors")
    saved = load_file(tmp_path / "sft.safetensors")
    live = actor.trainable_state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(live[k], saved[k]) for k in saved)
    # The full checkpoint (model + optimizer) that resume read was written under FSDP.
    ckpt = tmp_path / "sft/checkpoints" / f"step-{STEPS:07d}"
    assert (ckpt / "model.optim.pt").exists() and (ckpt / "model.safetensors").exists()


def test_fsdp_ppo_on_one_shared_base(naive, tmp_path):
    """Actor, critic and reference on one base sharded once (ZeRO-3 + CPU offload): the shared
    two-role update and a greedy PPO run equal one process; generation in which rank 0 stops
    after 1 token and rank 1 after 12 completes (the actor is gathered once, not per token),
    and the base is sharded in halves again afterwards."""
    result = launch(tmp_path, "--strategy", "fsdp", "--stage", "3", "--offload", "cpu", "--tasks",
                    "shared,ppo,uneven", "--greedy")
    ref = naive["result"]["shared"]
    assert result["shared"]["loss"] == pytest.approx(ref["loss"], rel=RTOL_LOSS)
    assert pytest.approx(sum(result["shared"]["grad_norm"], []), rel=RTOL_LOSS) == sum(ref["grad_norm"], [])
    for role in ("actor", "critic"):
        assert_same_weights(tmp_path / f"shared-{role}.safetensors", naive["out"] / f"shared-{role}.safetensors",
                            atol_all=ATOL_SGD)
    assert_same_ppo(result["ppo"], naive, tmp_path)
    uneven = result["uneven"]
    assert uneven["lengths"] == [1, 12]
    assert 0.45 < uneven["local_numel"] / uneven["full_numel"] < 0.55


def test_fsdp_lora_matches_single_process(naive, tmp_path):
    """peft LoRA wrapped by FSDP after get_peft_model: only the adapter trains, as in one process."""
    result = launch(tmp_path, "--strategy", "fsdp", "--stage", "3", "--tasks", "sft", "--lora", "4")
    assert_same_run(result["sft"], naive["lora_result"]["sft"])
    assert_same_weights(tmp_path / "sft.safetensors", naive["lora"] / "sft.safetensors")
    assert all(".lora_" in k for k in load_file(tmp_path / "sft.safetensors"))
    assert (tmp_path / "sft/adapter/adapter_config.json").exists()


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install '.[deepspeed]'; make test does)")


@needs_deepspeed
def test_deepspeed_zero2_offload_matches_single_process(naive, naive_accum, tmp_path):
    """ZeRO-2 + optimizer CPU offload with 2 accumulated micro-batches per rank (each backward
    tells the engine whether it is the last: ZeRO-2 reduces at that boundary and would keep only
    the last micro-batch otherwise), and PPO with actor and critic as two engines on one base.
    Weights measured within 4.8e-5 of one process (a single o_proj element; Adam on a
    near-zero gradient), under the 6e-5 bound; a lost micro-batch moves them by ~lr."""
    result = launch(tmp_path, "--strategy", "deepspeed", "--stage", "2", "--offload", "cpu", "--accum", "2",
                    "--tasks", "sft,rm,ppo", "--greedy")
    assert_same_supervised(result, naive_accum["result"], tmp_path, naive_accum["out"])
    assert_same_ppo(result["ppo"], naive, tmp_path)
    assert_export_is_trained_model(tmp_path)


@needs_deepspeed
def test_deepspeed_zero3_matches_single_process(naive, tmp_path):
    """ZeRO-3: parameters partitioned between the ranks, gathered for checkpoints and exports."""
    result = launch(tmp_path, "--strategy", "deepspeed", "--stage", "3", "--tasks", "sft,rm")
    assert_same_supervised(result, naive["result"], tmp_path, naive["out"])
    assert_export_is_trained_model(tmp_path)


@pytest.mark.parametrize("launcher,strategy", [
    ("torchrun", ["--strategy", "ddp"]),
    ("frugal", ["--strategy", "fsdp", "--zero-stage", "3", "--nproc-per-node", "2"]),
    pytest.param("frugal", ["--strategy", "deepspeed", "--zero-stage", "2", "--offload", "cpu", "--nproc-per-node", "2"],
                 marks=needs_deepspeed),
])
def test_cli_sft_multiprocess(tmp_path, rows, launcher, strategy):
    """`torchrun ... -m frugal_rlhf.cli sft --strategy ...`, and `frugal sft --nproc-per-node 2`
    which starts torchrun itself, end to end (3 held-out rows: both ranks evaluate their slice
    of the last, partial batch)."""
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["-m", "frugal_rlhf.cli", "sft", "--model", "tiny-llama", "--data", str(data), "--max-steps", "3",
            "--dtype", "fp32", *strategy, "--batch-size", "4", "--max-length", "64",
            "--save-every", "0", "--eval-every", "0", "--output", str(out)]
    if launcher == "torchrun":
        proc = torchrun(args)
    else:
        proc = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sft: 3 steps" in proc.stdout  # printed by rank 0 only
    assert proc.stdout.count("sft: 3 steps") == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert (out / "final/model.safetensors").exists()
    assert "eval_loss" in metrics[-1] and math.isfinite(metrics[-1]["eval_loss"])


def test_fsdp_bf16_mixed_precision_lora(naive, tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16) over a bf16 base with fp32 adapters: the run is
    finite and within bf16 precision of the fp32 run (first loss: same weights, relative 2e-2,
    bf16 keeps 8 bits of mantissa ~ 4e-3 per operation), and only fp32 adapter tensors are saved."""
    result = launch(tmp_path, "--strategy", "fsdp", "--stage", "2", "--tasks", "sft", "--lora", "4",
                    "--dtype", "bf16")
    ref = naive["lora_result"]["sft"]["loss"]
    got = result["sft"]["loss"]
    assert all(math.isfinite(x) for x in got)
    assert got[0] == pytest.approx(ref[0], rel=2e-2)
    assert got[-1] < got[0]
    saved = load_file(tmp_path / "sft.safetensors")
    assert saved and all(".lora_" in k and v.dtype == torch.float32 for k, v in saved.items())
