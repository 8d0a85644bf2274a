"""The simulated labelers of `frugal prefs` write pairs `frugal rm` reads, with the side each one promises."""
import json
from contextlib import nullcontext

import pytest
import torch

from frugal_rlhf.data.formats import load_dataset_file
from frugal_rlhf.data.tokenize import encode_prompt, encode_response
from frugal_rlhf.models.loading import load_model
from frugal_rlhf.app.prefs import build_pairs, cut_to_tokens


def prompt_rows(n):
    return [{"prompt": [{"role": "user", "content": f"Tell me about the number {i}."}],
             "reference": f"The number {i} is a fine number, and here is why it matters a great deal."} for i in range(n)]


@pytest.fixture(scope="module")
def peaked_model():
    """A tiny model with sharp next-token distributions, so temperature changes what it samples."""
    model, tok = load_model("tiny-llama")[:2]
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        # Only letters get sharp logits (specials and spaces stay at 0): full-length, visible answers.
        letters = [i for i in range(len(tok)) if tok.decode([i]).isascii() and tok.decode([i]).isalpha()]
        keep = torch.zeros(head.shape[0], 1)
        keep[letters] = 4
        head.mul_(keep)
    return model.eval(), tok


@torch.no_grad()
def mean_logprob(model, tok, prompt, response):
    p = encode_prompt(tok, prompt, 64)
    ids = torch.tensor([encode_response(tok, p, response, 128)])
    logp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), -1)
    return logp.gather(-1, ids[0, len(p):, None]).mean().item()


def test_contrast_labeler_prefers_the_normal_temperature_sample(peaked_model, tmp_path):
    model, tok = peaked_model
    out = tmp_path / "prefs.jsonl"
    summary = build_pairs(model, tok, prompt_rows(12), out, "contrast", max_new_tokens=12, temperature=0.5,
                          contrast_temperature=3.0, batch_size=6, max_prompt_length=64, seed=1,
                          device="cpu", autocast=nullcontext())
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["labeler"] == "contrast" and summary["pairs"] == len(pairs) >= 10
    assert all(p["labeler"] == "contrast" and p["chosen"] != p["rejected"] for p in pairs)
    # the model finds its own low-temperature samples likelier than its high-temperature ones
    better = [mean_logprob(model, tok, p["prompt"], p["chosen"]) > mean_logprob(model, tok, p["prompt"], p["rejected"])
              for p in pairs]
    assert sum(better) >= 0.9 * len(better)
    assert len(load_dataset_file(str(out), "preference")) == len(pairs)  # frugal rm reads it as written


def test_reference_labeler_prefers_the_cut_reference(peaked_model, tmp_path):
    model, tok = peaked_model
    rows = prompt_rows(4) + [{"prompt": [{"role": "user", "content": "no answer here"}]}]
    out = tmp_path / "prefs.jsonl"
    summary = build_pairs(model, tok, rows, out, "reference", max_new_tokens=5, batch_size=4, max_prompt_length=64,
                          device="cpu", autocast=nullcontext())
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == 4  # the row without a reference answer cannot be labeled
    assert [p["chosen"] for p in pairs] == [cut_to_tokens(tok, r["reference"], 5) for r in rows[:len(pairs)]]
    assert len(tok(pairs[0]["chosen"], add_special_tokens=False)["input_ids"]) <= 5


def test_unknown_labeler_is_refused(peaked_model, tmp_path):
    model, tok = peaked_model
    with pytest.raises(ValueError, match="unknown labeler 'judge'"):
        build_pairs(model, tok, prompt_rows(2), tmp_path / "p.jsonl", "judge")
    assert not (tmp_path / "p.jsonl").exists()
