"""Tests for frugal_rlhf.generation on tiny random llama / gpt2 models."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import fp32_logprob_bound
from frugal_rlhf.generation import Rollout, SampleConfig, choose_next, reference_sample, sample

VOCAB = 97
PAD = 0


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2}


@pytest.fixture(params=list(MODELS), scope="module")
def model(request):
    return MODELS[request.param]()


PROMPTS = [[5, 17, 33, 8, 61, 2], [44, 9], [70, 12, 3, 90]]


def _left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _gen(r: Rollout):
    return r.sequences[:, r.prompt_length:]


def _check_consistent(r: Rollout, prompt_mask):
    """Masks agree with each other and with the sequences."""
    assert torch.equal(r.attention_mask[:, : r.prompt_length], prompt_mask)
    assert torch.equal(r.attention_mask[:, r.prompt_length:], r.action_mask)
    assert torch.all(_gen(r)[r.action_mask == 0] == PAD)
    # Once a row stops it stays stopped.
    assert torch.all(r.action_mask[:, 1:] <= r.action_mask[:, :-1])


def test_cached_equals_reference_sampling(model):
    ids, mask = _left_pad(PROMPTS)
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, pad_token_id=PAD)
    fast = sample(model, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    slow = reference_sample(model, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    assert fast.sequences.shape == (3, 6 + 12)
    assert torch.equal(fast.sequences, slow.sequences)
    assert torch.equal(fast.attention_mask, slow.attention_mask)
    assert torch.equal(fast.action_mask, slow.action_mask)
    # Same seed reproduces, another seed (almost surely) does not.
    again = sample(model, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    other = sample(model, ids, mask, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.sequences, again.sequences)
    assert not torch.equal(fast.sequences, other.sequences)


def test_group_prefill_equals_sampling_every_copy(model):
    # GRPO's copies of a prompt share one prefill: the samples must be those of the plain path.
    ids, mask = _left_pad(PROMPTS)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    cfg = SampleConfig(max_new_tokens=10, temperature=1.0, pad_token_id=PAD, eos_token_ids=(7,))
    plain = sample(model, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    grouped = sample(model, ids, mask, cfg, generator=torch.Generator().manual_seed(0), group=3)
    assert torch.equal(grouped.sequences, plain.sequences)
    assert torch.equal(grouped.action_mask, plain.action_mask)
    assert not torch.equal(plain.sequences[0], plain.sequences[1])  # copies sample different answers


def test_left_padding_invariance(model):
    # position_ids from the mask matter for gpt2's absolute positions; rotary (llama) only
    # sees relative offsets, so there the padding mask in the cached steps is what counts.
    ids, mask = _left_pad(PROMPTS)
    cfg = SampleConfig(max_new_tokens=10, temperature=0.0, pad_token_id=PAD)
    batch = _gen(sample(model, ids, mask, cfg))
    for i, p in enumerate(PROMPTS):
        alone = sample(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), cfg)
        assert torch.equal(_gen(alone)[0], batch[i]), f"row {i}"


def test_action_mask_stops_at_first_eos(model):
    ids, mask = _left_pad(PROMPTS)
    free = _gen(sample(model, ids, mask, SampleConfig(max_new_tokens=10, temperature=0.0, pad_token_id=PAD)))
    eos = int(free[0, 3])  # row 0 stops at step <= 3 (the first occurrence of this token)
    r = sample(model, ids, mask, SampleConfig(max_new_tokens=10, temperature=0.0, eos_token_ids=(eos,),
                                              pad_token_id=PAD))
    _check_consistent(r, mask)
    gen = _gen(r)
    n = gen.shape[1]
    for row in range(3):
        hits = (free[row] == eos).nonzero().flatten().tolist()
        stop = hits[0] if hits else None  # greedy is identical up to the stop
        expected_len = stop + 1 if stop is not None else 10
        assert r.action_mask[row].tolist() == [1] * expected_len + [0] * (n - expected_len)
        assert torch.equal(gen[row, :expected_len], free[row, :expected_len])
        assert torch.all(gen[row, expected_len:] == PAD)
        if stop is not None:
            assert gen[row, stop] == eos  # the EOS itself is kept and counted
    assert r.action_mask[0].sum() <= 4  # row 0 really stopped early


def test_stops_early_when_all_rows_hit_eos(model):
    ids, mask = _left_pad(PROMPTS)
    greedy = SampleConfig(max_new_tokens=10, temperature=0.0, pad_token_id=PAD)
    free = _gen(sample(model, ids, mask, greedy))
    # Several stop ids: every row's step-1 token is one, so every row stops by step 1.
    eos_ids = tuple(sorted(set(free[:, 1].tolist())))
    calls = []
    r = sample(model, ids, mask, SampleConfig(max_new_tokens=10, temperature=0.0, eos_token_ids=eos_ids,
                                              pad_token_id=PAD),
               on_step=lambda tok, fin: calls.append((tok.clone(), fin.clone())))
    _check_consistent(r, mask)
    assert r.action_mask.shape[1] <= 2 < 10
    assert calls[-1][1].all() and len(calls) == r.action_mask.shape[1]
    # Streaming sees exactly the generated columns.
    assert torch.equal(torch.stack([t for t, _ in calls], dim=1), _gen(r))


def test_on_step_false_stops_after_first_step(model):
    ids, mask = _left_pad(PROMPTS)
    seen = []

    def cancel(tok, fin):
        seen.append(tok.clone())
        return False

    r = sample(model, ids, mask, SampleConfig(max_new_tokens=10, pad_token_id=PAD),
               generator=torch.Generator().manual_seed(0), on_step=cancel)
    assert len(seen) == 1
    assert r.sequences.shape == (3, 7) and r.action_mask.shape == (3, 1)
    assert torch.equal(r.sequences[:, -1], seen[0])
    assert r.action_mask.all()


def test_top_k_one_equals_greedy(model):
    ids, mask = _left_pad(PROMPTS)
    greedy = sample(model, ids, mask, SampleConfig(max_new_tokens=8, temperature=0.0, pad_token_id=PAD))
    topk1 = sample(model, ids, mask, SampleConfig(max_new_tokens=8, temperature=1.3, top_k=1, pad_token_id=PAD),
                   generator=torch.Generator().manual_seed(123))
    assert torch.equal(greedy.sequences, topk1.sequences)


def test_choose_next_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(choose_next(logits, SampleConfig(top_k=2), g).tolist()) <= {0, 1}
    # probs ~ [.64, .24, .09, ...]: top_p=0.7 keeps {0, 1}; a tiny top_p still keeps the top token.
    assert set(choose_next(logits, SampleConfig(top_p=0.7), g).tolist()) == {0, 1}
    assert set(choose_next(logits, SampleConfig(top_p=1e-6), g).tolist()) == {0}
    assert set(choose_next(logits, SampleConfig(temperature=0.0), g).tolist()) == {0}


def test_choose_next_samples_the_softmax():
    """Frequencies of 40k draws match softmax(logits / T) (3 standard errors), and a token
    with probability 0 (-inf logit, top-k) is never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), -3.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = choose_next(logits, SampleConfig(temperature=1.5), g)
    freq = torch.bincount(drawn, minlength=6).double() / len(drawn)
    probs = (logits[0].double() / 1.5).softmax(-1)
    assert freq[4] == 0
    assert torch.all((freq - probs).abs() <= 3 * (probs * (1 - probs) / len(drawn)).sqrt() + 1e-12), (freq, probs)
    top3 = torch.bincount(choose_next(logits, SampleConfig(top_k=3), g), minlength=6)
    assert top3[3:].sum() == 0 and torch.all(top3[:3] > 0)


