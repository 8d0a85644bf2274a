import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import arithmetic_rows
from frugal_rlhf.config import SFTConfig
from frugal_rlhf.data.tokenize import IGNORE, TruncationStats, encode_conversation
from frugal_rlhf.models.loading import byte_tokenizer, load_model, prepare_tokenizer
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.supervised import SFTTrainer


def run_sft(tmp_path, rows, stop_at=None, baseline=False, **kw):
    """Train; returns (trainer, the training steps' metrics) or, with baseline=True, also the
    step-0 held-out evaluation logged before any update."""
    cfg = SFTConfig(**{"model": "tiny-llama", "output": str(tmp_path / "sft"), "max_steps": 30, "batch_size": 8,
                       "lr": 3e-3, "max_length": 128, "save_every": 0, "eval_every": 0, "dtype": "fp32", **kw})
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    trainer = SFTTrainer(strategy, cfg, rows=rows)
    metrics = trainer.fit(stop_at=stop_at)
    steps = [m for m in metrics if m["step"] > 0]
    return (trainer, steps, metrics[0]) if baseline else (trainer, steps)


def test_label_masking_token_by_token():
    tok = prepare_tokenizer(byte_tokenizer())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6."}]
    enc = encode_conversation(tok, messages, max_length=1000)
    ids, labels = enc["input_ids"], enc["labels"]
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
            "4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n")
    assert tok.decode(ids) == text
    # Walk the tokens by hand: a token carries loss exactly when it is inside an answer
    # (the answer's characters and its closing <|im_end|>).
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected, inside, after_assistant_header = [], False, 0
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for i, t in enumerate(ids):
        if inside:
            expected.append(t)
            inside = t != end
        else:
            expected.append(IGNORE)
            if ids[max(0, i - len(header) + 1): i + 1] == header:
                inside = True
    assert labels == expected
    carried = [t for t in labels if t != IGNORE]
    assert tok.decode(carried) == "4.<|im_end|>6.<|im_end|>"


def test_truncation_cuts_prompt_left_and_never_the_answer_start():
    tok = prepare_tokenizer(byte_tokenizer())
    long_prompt = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "the answer"}]
    stats = TruncationStats()
    enc = encode_conversation(tok, long_prompt, max_length=64, stats=stats)
    assert len(enc["input_ids"]) == 64
    assert tok.decode([t for t in enc["labels"] if t != IGNORE]) == "the answer<|im_end|>"
    assert stats.prompt_truncated == 1 and stats.answer_truncated == 0
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 300}]
    enc = encode_conversation(tok, long_answer, max_length=64, stats=stats)
    kept = tok.decode([t for t in enc["labels"] if t != IGNORE])
    assert len(enc["input_ids"]) == 64 and kept.startswith("yyy") and stats.answer_truncated == 1
    # the answer's start is right after the generation prompt: nothing of the answer was cut before it
    assert tok.decode(enc["input_ids"]).endswith("assistant\n" + kept)


