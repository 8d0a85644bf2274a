"""DDP, FSDP2 and DeepSpeed strategies: 2-process gloo runs on CPU against the single-process run.

Each distributed case launches tests/dist_worker.py under torchrun (2 ranks, global batch 8 =
4 rows per rank) and compares with the naive strategy on the same global batches (one process,
batch 8). The runs are fp32, and every tolerance follows from fp32 rounding, so it holds on any
CPU (AVX2 or AVX512, any BLAS kernel) rather than on the one it was measured on:

- eps = 2^-23 (fp32). A loss or a gradient element is a sum over at most N = 8 rows x 64 tokens
  = 512 terms; the strategies take those sums in another order (per-rank partial sums, then an
  all-reduce; other matmul blockings). A sum of n terms taken in another order differs by at
  most (n - 1) eps sum|x_i| (Higham, Accuracy and Stability of Numerical Algorithms, 4.2), so
  losses and gradient norms agree to RTOL = N eps = 6.1e-5, relative. The gradient norm is what
  proves the *scale* of the averaged gradient (a sum over ranks instead of a mean doubles it).
- weights are compared after plain SGD steps (with momentum mu for SFT and the reward model, so
  the optimizer still has state to shard, checkpoint and resume), where a weight is exactly
  w0 - sum_t lr_t buf_t with buf_t = mu buf_(t-1) + g_t. Two runs then differ by at most
  lr x sum_t sum_(k<=t) mu^(t-k) x |g_k - g'_k|, and |g_k - g'_k| <= RTOL x ||g_k|| <= RTOL x
  max_grad_norm (the gradients are clipped to norm 1), plus the rounding of each update
  (eps |w| per step and run). `sgd_atol` computes that bound; the differences that follow from
  the weights themselves differing (by this bound) are second order and below it.
- AdamW is what the trainers use; it divides by sqrt(v), which turns rounding noise on a
  near-zero gradient into a move of up to lr on one CPU and of the opposite sign on another, so
  two correct AdamW runs are not equal to any rounding tolerance. Where AdamW is covered
  (DeepSpeed ZeRO-2 with optimizer offload) the test asserts what Adam guarantees instead:
  every weight moved by at most lr x `adam_step_bound` per step, and weights that moved by more
  than half that maximum in the reference (a gradient far above the noise, with one sign for
  every step) moved the same way.
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
STEPS = 3  # the worker's training steps per task (the resume task runs 2 more)
EPS = torch.finfo(torch.float32).eps
RTOL = 8 * 64 * EPS  # the terms of one loss or gradient sum (global batch x max_length) x eps
MAX_GRAD_NORM = 1.0  # the configs' default clipping: no gradient that reaches the optimizer is longer
SGD_LR, MOMENTUM = 0.1, 0.9  # the supervised tasks (SGD moves only lr x |g|, so lr can be larger than Adam's)
SHARED_LR, PPO_LR = 1e-2, 3e-3  # the worker's plain-SGD tasks (no momentum)
ADAM_LR, ADAM_BETAS = 3e-3, (0.9, 0.95)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(args: list[str], timeout=300):
    """Run `args` (a module or script and its flags) under torchrun with 2 CPU ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def optim_flags(optim: str) -> list[str]:
    lr = SGD_LR if optim == "sgd" else ADAM_LR
    return ["--optim", optim, "--lr", str(lr), "--momentum", str(MOMENTUM)]


def launch(out: Path, *flags: str, optim: str = "sgd") -> dict:
    torchrun([str(WORKER), "--out", str(out), "--steps", str(STEPS), *optim_flags(optim), *flags])
    return json.loads((out / "result.json").read_text())


def run_naive(out: Path, *flags: str, optim: str = "sgd") -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), "--strategy", "naive", "--steps", str(STEPS),
                           *optim_flags(optim), *flags, "--out", str(out)], env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def naive(tmp_path_factory):
    """The single-process reference: every task the distributed runs are compared with."""
    out, lora = tmp_path_factory.mktemp("naive"), tmp_path_factory.mktemp("naive-lora")
    return {"out": out, "lora": lora, "result": run_naive(out, "--tasks", "sft,resume,rm,shared,ppo", "--greedy"),
            "lora_result": run_naive(lora, "--tasks", "sft", "--lora", "4")}


@pytest.fixture(scope="module")
def naive_accum(tmp_path_factory):
    """One process, each global batch of 8 as 2 accumulated micro-batches of 4, under AdamW."""
    out = tmp_path_factory.mktemp("naive-accum")
    return {"out": out, "result": run_naive(out, "--tasks", "sft,rm", "--accum", "2", optim="adamw")}


def assert_same_supervised(result: dict, ref: dict, run: Path, ref_run: Path):
    for task in ("sft", "rm"):
        assert_same_run(result[task], ref[task])
        assert_same_weights(run / f"{task}.safetensors", ref_run / f"{task}.safetensors")