def test_restores_training_flag_and_outputs_are_trainable():
    model = _llama().train()
    ids, mask = _left_pad(PROMPTS)
    r = sample(model, ids, mask, SampleConfig(max_new_tokens=3, pad_token_id=PAD),
               generator=torch.Generator().manual_seed(0))
    assert model.training
    # Rollout tensors must be usable in a PPO update (inference tensors would raise here).
    loss = model(input_ids=r.sequences, attention_mask=r.attention_mask).logits.mean()
    loss.backward()


def test_peft_wrapped_model_matches_reference():
    peft = pytest.importorskip("peft")
    base = _llama()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, init_lora_weights=False))
    ids, mask = _left_pad(PROMPTS)
    cfg = SampleConfig(max_new_tokens=6, top_k=10, pad_token_id=PAD)
    fast = sample(lora, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    slow = reference_sample(lora, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast.sequences, slow.sequences)


# ---- the engine: decode batch with a preallocated cache, rows joining and leaving ----------------

from frugal_rlhf.generation import DecodeBatch  # noqa: E402


def test_greedy_equals_hf_generate_with_rows_leaving_early(model):
    """Greedy tokens equal an independent implementation (HF generate, fp32) token for token,
    while rows stop at different steps and leave the decode batch."""
    ids, mask = _left_pad(PROMPTS)
    free = _gen(sample(model, ids, mask, SampleConfig(max_new_tokens=12, temperature=0.0, pad_token_id=PAD)))
    eos = int(free[1, 2])  # row 1 stops by step 2; the others later or never
    cfg = SampleConfig(max_new_tokens=12, temperature=0.0, eos_token_ids=(eos,), pad_token_id=PAD)
    ours = sample(model, ids, mask, cfg)
    lengths = ours.action_mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # uneven: rows really left at different steps
    with torch.inference_mode():
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            eos_token_id=eos, pad_token_id=PAD)[:, ids.shape[1]:]
    for row, n in enumerate(lengths):
        assert torch.equal(_gen(ours)[row, :n], hf[row, :n]), f"row {row}"
    assert torch.equal(ours.sequences, reference_sample(model, ids, mask, cfg).sequences)