def test_full_finetune_loss_falls(tmp_path, rows):
    _, metrics, before = run_sft(tmp_path, rows, baseline=True)
    assert metrics[-1]["loss"] < 0.4 * metrics[0]["loss"]
    assert before["step"] == 0 and metrics[-1]["eval_loss"] < 0.5 * before["eval_loss"]  # held out, too


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_lora_trains_only_adapter_and_merged_checkpoint_matches(tmp_path, rows, quantize):
    """Also on a quantized base (QLoRA): its codes stay as they were, and the export is the
    de-quantized base with the adapter merged."""
    trainer, metrics = run_sft(tmp_path, rows, lora_rank=8, lr=1e-2, quantize_base=quantize)
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
    actor = trainer.model
    reference, _ = load_model("tiny-llama", torch.float32, quantize=quantize)
    base_now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in actor.lm.model.state_dict().items() if ".lora_" not in n}
    for n, p in reference.state_dict().items():
        assert torch.equal(base_now[n], p), f"frozen base tensor {n} changed"
    assert all(".lora_" in n for n, p in actor.lm.model.named_parameters() if p.requires_grad)
    # The merged export is a plain HF checkpoint with the same logits as the live model.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final").eval()
    ids = torch.tensor([[5, 70, 80, 90, 100, 110, 120]])
    mask = torch.ones_like(ids)
    actor.eval()
    with torch.no_grad():
        live = actor(ids, mask)[0]
        exported = torch.log_softmax(merged(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(live, exported, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("lora_rank,quantize", [(0, "none"), (4, "none"), (4, "int8"), (4, "nf4")])
def test_resume_equals_uninterrupted(tmp_path, rows, lora_rank, quantize):
    kw = dict(max_steps=12, lora_rank=lora_rank, grad_accum=2, batch_size=4, quantize_base=quantize)
    _, full = run_sft(tmp_path / "a", rows, **kw)
    run_sft(tmp_path / "b", rows, save_every=4, stop_at=8, **kw)
    _, resumed = run_sft(tmp_path / "b", rows, save_every=4, resume=True, **kw)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(full[8:], resumed[8:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    # Rows of very different lengths: a mean of per-micro-batch means would differ.
    rows = arithmetic_rows(16)
    rows += [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * (5 + 9 * i)}]}
             for i in range(16)]
    _, big = run_sft(tmp_path / "big", rows, max_steps=3, batch_size=8, grad_accum=1, eval_split=0)
    _, acc = run_sft(tmp_path / "acc", rows, max_steps=3, batch_size=2, grad_accum=4, eval_split=0)
    # Same data order needs the same global batch: the loader shuffles per epoch with the seed,
    # so compare against a loader of batch 8 split into 4 micro-batches of 2.
    assert big[0]["loss"] == pytest.approx(acc[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-opt", "tiny-bloom"])
def test_other_families_train_and_export(tmp_path, rows, family):
    trainer, metrics = run_sft(tmp_path, rows, model=family, max_steps=8, lora_rank=4, lr=1e-2)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")
    assert merged.config.model_type == family.split("-")[1]


def mixed_length_rows():
    rows = arithmetic_rows(24)
    return rows + [{"messages": [{"role": "user", "content": f"spell {i}"},
                                 {"role": "assistant", "content": "ab" * (3 + 5 * i)}]} for i in range(8)]


def test_packed_batch_loss_equals_the_unpacked_one(tmp_path):
    """Packing changes how rows are laid out, never a number: the summed loss and the token
    count of a packed batch equal those of the same conversations padded one per row."""
    from frugal_rlhf.data.tokenize import SFTCollator, pack

    trainer, _ = run_sft(tmp_path, mixed_length_rows(), max_steps=1, lora_rank=4)
    tok, model = trainer.tokenizer, trainer.model.eval()
    encoded = [encode_conversation(tok, r["messages"], 128) for r in mixed_length_rows()]
    packed = pack(encoded, 512, seed=0)
    assert len(packed) < len(encoded) / 3 and all(len(r["input_ids"]) <= 512 for r in packed)
    assert sorted(len(r["input_ids"]) for r in encoded) == sorted(  # every conversation, once, whole
        n for r in packed for n in torch.tensor(r["segments"]).unique(return_counts=True)[1].tolist())
    collate = SFTCollator(tok.pad_token_id)
    with torch.no_grad():
        loss_p, n_p, _ = trainer.loss_sum(collate(packed))
        loss_u, n_u, _ = trainer.loss_sum(collate(encoded))
    assert n_p == n_u
    assert loss_p.item() == pytest.approx(loss_u.item(), rel=1e-4)


def test_packing_trains_and_refuses_models_that_mix_sequences(tmp_path):
    _, metrics = run_sft(tmp_path / "llama", mixed_length_rows(), packing=True, max_steps=12, max_length=384,
                         batch_size=2)
    assert metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]
    assert metrics[0]["sequences"] > 4  # a batch of 2 packed rows holds more than 2 conversations
    with pytest.raises(ValueError, match=r"--packing: .*BloomForCausalLM.*train without --packing"):
        run_sft(tmp_path / "bloom", mixed_length_rows(), model="tiny-bloom", packing=True, max_steps=1)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_streamed_export_equals_peft_merge(tmp_path, monkeypatch, family):
    """The export merges one tensor at a time; it must write what peft's merge_and_unload of a
    whole copy writes (tied weights once, GPT-2's transposed Conv1D deltas), in one file or in
    shards that load as the same model."""
    import copy

    from safetensors.torch import load_file

    from frugal_rlhf.models import export
    from frugal_rlhf.models.roles import Actor, SharedLM

    hf, tok = load_model(family, torch.float32)
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    lm = SharedLM(hf)
    lm.add_adapter("actor", 4)
    lm.add_adapter("critic", 4)
    torch.manual_seed(0)
    for name, p in lm.model.named_parameters():
        if "lora_B" in name:  # a fresh adapter's delta is zero: make it count
            torch.nn.init.normal_(p, std=0.1)
    copy.deepcopy(lm.model).merge_and_unload(adapter_names=["actor"]).save_pretrained(tmp_path / "peft")
    expected = load_file(tmp_path / "peft" / "model.safetensors")
    export.export_merged(Actor(lm, "actor"), tok, tmp_path / "one")
    got = load_file(tmp_path / "one" / "model.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    assert sum(not torch.equal(got[k], base[k]) for k in got) >= 4  # the deltas were merged
    # the file is written tensor by tensor from its header: bf16 too, the merge rounded once
    export.export_merged(Actor(lm, "actor"), tok, tmp_path / "bf16", dtype=torch.bfloat16)
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    for k in expected:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k], expected[k].to(torch.bfloat16), rtol=0, atol=0, msg=k)

    monkeypatch.setattr(export, "MAX_SHARD_BYTES", 64 * 1024)
    export.export_merged(Actor(lm, "actor"), tok, tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    for k in expected:
        torch.testing.assert_close(reloaded[k], expected[k], rtol=0, atol=0, msg=k)
