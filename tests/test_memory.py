"""The memory planner: its estimate on hand-computed cases, its choices, exact accumulation under
a tight budget, and a clear refusal that writes nothing."""
import pytest
import torch

from conftest import arithmetic_rows
from frugal_rlhf.app.stages import run_stage
from frugal_rlhf.cli import main
from frugal_rlhf.config import SFTConfig
from frugal_rlhf.errors import UserError
from frugal_rlhf.models import memory as M
from frugal_rlhf.trainers import supervised
from frugal_rlhf.trainers.supervised import SFTTrainer

SHAPE = M.Shape(params=1000, layers=2, hidden=4, vocab=10, kv_width=2, weight_bytes=2, trained=50, extra_weights=0,
                load_bytes=4000)
COSTS = M.Costs(per_token=100, per_token_sq=1, per_layer=10, checkpointed=8)
R = M.RUNTIME_BYTES
F = M.ACTIVATION_RSS


def test_parse_size():
    assert M.parse_size("4GiB") == 4 * 2**30 and M.parse_size("8GB") == 8 * 10**9
    assert M.parse_size("1.5MiB") == 1572864 and M.parse_size("1234") == 1234
    with pytest.raises(UserError, match="4GiB"):
        M.parse_size("four")


def test_estimate_sft_by_hand():
    work = M.Work("sft", batch=4, accum=1, seq_len=8)
    # one layer, 2 sequences of 8 tokens: 10 + 16 * (100 + 8 * 1) = 1738 bytes; 2 layers + 1 in flight
    parts = M.estimate(SHAPE, COSTS, work, micro=2, checkpointing=False)
    assert parts["activations"] == int(F * 3 * 1738)
    assert parts["weights"] == 2000 and parts["trained"] == 50 * 16   # adapter: weight + gradient + 2 moments
    assert parts["logits"] == 16 * 10 * 4 * 4                          # 16 tokens (< one chunk) x vocab x fp32 x 4
    assert parts["peak"] == R + 2000 + 800 + int(F * 5214) + 2560       # above the load's R + 2000 + 4000
    # checkpointing: each layer keeps its input (8 bytes a token), one layer recomputed beside its gradients
    # (with the lean heap, which a checkpointing plan holds: its own RSS factor)
    assert M.estimate(SHAPE, COSTS, work, 2, True)["activations"] == int(M.ACTIVATION_RSS_LEAN * (2 * 16 * 8 + 2 * 1738))


def test_estimate_rm_ppo_and_full_by_hand():
    rm = M.estimate(SHAPE, COSTS, M.Work("rm", batch=4, accum=1, seq_len=8), micro=1, checkpointing=False)
    assert rm["activations"] == int(F * 3 * 1738) and rm["logits"] == 0       # a pair is two sequences; a score head
    full = M.estimate(M.Shape(**{**SHAPE.__dict__, "trained": 0, "weight_bytes": 4}), COSTS,
                      M.Work("sft", 4, 1, 8), 2, False)
    assert full["weights"] == 4000 and full["trained"] == 1000 * 12  # fp32 weights + gradient and 2 moments
    ppo = M.Work("ppo", batch=2, accum=1, seq_len=8, rollout=4, roles_trained=2)
    parts = M.estimate(SHAPE, COSTS, ppo, micro=2, checkpointing=False)
    assert parts["kv_cache"] == 4 * 8 * 2 * 2 * 2 * 2                  # seqs x tokens x layers x (k, v) x width x bf16
    assert parts["trained"] == 2 * 800                                 # actor and critic adapters
    rollout = R + 2000 + 1600 + 512 + (10 + 32 * 108)                  # scoring: one layer of the whole rollout
    update = R + 2000 + 1600 + int(F * 3 * 1738) + 2560
    assert parts["peak"] == max(rollout, update)