def assert_same_run(got: dict, ref: dict):
    # Relative to the run's own scale: a late value near zero (a reward model that has
    # separated its pairs) carries the rounding of the early, large ones.
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(ref[key], rel=RTOL, abs=RTOL * max(map(abs, ref[key])))


def sgd_atol(steps: int, lr: float, momentum: float, max_weight: float) -> float:
    """The largest difference between two SGD runs whose gradients differ by rounding (module doc)."""
    coef = sum(sum(momentum ** j for j in range(t)) for t in range(1, steps + 1))
    return lr * coef * RTOL * MAX_GRAD_NORM + 2 * steps * EPS * max_weight


def assert_same_weights(path: Path, ref_path: Path, steps: int = STEPS, lr: float = SGD_LR,
                        momentum: float = MOMENTUM):
    got, ref = load_file(path), load_file(ref_path)
    assert got.keys() == ref.keys() and len(ref) > 0
    for k in ref:
        atol = sgd_atol(steps, lr, momentum, float(ref[k].abs().max()))
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def adam_step_bound(t: int, betas=ADAM_BETAS) -> float:
    """The largest |m_hat_t| / sqrt(v_hat_t) over all gradient sequences: m_hat = sum_i a_i g_i and
    v_hat = sum_i b_i g_i^2 with the bias-corrected EMA weights a_i, b_i, so by Cauchy-Schwarz
    |m_hat| <= sqrt(sum_i a_i^2 / b_i) sqrt(v_hat). 1 at t=1, 1.001 at t=3 for betas (0.9, 0.95)."""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
    b = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


def assert_adam_consistent(path: Path, ref_path: Path, init_path: Path, got_init_path: Path,
                           no_signal: tuple[str, ...] = ()):
    """What AdamW guarantees on any machine (weight decay 0, lr_t <= lr): both runs start from the
    same weights, every weight moves by at most lr x adam_step_bound(t) at step t, and a weight the
    reference moved by more than half that maximum had a gradient of one sign and far above the
    rounding at every step, so the other run moved it the same way. `no_signal`: tensors whose true
    gradient is exactly 0 (pure rounding noise, which Adam moves by up to lr either way)."""
    got, ref, init = load_file(path), load_file(ref_path), load_file(init_path)
    assert got.keys() == ref.keys() == init.keys() and len(ref) > 0
    assert all(torch.equal(v, init[k]) for k, v in load_file(got_init_path).items())
    bound = ADAM_LR * sum(adam_step_bound(t) for t in range(1, STEPS + 1))
    for k in ref:
        moved, ref_moved = got[k] - init[k], ref[k] - init[k]
        slack = 2 * STEPS * EPS * float(init[k].abs().max())  # the rounding of the updates themselves
        for m in (moved, ref_moved):
            assert float(m.abs().max()) <= bound + slack, k
        strong = ref_moved.abs() > bound / 2
        if k not in no_signal:
            assert torch.equal(moved[strong].sign(), ref_moved[strong].sign()), k


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
    assert_same_shared(result["shared"], naive, tmp_path)
    assert result["shared"]["whiten_err"] < 1e-12  # global whitening statistics over both ranks
    assert_export_is_trained_model(tmp_path)
    assert_same_ppo(result["ppo"], naive, tmp_path)
    assert result["ppo"]["drift"] == [0.0, 0.0]  # both ranks' replicas identical


