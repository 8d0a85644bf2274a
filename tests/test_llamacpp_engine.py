"""The llama.cpp rollout engine (generation/llamacpp.py) against our torch engine, the reference.

On a tiny model whose weights are exact in f16 the engine's only rounding is of its matmul
inputs (tests/llamacpp_bounds.py): greedy answers equal ours up to a step where our top-2
margin is within that bound, with log-probs within it. Runs where the [llamacpp] extra is
installed; skipped (saying so) elsewhere.
"""
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [llamacpp] extra) is not installed")

from llamacpp_bounds import assert_greedy_agrees  # noqa: E402
from frugal_rlhf.data.tokenize import PromptCollator, encode_prompt  # noqa: E402
from frugal_rlhf.generation import SampleConfig  # noqa: E402
from frugal_rlhf.generation import llamacpp  # noqa: E402
from frugal_rlhf.generation.engines import make_engine  # noqa: E402
from frugal_rlhf.models.loading import build_tiny  # noqa: E402
from frugal_rlhf.models.roles import Actor, SharedLM  # noqa: E402

PROMPTS = ["Hello there", "What is 2 plus 2?", "x"]  # different lengths: left padding in the batch


def f16_exact_policy(rank=0, seed=0):
    """tiny-llama with every weight rounded to f16 (the engine's copy is then exact), as a
    plain policy or, with `rank`, a LoRA adapter on it."""
    model, tok = build_tiny("tiny-llama", seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    lm = SharedLM(model.eval())
    if rank:
        lm.add_adapter("actor", rank)
    return Actor(lm, "actor" if rank else None), tok


def prompts(tok, texts=PROMPTS):
    rows = [{"prompt_ids": encode_prompt(tok, [{"role": "user", "content": p}], 64)} for p in texts]
    batch = PromptCollator(tok.pad_token_id)(rows)
    return batch["input_ids"], batch["attention_mask"]


def greedy(tok, n=16):
    return SampleConfig(n, 0.0, 0, 1.0, (tok.eos_token_id,), tok.pad_token_id)


def answers(ro):
    """Each row's prompt tokens and answer tokens (with their log-probs)."""
    p = ro.prompt_length
    for seq, attn, act, lp in zip(ro.sequences, ro.attention_mask, ro.action_mask, ro.logprobs):
        yield seq[:p][attn[:p].bool()].tolist(), seq[p:][act.bool()].tolist(), lp[act.bool()].tolist()


def assert_engines_agree(policy, ours, theirs) -> int:
    steps = 0
    with torch.no_grad(), policy.lm.role(policy.adapter) as model:
        for (prompt, a, _), (prompt2, b, b_logprobs) in zip(answers(ours), answers(theirs)):
            assert prompt == prompt2
            steps += assert_greedy_agrees(model, prompt, a, b, b_logprobs, "f16")
    return steps


def test_greedy_rollouts_equal_the_torch_engines_where_weights_are_exact():
    policy, tok = f16_exact_policy()
    ids, mask = prompts(tok)
    ours = make_engine("torch").generate(policy, ids, mask, greedy(tok))
    engine = make_engine("llamacpp", tokenizer=tok, quant="f16")
    try:
        theirs = engine.generate(policy, ids, mask, greedy(tok))
        assert theirs.sequences.shape[0] == 3 and theirs.prompt_length == ours.prompt_length
        assert torch.equal(theirs.sequences[:, :ours.prompt_length], ids)
        compared = assert_engines_agree(policy, ours, theirs)
        assert compared >= 3 * 16 // 2, compared  # most steps are decided beyond rounding
        # A group of copies shares one prefill (its cells copied to the other sequences).
        group = engine.generate(policy, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), greedy(tok),
                                group=2)
        assert torch.equal(group.sequences[::2], theirs.sequences) and torch.equal(group.sequences[1::2],
                                                                                    theirs.sequences)
    finally:
        engine.close()


def test_rows_are_decoded_together_one_decode_per_step(monkeypatch):
    policy, tok = f16_exact_policy()
    ids, mask = prompts(tok)
    calls = []
    real = llamacpp.LlamaBatch._decode
    monkeypatch.setattr(llamacpp.LlamaBatch, "_decode", lambda self, entries: calls.append(len(entries))
                        or real(self, entries))
    engine = make_engine("llamacpp", tokenizer=tok)
    try:
        ro = engine.generate(policy, ids, mask, SampleConfig(8, 0.0, 0, 1.0, (), tok.pad_token_id))
    finally:
        engine.close()
    assert ro.action_mask.shape[1] == 8
    assert calls[0] == int(mask.sum())  # one prefill of every prompt's real tokens
    assert calls[1:] == [3] * 7  # then one decode per step with a token of every row (no stop token here)


def test_a_lora_update_reaches_the_engine():
    policy, tok = f16_exact_policy(rank=4)
    ids, mask = prompts(tok)
    ref, engine = make_engine("torch"), make_engine("llamacpp", tokenizer=tok)
    try:
        before = ref.generate(policy, ids, mask, greedy(tok))
        assert_engines_agree(policy, before, engine.generate(policy, ids, mask, greedy(tok)))
        # One optimizer step toward answering "zzzz": the trainer's greedy answers change.
        target = torch.tensor([[tok.convert_tokens_to_ids("z")] * 4])
        optim = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
        seq = torch.cat([ids[:1], target], 1)
        logp, _ = policy(seq, torch.ones_like(seq), 4)
        (-logp.sum()).backward()
        optim.step()
        engine.sync(policy)
        after = ref.generate(policy, ids, mask, greedy(tok))
        assert not torch.equal(after.sequences, before.sequences)
        assert assert_engines_agree(policy, after, engine.generate(policy, ids, mask, greedy(tok))) > 0
    finally:
        engine.close()


def test_sampling_is_reproducible_from_the_runs_generator():
    policy, tok = f16_exact_policy()
    ids, mask = prompts(tok)
    cfg = SampleConfig(12, 1.0, 0, 1.0, (tok.eos_token_id,), tok.pad_token_id)
    engine = make_engine("llamacpp", tokenizer=tok, quant="q8_0")
    try:
        a, b, c = (engine.generate(policy, ids, mask, cfg, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    finally:
        engine.close()
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    assert ((a.logprobs <= 0) | (a.action_mask == 0)).all()


def test_grpo_runs_on_llamacpp_and_logs_mismatch_and_tis(tmp_path):
    from test_ppo import run_ppo

    trainer, metrics = run_ppo(tmp_path, advantage="group", group_size=4, rollout_batch_size=4, batch_size=16,
                               ppo_epochs=1, max_steps=2, rollout_engine="llamacpp", tis_cap=2.0)
    assert trainer.engine.name == "llamacpp" and not trainer.engine.matches_trainer
    for m in metrics:
        assert 0.0 <= m["gen_logprob_mismatch_mean"] <= m["gen_logprob_mismatch"], m
        assert m["gen_kl"] >= 0.0 and 0.0 < m["tis_weight_mean"] <= 2.0 and 0.0 <= m["tis_clipped_frac"] <= 1.0, m
    # fp32 weights written in f16: the engine differs from the trainer, by a little
    assert any(m["gen_logprob_mismatch"] > 0 for m in metrics)
    assert (tmp_path / "ppo" / "final" / "config.json").exists()