def test_engine_logprobs_equal_the_trainers_forward(model):
    from frugal_rlhf.models.roles import token_logprobs

    ids, mask = _left_pad(PROMPTS)
    cfg = SampleConfig(max_new_tokens=10, temperature=0.7, top_k=30, pad_token_id=PAD, eos_token_ids=(7,))
    r = sample(model, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    n = r.action_mask.shape[1]
    with torch.no_grad():  # the trainer's computation: full forward, chunked log-softmax at the temperature
        out = model(input_ids=r.sequences, attention_mask=r.attention_mask,
                    position_ids=(r.attention_mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
        trainer, _ = token_logprobs(out.hidden_states[-1][:, -n - 1:-1], model.get_output_embeddings(),
                                    r.sequences[:, -n:], temperature=0.7)
    act = r.action_mask.bool()
    bound = fp32_logprob_bound(model.config, float(out.logits.abs().max()) / 0.7)
    mismatch = float((r.logprobs - trainer)[act].abs().max())
    assert mismatch <= bound, (mismatch, bound)
    assert torch.all(r.logprobs[~act] == 0) and torch.all(r.logprobs[act] < 0)


def test_a_logged_entropy_carries_no_graph_and_changes_no_gradient():
    """PPO logs the actor's entropy without training on it (entropy_coef 0): then it is computed
    without a graph (its softmax would be kept through the LM head's backward), with the same
    values, and the log-probs' gradients are those of a run that trains on nothing else."""
    from frugal_rlhf.models.roles import LOGIT_CHUNK, token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, LOGIT_CHUNK // 2 + 3, 16)  # two chunks: the second one short
    targets = torch.randint(0, 50, hidden.shape[:2])
    runs = {}
    for grad in (True, False):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        logp, ent = token_logprobs(h, head, targets, 0.7, with_entropy=True, entropy_grad=grad)
        logp.sum().backward()
        runs[grad] = (logp.detach(), ent, h.grad, head.weight.grad.clone())
    assert runs[True][1].requires_grad and not runs[False][1].requires_grad
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def _alone(model, prompt, steps):
    r = sample(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
               SampleConfig(max_new_tokens=steps, temperature=0.0, pad_token_id=PAD))
    return _gen(r)[0].tolist()


def _greedy_through(batch: DecodeBatch, events: dict[int, list], steps: int) -> dict:
    """Drive a decode batch greedily: at step s the rows of events[s] join (each prompt alone,
    asking for `want` tokens); rows leave when they have them. Returns {name: tokens}."""
    out, want, pending = {}, {}, {}
    for s in range(steps):
        batch.leave([len(out[r]) < want[r] for r in batch.rows])
        for name, prompt, n in events.get(s, []):
            logits = batch.join(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), [name], n)
            out[name], want[name] = [int(logits.argmax(-1))], n
            pending[name] = out[name][-1]
        if not batch.rows:
            continue
        logits = batch.step(torch.tensor([pending[r] for r in batch.rows]))
        for r, tok in zip(batch.rows, logits.argmax(-1).tolist()):
            out[r].append(tok)
            pending[r] = tok
    return out


def test_rows_join_a_running_batch_and_reuse_freed_slots(model):
    """Continuous batching: rows of different lengths join at later steps, leave when done, and
    a later row takes a freed slot; each row's greedy tokens equal that prompt run alone."""
    events = {0: [("long", PROMPTS[0], 14)], 2: [("short", PROMPTS[1], 3)], 4: [("mid", PROMPTS[2], 6)],
              9: [("late", [11, 22, 33, 44, 55, 66, 77], 5)]}
    with torch.inference_mode():
        batch = DecodeBatch(model, slots=2)
        got = _greedy_through(batch, events, 20)
    for name, prompt, n in (e for evs in events.values() for e in evs):
        assert got[name] == _alone(model, prompt, n), name
    # "short" finished after 2 decode steps of its own while "long" kept running; "late"
    # could only join because a slot had been freed (2 slots, 4 rows).
    assert batch.steps < sum(n for evs in events.values() for _, _, n in evs)


def test_the_lm_head_gets_a_contiguous_prefill_row(model):
    """With logits_to_keep=1 the prefill's last position reached the head as a strided view, on
    which torch's CPU linear broadcast the head's weight to every row (+1.7 GiB for 32 prompts
    on SmolLM2-135M). The engine hands the head contiguous rows; its tokens are unchanged."""
    seen = []
    batch = DecodeBatch(model, slots=len(PROMPTS))  # before the hook below: it sees what the head gets
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous()))
    try:
        ids, mask = _left_pad(PROMPTS)
        with torch.inference_mode():
            batch.join(ids, mask, list(range(len(PROMPTS))), 4)
    finally:
        hook.remove()
    assert seen == [True]


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens(monkeypatch):
    """FRUGAL_COMPILE=1 compiles the decode step (inductor on CPU); rows leaving change the
    batch shape mid-rollout. Greedy tokens stay those of the eager engine."""
    model = _llama()
    ids, mask = _left_pad(PROMPTS)
    free = _gen(sample(model, ids, mask, SampleConfig(max_new_tokens=10, temperature=0.0, pad_token_id=PAD)))
    cfg = SampleConfig(max_new_tokens=10, temperature=0.0, eos_token_ids=(int(free[1, 2]),), pad_token_id=PAD)
    eager = sample(model, ids, mask, cfg)
    monkeypatch.setenv("FRUGAL_COMPILE", "1")
    compiled = sample(model, ids, mask, cfg)
    assert torch.equal(compiled.sequences, eager.sequences)
    monkeypatch.setenv("FRUGAL_COMPILE", "yes")
    with pytest.raises(ValueError, match="FRUGAL_COMPILE"):
        sample(model, ids, mask, cfg)