def test_plan_prefers_micro_batches_before_checkpointing_and_refuses_in_one_line():
    work = M.Work("sft", batch=4, accum=2, seq_len=8)
    peak = {(m, c): M.estimate(SHAPE, COSTS, work, m, c)["peak"] for m, c in M.choices(work)}
    assert M.choices(work) == [(4, False), (2, False), (1, False), (4, True), (2, True), (1, True)]
    p = M.plan(SHAPE, COSTS, work, peak[(2, False)])
    assert (p.micro, p.accum, p.checkpointing) == (2, 4, False)       # 2 x 4 = the 4 x 2 asked for
    assert M.plan(SHAPE, COSTS, work, peak[(1, True)]).checkpointing   # (1, False) needs more than (1, True)
    with pytest.raises(UserError) as e:
        M.plan(SHAPE, COSTS, work, peak[(1, True)] - 1)
    assert "nothing fits" in str(e.value) and "\n" not in str(e.value)
    assert "micro-batch" in M.table(p, work) and "predicted peak" in M.table(p, work)


def mixed_rows():
    # answers of very different lengths: micro-batches carry different token counts, so a mean of
    # per-micro-batch means would differ from the loss of the whole batch
    return arithmetic_rows(24) + [{"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "ab" * (3 + 7 * i)}]}
                                  for i in range(24)]


def sft_run(tmp_path, rows, budget):
    cfg = SFTConfig(model="tiny-llama", output=str(tmp_path), max_steps=4, batch_size=8, lr=0.05, max_length=96,
                    save_every=0, eval_every=0, eval_split=0, dtype="fp32", warmup_ratio=0.0,
                    memory_budget=budget)
    return run_stage(cfg, lambda s, c: SFTTrainer(s, c, rows=rows),
                     lambda strategy, trainer, metrics: (trainer.config, [m for m in metrics if m["step"] > 0]))


def test_tight_budget_accumulates_and_checkpoints_with_the_same_loss_curve(tmp_path, monkeypatch):
    # SGD, not Adam: Adam turns rounding differences into weight moves of ~lr (design.md), SGD keeps
    # them at rounding size, so the curves must agree to the rounding of the sums.
    monkeypatch.setattr(supervised, "make_optimizer", lambda params, lr, wd: torch.optim.SGD(
        [p for p in params if p.requires_grad], lr=lr))
    held = []  # the real call would change this test process's heap for the tests after it
    monkeypatch.setattr(M, "use_lean_heap", lambda: held.append(True))
    rows = mixed_rows()
    free, curve = sft_run(tmp_path / "free", rows, "off")
    assert not held
    cfg = SFTConfig(model="tiny-llama", batch_size=8, max_length=96, dtype="fp32")
    shape, costs = M.shape_of(cfg)
    work = M.work_of(cfg)
    budget = M.estimate(shape, costs, work, 2, True)["peak"]
    assert budget < M.estimate(shape, costs, work, 1, False)["peak"]  # only checkpointing fits it
    planned, tight = sft_run(tmp_path / "tight", rows, str(budget))
    assert (free.batch_size, free.grad_accum, free.gradient_checkpointing) == (8, 1, False)
    assert (planned.batch_size, planned.grad_accum, planned.gradient_checkpointing) == (2, 4, True)
    assert held == [True]  # a checkpointing plan holds the heap lean, as its prediction assumes
    for a, b in zip(curve, tight, strict=True):
        # a sum of n fp32 terms is exact to n * eps relative (n: the answer tokens of the step)
        assert a["tokens"] == b["tokens"] and a["sequences"] == b["sequences"]
        assert b["loss"] == pytest.approx(a["loss"], rel=a["tokens"] * torch.finfo(torch.float32).eps)


def test_a_given_budget_holds_the_heap_lean_even_without_checkpointing(tmp_path, monkeypatch):
    """A size is a ceiling: the nf4 demo's reward-model stage, planned at 1.23 GiB without
    checkpointing under --memory-budget 1.5GiB, peaked at 2.28 GiB on a heap left to glibc.
    `auto` (a plan for what is free) leaves the heap alone unless its plan checkpoints."""
    held = []
    monkeypatch.setattr(M, "use_lean_heap", lambda: held.append(True))
    planned, _ = sft_run(tmp_path / "roomy", mixed_rows(), "20GiB")
    assert not planned.gradient_checkpointing and held == [True]
    held.clear()
    planned, _ = sft_run(tmp_path / "auto", mixed_rows(), "auto")
    assert not planned.gradient_checkpointing and not held


def test_budget_too_small_refuses_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["sft", "--model", "tiny-llama", "--data", "unused.jsonl", "--output", str(out),
                 "--memory-budget", "100MiB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("frugal sft: error: --memory-budget 0.10 GiB: nothing fits")


def test_auto_tries_the_smallest_efficient_micro_batch_first():
    work = M.Work("sft", batch=8, accum=1, seq_len=100)
    # micro-batches of at least 300 tokens: 4 (400 tokens) first, then 8, then the smaller ones
    assert M.choices(work, lean_from=300) == [(4, False), (8, False), (2, False), (1, False),
                                             (4, True), (8, True), (2, True), (1, True)]
    # a pair is two sequences: one pair of 2 x 100 tokens already reaches 200
    assert M.choices(M.Work("rm", 4, 1, 100), lean_from=200)[:2] == [(1, False), (2, False)]
    # nothing big enough: the whole batch first, as without lean_from
    assert M.choices(work, lean_from=10**6) == M.choices(work)
    p = M.plan(SHAPE, COSTS, M.Work("sft", batch=4, accum=2, seq_len=8), 10**12, lean_from=16)
    assert (p.micro, p.accum, p.checkpointing) == (2, 4, False)  # 2 rows x 8 tokens, 4 x 2 = the 8 asked for


def test_auto_is_the_default_and_keeps_the_loss_curve(tmp_path, monkeypatch):
    """The default budget (auto) splits the batch into the smallest micro-batch of at least
    LEAN_MICRO_TOKENS tokens, accumulated exactly: the loss curve of the unplanned run."""
    assert SFTConfig().memory_budget == "auto" and SFTConfig().lora_rank == 16
    monkeypatch.setattr(supervised, "make_optimizer", lambda params, lr, wd: torch.optim.SGD(
        [p for p in params if p.requires_grad], lr=lr))
    monkeypatch.setattr(M, "use_lean_heap", lambda: None)
    monkeypatch.setattr(M, "LEAN_MICRO_TOKENS", 2 * 96)  # two rows of max_length 96
    rows = mixed_rows()
    off, curve = sft_run(tmp_path / "off", rows, "off")
    auto, lean = sft_run(tmp_path / "auto", rows, "auto")
    assert (off.batch_size, off.grad_accum) == (8, 1)
    assert (auto.batch_size, auto.grad_accum, auto.gradient_checkpointing) == (2, 4, False)
    for a, b in zip(curve, lean, strict=True):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=a["tokens"] * torch.finfo(torch.float32).eps)


def test_a_quantized_base_is_planned_with_its_stored_bytes():
    cfg = SFTConfig(model="tiny-llama", batch_size=2, max_length=32, dtype="fp32")
    dense, _ = M.shape_of(cfg)
    nf4, _ = M.shape_of(SFTConfig(**{**cfg.__dict__, "quantize_base": "nf4"}))
    assert nf4.params == dense.params and dense.base_bytes == dense.params * 4
    # the layers' weights at 0.5625 bytes (codes and absmax), the embeddings stay fp32
    layer_elems = (dense.base_bytes - nf4.base_bytes) / (4 - 0.5625)
    assert 0 < layer_elems < dense.params
    assert M.unmodelled(SFTConfig(quantize_base="nf4")) is None


def test_auto_runs_an_unmodelled_stage_as_configured():
    from frugal_rlhf.config import PPOConfig

    cfg = PPOConfig(model="tiny-llama", lora_rank=0)  # four separate models: not modelled
    assert M.apply_plan(cfg) is cfg
    with pytest.raises(UserError, match="needs --lora-rank"):
        M.apply_plan(PPOConfig(model="tiny-llama", lora_rank=0, memory_budget="4GiB"))


def test_sampling_batch_fits_the_kv_cache_and_logits_in_the_budget():
    from frugal_rlhf.models.loading import load_config

    config = load_config("tiny-llama")
    text = config.get_text_config()
    kv = text.num_hidden_layers * 2 * (text.num_key_value_heads * text.hidden_size // text.num_attention_heads)
    per_row = kv * 100 * 2 + M.LOGIT_COPIES * text.vocab_size * 4  # 100 tokens in bf16, fp32 logits rows
    assert M.sampling_batch(config, 2, 32, 100, budget=10 * per_row) == 10
    assert M.sampling_batch(config, 2, 8, 100, budget=10 * per_row) == 8
    assert M.sampling_batch(config, 2, 8, 100, budget=per_row // 2) == 1  # at least one row