def assert_same_shared(got: dict, naive: dict, run: Path):
    """Both roles' gradients averaged over the ranks (one all-reduce each) equal one process's:
    3 plain SGD steps on one fixed batch of 8 x 24 tokens."""
    ref = naive["result"]["shared"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    assert pytest.approx(sum(got["grad_norm"], []), rel=RTOL) == sum(ref["grad_norm"], [])
    for role in ("actor", "critic"):
        assert_same_weights(run / f"shared-{role}.safetensors", naive["out"] / f"shared-{role}.safetensors",
                            lr=SHARED_LR, momentum=0.0)


def assert_same_ppo(got: dict, naive: dict, run: Path):
    """A greedy PPO run (2 epochs over one mini-batch of the rollout) on 2 x 4 rows equals one
    process on 8 rows: the rewards, losses (metrics averaged over ranks) and trained weights.
    Every answer is 8 tokens long, so the mean of the ranks' token means is the global mean."""
    ref = naive["result"]["ppo"]
    assert got["response_length"] == ref["response_length"] == [8.0] * STEPS
    assert got["reward"] == pytest.approx(ref["reward"], rel=1e-6)
    for key in ("policy_loss", "value_loss"):  # means of terms that cancel: relative to their scale
        scale = max(map(abs, ref[key]))
        assert got[key] == pytest.approx(ref[key], rel=RTOL, abs=RTOL * scale), key
    for role in ("actor", "critic"):  # 2 epochs x 1 mini-batch a step: 2 SGD steps per PPO step
        assert_same_weights(run / f"ppo-{role}.safetensors", naive["out"] / f"ppo-{role}.safetensors",
                            steps=2 * STEPS, lr=PPO_LR, momentum=0.0)


@pytest.mark.parametrize("stage,offload", [(2, "none"), (3, "cpu")])
def test_fsdp_matches_single_process(naive, tmp_path, stage, offload):
    """SFT, reward model and greedy PPO under FSDP equal one process, and so does an SFT run
    resumed from a sharded checkpoint (each rank saved and reloaded only its shard of the model
    and of the optimizer's momentum)."""
    result = launch(tmp_path, "--strategy", "fsdp", "--stage", str(stage), "--offload", offload, "--tasks",
                    "sft,resume,rm,ppo", "--ckpt-format", "sharded", "--greedy")
    assert_same_supervised(result, naive["result"], tmp_path, naive["out"])
    assert_same_run(result["resume"], naive["result"]["resume"])
    assert_same_ppo(result["ppo"], naive, tmp_path)
    assert_same_weights(tmp_path / "resumed.safetensors", naive["out"] / "resumed.safetensors", steps=STEPS + 2)
    ckpt = tmp_path / "sft/checkpoints" / f"step-{STEPS:07d}"
    assert sorted(p.name for p in ckpt.glob("model*")) == [f"model.rank0000{r}-of-00002.safetensors" for r in (0, 1)]
    # after the resumed run, the export is the 5-step model, as in one process
    assert_same_weights(tmp_path / "sft/final/model.safetensors", naive["out"] / "sft/final/model.safetensors",
                        steps=STEPS + 2)


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
    assert_same_weights(tmp_path / "resumed.safetensors", naive["out"] / "resumed.safetensors", steps=STEPS + 2)
    # after the resumed run, the export is the 5-step model, as in one process
    assert_same_weights(tmp_path / "sft/final/model.safetensors", naive["out"] / "sft/final/model.safetensors",
                        steps=STEPS + 2)
    assert_same_weights(tmp_path / "rm.safetensors", naive["out"] / "rm.safetensors")
    # naive -> FSDP: loaded into a sharded model and gathered back, bit for bit.
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
    assert_same_shared(result["shared"], naive, tmp_path)
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
    SFT and the reward model train with the trainers' AdamW, offloaded (DeepSpeed steps it on
    the CPU copy of the weights): losses and gradient norms to rounding, weights to what Adam
    guarantees (module doc). The reward head's bias has a true gradient of exactly 0 (the
    pairwise loss depends on r_chosen - r_rejected only): only its bound is checked."""
    result = launch(tmp_path, "--strategy", "deepspeed", "--stage", "2", "--offload", "cpu", "--accum", "2",
                    "--tasks", "sft,rm,ppo", "--greedy", optim="adamw")
    ref_out = naive_accum["out"]
    for task in ("sft", "rm"):
        assert_same_run(result[task], naive_accum["result"][task])
        assert_adam_consistent(tmp_path / f"{task}.safetensors", ref_out / f"{task}.safetensors",
                               ref_out / f"{task}-init.safetensors", tmp_path / f"{task}-init.safetensors",
                               no_signal=("head.bias",))
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
        proc = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=300)
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
    bf16 keeps 8 bits of mantissa ~ 4e-3 per operation), and only fp32 adapter tensors are saved.
    AdamW here (the trainers' own optimizer): the loss must fall in 3 steps."""
    result = launch(tmp_path, "--strategy", "fsdp", "--stage", "2", "--tasks", "sft", "--lora", "4",
                    "--dtype", "bf16", optim="adamw")
    ref = naive["lora_result"]["sft"]["loss"]
    got = result["sft"]["loss"]
    assert all(math.isfinite(x) for x in got)
    assert got[0] == pytest.approx(ref[0], rel=2e-2)
    assert got[-1] < got[0]
    saved = load_file(tmp_path / "sft.safetensors")
    assert saved and all(".lora_" in k and v.dtype == torch.float32 for k, v in saved.items())


def test_only_a_failing_process_group_reads_as_a_lost_peer():
    """A lost peer stops the run with one line saying how to resume (tests/test_multinode.py
    kills a node); any other error, in one process or many, keeps its own message."""
    from frugal_rlhf.strategies.base import NaiveStrategy
    from frugal_rlhf.strategies.ddp import DistributedStrategy
    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:15271. This is typically caused by a remote worker crashing.")
    ours = DistributedStrategy()
    assert ours.lost_peer(gloo) == "Connection closed by peer [127.0.0.1]:15271"
    assert ours.lost_peer(torch.distributed.DistBackendError("NCCL communicator was aborted")) == \
        "NCCL communicator was aborted"
    assert ours.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert NaiveStrategy().lost_peer(gloo) is None