# ---- the rollout engines' registry (generation/engines.py) -----------------------------------
def test_engine_choice_auto_and_a_missing_extra(monkeypatch):
    import frugal_rlhf.engine_choice as C
    import frugal_rlhf.generation.engines as E
    from frugal_rlhf.errors import UserError

    assert isinstance(E.make_engine("torch"), E.TorchEngine) and E.TorchEngine.matches_trainer
    with pytest.raises(UserError, match="expected one of torch, llamacpp, vllm, auto, got 'tensorrt'"):
        E.make_engine("tensorrt")
    present = {"llama_cpp"}
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: object() if name in present else None)
    monkeypatch.setattr(C, "vllm_python", lambda: None)  # vLLM runs in its own environment: none here
    monkeypatch.delenv("FRUGAL_ROLLOUT_SERVER", raising=False)
    # auto: the installed engines in the measured order for the device
    assert E.resolve_engine("auto", "cpu") == "llamacpp" and E.resolve_engine("auto", "cuda") == "torch"
    assert E.resolve_engine("auto", "mps") == "torch" and E.resolve_engine("torch", "cpu") == "torch"
    # a CPU where our engine computes in bf16 on fast kernels decoded faster than llama.cpp's f16
    assert E.resolve_engine("auto", "cpu", torch.bfloat16) == "torch"
    assert E.resolve_engine("auto", "cpu", torch.float32) == "llamacpp"
    with pytest.raises(UserError, match=r"--rollout-engine vllm needs vLLM in its own environment: run `make vllm"):
        E.make_engine("vllm")
    monkeypatch.setenv("FRUGAL_ROLLOUT_SERVER", "http://127.0.0.1:8100")  # a server elsewhere counts as installed
    assert E.resolve_engine("auto", "cuda") == "vllm" and E.resolve_engine("auto", "cpu") == "llamacpp"
    monkeypatch.delenv("FRUGAL_ROLLOUT_SERVER")
    from frugal_rlhf.config import PPOConfig
    from frugal_rlhf.generation.engines import check_rollout_engine

    check_rollout_engine(PPOConfig(rollout_engine="auto", strategy="fsdp"))  # auto leaves sharded weights to torch
    with pytest.raises(ValueError, match="copies the policy's weights from one process: it needs --strategy naive"):
        check_rollout_engine(PPOConfig(rollout_engine="llamacpp", strategy="fsdp"))
    present.clear()
    assert E.resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(UserError, match=r"needs the llama_cpp package: pip install -e \.\[llamacpp\]"):
        E.make_engine("llamacpp")


