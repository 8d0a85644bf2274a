import json
import random

import pytest
import torch

from conftest import TEST_SEED
from frugal_rlhf.config import RewardConfig
from frugal_rlhf.models.loading import byte_tokenizer, prepare_tokenizer
from frugal_rlhf.models.reward_io import load_reward_model
from frugal_rlhf.data.tokenize import last_token_index
from frugal_rlhf.models.roles import RewardModel
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.reward import RewardTrainer, evaluate_reward_model

WORDS = "apple river stone cloud paper glass music tiger orange window garden silver".split()


def marker_pairs(n, seed=0):
    """Chosen answers contain the marker word 'please', rejected ones don't: a known answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        other = rng.sample(WORDS, 4)
        pos = rng.randrange(4)
        chosen = " ".join(words[:pos] + ["please"] + words[pos:])
        rows.append({"prompt": [{"role": "user", "content": f"Say some words ({i})"}], "chosen": chosen,
                     "rejected": " ".join(other), "margin": None})
    return rows


def train_rm(tmp_path, rows, stop_at=None, **kw):
    cfg = RewardConfig(**{"model": "tiny-llama", "output": str(tmp_path / "rm"), "max_steps": 60, "batch_size": 8,
                          "lr": 3e-3, "max_length": 96, "save_every": 0, "eval_every": 0, "dtype": "auto",
                          "eval_split": 0.2, "seed": TEST_SEED, **kw})
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    trainer = RewardTrainer(strategy, cfg, rows=rows)
    return trainer, trainer.fit(stop_at=stop_at)


@pytest.mark.parametrize("pooling,head_lr,quantize", [("last", None, "none"), ("mean", None, "none"),
                                                     ("mean", 3e-2, "none"), ("last", None, "nf4")])
def test_reward_model_learns_marker_task_and_reloads(tmp_path, pooling, head_lr, quantize):
    """In the compute dtype FRUGAL_DTYPE (or the machine) picks. The frozen base is kept in it, so
    a reload in that dtype gives identical scores; the merged standalone model rounds W + BA to it
    once per weight: in fp32 (eps 1.2e-7) that is below 1e-4, in bf16 (eps 2^-7, half of it per
    rounding) each of the 4 blocks' 2 matmul layers can add ~2^-8 relative, ~3% of the scores.
    On an nf4 base the artifact records the format and the adapter reloads onto the same codes;
    the standalone model is the de-quantized base with the adapter merged."""
    trainer, metrics = train_rm(tmp_path, marker_pairs(240, seed=TEST_SEED), lora_rank=8, pooling=pooling,
                                head_lr=head_lr, quantize_base=quantize)
    groups = trainer.optim.param_groups
    if head_lr:  # the head in a group of its own, at 10x the adapter's rate through the whole schedule
        assert [p.shape for p in groups[1]["params"]] == [p.shape for p in trainer.model.head.parameters()]
        assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * head_lr / 3e-3)
    else:
        assert len(groups) == 1
    dtype = trainer.strategy.dtype
    result = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert result["n_pairs"] == 48
    assert result["accuracy"] >= 0.95, result
    assert result["mean_margin"] > 0
    train = [m for m in metrics if m["step"] > 0]
    assert train[-1]["loss"] < train[0]["loss"]
    # Step 0 is the held-out baseline before any update: the final accuracy is measured against it.
    assert metrics[0]["step"] == 0 and metrics[0]["eval_accuracy"] < result["accuracy"]
    # A saved reward model reloads and gives identical scores.
    live = trainer.model.eval()
    fresh = marker_pairs(8, seed=TEST_SEED + 1000)  # unseen pairs of the task: chosen first, rejected after
    prompts = [r["prompt"][0]["content"] for r in fresh] * 2
    responses = [r["chosen"] for r in fresh] + [r["rejected"] for r in fresh]
    expected = live.score(prompts, responses)
    reloaded = load_reward_model(tmp_path / "rm", dtype=dtype)
    assert reloaded.pooling == pooling
    torch.testing.assert_close(reloaded.score(prompts, responses), expected)
    standalone = load_reward_model(tmp_path / "rm" / "final", dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 0.03 * float(expected.abs().max())
    torch.testing.assert_close(standalone.score(prompts, responses), expected, atol=tol, rtol=tol)
    assert expected[:8].mean() > expected[8:].mean()  # one pair can go either way at 95% accuracy; 8 together do not
    # --eval-only scoring of the held-out pairs agrees with training's own evaluation.
    held = evaluate_reward_model(reloaded, trainer.eval_loader.dataset.rows, max_length=96)
    assert held["accuracy"] == pytest.approx(result["accuracy"])


@pytest.mark.parametrize("lora_rank,quantize", [(0, "none"), (8, "nf4")])
def test_reward_model_resume_equals_uninterrupted(tmp_path, lora_rank, quantize):
    rows = marker_pairs(40)
    kw = dict(max_steps=6, save_every=2, lora_rank=lora_rank, quantize_base=quantize)
    _, full = train_rm(tmp_path / "a", rows, **kw)
    train_rm(tmp_path / "b", rows, stop_at=4, **kw)
    _, resumed = train_rm(tmp_path / "b", rows, resume=True, **kw)
    assert [m["step"] for m in resumed] == [m["step"] for m in full]
    for a, b in zip(full[5:], resumed[5:]):  # the step-0 evaluation, then steps 5 and 6
        for key in ("loss", "accuracy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert full[-1]["eval_accuracy"] == resumed[-1]["eval_accuracy"]


def test_score_read_at_last_real_token_any_padding():
    rm = RewardModel("tiny-llama", lora_rank=0, dtype="fp32").eval()
    torch.nn.init.normal_(rm.head.weight)
    tok = rm.tokenizer
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id
    left = torch.tensor([[pad, pad, pad] + ids])
    right = torch.tensor([ids + [pad, pad, pad]])
    bare = torch.tensor([ids])
    mask = lambda x: (x != pad).long()  # noqa: E731
    with torch.no_grad():
        scores = [rm(x, mask(x)) for x in (bare, left, right)]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-5, rtol=1e-5)
    assert last_token_index(mask(left)).item() == left.shape[1] - 1
    assert last_token_index(mask(right)).item() == len(ids) - 1


def test_pairs_use_the_ppo_format():
    from frugal_rlhf.data.tokenize import encode_prompt
    from frugal_rlhf.trainers.reward import encode_pair

    tok = prepare_tokenizer(byte_tokenizer())
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}
    enc = encode_pair(tok, row, 64)
    prompt = encode_prompt(tok, row["prompt"], 64)
    assert enc["chosen"][:len(prompt)] == prompt == enc["rejected"][:len(prompt)]
    assert tok.decode(enc["chosen"][len(prompt):]) == "yes<|im_end|>"
    # A long conversation before short answers keeps all the context the answers leave room for
    # (not half of max_length), cut on the left the same way for both.
    long = {**row, "prompt": [{"role": "user", "content": "x" * 200}]}
    enc = encode_pair(tok, long, 64)
    answer = len(tok("yes", add_special_tokens=False)["input_ids"]) + 1
    assert len(enc["chosen"]) == 64 and enc["chosen"][:64 - answer] == enc["rejected"][:64 - answer]
    assert enc["chosen"][:64 - answer] == encode_prompt(tok, long["prompt"], 64 - answer)


def test_artifact_on_a_relative_base_path_loads_from_another_directory(tmp_path, monkeypatch):
    """`frugal rm --model runs/sft/final` names its base relative to where it ran; the artifact
    stores it resolved, so PPO started from another directory still finds the base."""
    from frugal_rlhf.models.loading import load_model
    from frugal_rlhf.models.reward_io import save_reward_model

    hf, tok = load_model("tiny-llama", torch.float32)
    (tmp_path / "work").mkdir()
    hf.save_pretrained(tmp_path / "work" / "base")
    tok.save_pretrained(tmp_path / "work" / "base")
    monkeypatch.chdir(tmp_path / "work")
    rm = RewardModel("base", lora_rank=4, dtype="fp32")
    save_reward_model(rm, rm.tokenizer, "rm", base="base")
    monkeypatch.chdir(tmp_path)
    meta = json.loads((tmp_path / "work/rm/reward_model.json").read_text())
    assert meta["base"] == str((tmp_path / "work/base").resolve())
    loaded = load_reward_model(tmp_path / "work/rm", dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(ids, torch.ones_like(ids)), rm(ids, torch.ones_like(ids)), atol=1e-5)


def test_pairs_encode_their_shared_prompt_once_exactly():
    """Chosen and rejected share the prompt, which the collator lays out to be encoded once per
    pair: scores and gradients equal each sequence scored alone and a plain right-padded batch;
    a batch where sharing would cost more columns is padded plainly."""
    from frugal_rlhf.data.tokenize import PairCollator
    from frugal_rlhf.trainers.reward import encode_pair, pair_scores

    torch.manual_seed(0)
    rm = RewardModel("tiny-llama", lora_rank=4, dtype="fp32").eval()
    for name, p in rm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    tok = rm.tokenizer
    rows = [{"prompt": [{"role": "user", "content": "tell me about " + " ".join(WORDS[:n])}],
             "chosen": f"{WORDS[n]} please", "rejected": "no"} for n in (1, 6, 3)]
    pairs = [encode_pair(tok, r, 400) for r in rows]  # prompts of different lengths, none cut
    shared, plain = PairCollator(tok.pad_token_id)(pairs), PairCollator(tok.pad_token_id, share=False)(pairs)
    assert plain["shared"] == 0 and shared["shared"] > 0
    assert shared["encoded"] < plain["encoded"] == int(plain["attention_mask"].sum())

    def scores_and_grads(batch):
        rm.zero_grad()
        scores = pair_scores(rm, batch)
        (scores[0::2] - scores[1::2]).square().sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}

    got, got_grads = scores_and_grads(shared)
    expected, expected_grads = scores_and_grads(plain)
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for p in pairs for s in (p["chosen"], p["rejected"])])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected, alone, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == expected_grads.keys() and any("lora_A" in n for n in got_grads)
    for n in got_grads:
        torch.testing.assert_close(got_grads[n], expected_grads[n], atol=1e-5, rtol=1e-4, msg=n)

    # Short prompts before answers of very different lengths: sharing would pad more than it saves.
    uneven = [encode_pair(tok, {"prompt": [{"role": "user", "content": c}], "chosen": a, "rejected": "no"}, 400)
              for c, a in (("hi", "x " * 60), (" ".join(WORDS), "ok"))]
    assert PairCollator(tok.pad_token_id)(uneven)["shared"] == 0


def test_mean_pooled_score_is_the_mean_over_the_answer_in_every_layout():
    """pooling="mean": the head applied to the mean final hidden state of the answer's tokens
    (its end of turn included), computed by hand from the model's own hidden states; the
    shared-prefix pair batch, the plain one, score_texts (left-padded) and PPO's path (prompt
    columns masked) all give it, in fp32 (sums of ~100 terms: 1e-5 is ~100 eps)."""
    from frugal_rlhf.data.tokenize import PairCollator
    from frugal_rlhf.trainers.reward import encode_pair, pair_scores

    torch.manual_seed(0)
    rm = RewardModel("tiny-llama", lora_rank=4, dtype="fp32", pooling="mean").eval()
    for name, p in rm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    tok = rm.tokenizer
    rows = [{"prompt": [{"role": "user", "content": "tell me about " + " ".join(WORDS[:n])}],
             "chosen": f"{WORDS[n]} please {WORDS[n + 1]}", "rejected": f"{WORDS[n]} no"} for n in (1, 6, 3)]
    pairs = [encode_pair(tok, r, 400) for r in rows]
    shared, plain = PairCollator(tok.pad_token_id)(pairs), PairCollator(tok.pad_token_id, share=False)(pairs)
    assert shared["shared"] > 0
    with torch.no_grad():
        by_hand = []
        for pair in pairs:
            for seq, n in zip((pair["chosen"], pair["rejected"]), pair["answer"]):
                with rm.lm.role(rm.adapter) as model:
                    hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1]
                by_hand.append(rm.head(hidden[0, -n:].mean(0)).squeeze(-1))
        by_hand = torch.stack(by_hand)
        for batch in (shared, plain):
            torch.testing.assert_close(pair_scores(rm, batch), by_hand, atol=1e-5, rtol=1e-5)
        texts = rm.score([r["prompt"] for r in rows for _ in (0, 1)], [r[k] for r in rows for k in ("chosen", "rejected")])
        torch.testing.assert_close(texts, by_hand, atol=1e-5, rtol=1e-5)
    # The answer's first token is inside the pair's common prefix, yet every row reads it.
    assert all(p["chosen"][p["max_shared"]] == p["rejected"][p["max_shared"]] for p in pairs)
    with pytest.raises(ValueError, match="answer_mask"):
        rm(shared["input_ids"], shared["attention_mask"])
    with pytest.raises(ValueError, match="pooling"):
        RewardModel("tiny-llama", pooling="max")