@pytest.mark.parametrize("flags, message", [
    (["--rollout-engine", "tensorrt"], "--rollout-engine: expected one of torch, llamacpp, vllm, auto"),
    (["--rollout-engine", "vllm"], r"--rollout-engine vllm needs vLLM in its own environment: run `make vllm-env`"),
    (["--rollout-quant", "q5_k"], "--rollout-quant: expected one of f16, q8_0, q4_0, base"),
    (["--tis-cap", "0"], "--tis-cap must be > 0, not 0.0"),
    (["--tis-cap", "nan"], "--tis-cap must be a finite number, not nan"),
])
def test_rollout_flags_are_checked_before_anything_loads(tmp_path, capsys, monkeypatch, flags, message):
    import re

    import frugal_rlhf.engine_choice as C
    from test_run_safety import run_cli

    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: object() if name == "llama_cpp" else None)
    monkeypatch.setattr(C, "vllm_python", lambda: None)
    monkeypatch.delenv("FRUGAL_ROLLOUT_SERVER", raising=False)
    code, _, errors = run_cli(capsys, "ppo", "--model", "tiny-llama", "--output", tmp_path / "ppo", "--reward", "math",
                              "--advantage", "group", "--group-size", "2", *flags)
    assert code == 2 and len(errors) == 1 and re.search(message, errors[0]), errors
    assert not (tmp_path / "ppo").exists()
