"""The hidden gold judge ranks answers as a person would, and the gold labeler follows it at
the configured agreement rate (within binomial sampling error)."""
import json
from contextlib import nullcontext

import pytest
import torch

from frugal_rlhf.rl.gold import EMPTY_SCORE, flesch_reading_ease, gold_score, label_groups, syllables, thurstone_sigma
from frugal_rlhf.app.prefs import build_pairs

PROMPT = "How do I bake bread at home?"
GOOD = ("Sure! Baking bread at home is fun and easy. Mix flour, water, yeast and salt, let the dough rise, "
        "then bake it until golden. Enjoy!")


@pytest.mark.parametrize("worse", [
    "No. Figure it out yourself, this is a stupid question and I hate it.",                     # rude
    "The utilization of heterogeneous fermentation methodologies necessitates comprehensive "
    "microbiological considerations regarding carbohydrate transformation.",                     # unreadable
    "Sure! Painting a fence is fun and easy. Buy a brush, pick a nice color, and paint it on a "
    "sunny day. Enjoy!",                                                                          # off topic
    "bread bread bread bread bread bread bread bread bread bread bread bread bread bread",        # repetitive
    "Bake it.",                                                                                   # brush-off
    "",                                                                                           # nothing
])
def test_gold_prefers_the_friendly_readable_on_topic_answer(worse):
    assert gold_score(PROMPT, GOOD) > gold_score(PROMPT, worse)


def test_gold_terms_one_at_a_time():
    base = "You can bake bread at home with flour, water and yeast."
    assert gold_score(PROMPT, base + " It is wonderful and I am happy to help!") > gold_score(PROMPT, base)
    assert gold_score(PROMPT, base) > gold_score(PROMPT, base + " " + base)          # repetition costs
    assert gold_score(PROMPT, "") == EMPTY_SCORE < gold_score(PROMPT, "hmm")
    # the prompt may be a message list: its last user turn is what relevance reads
    assert gold_score([{"role": "user", "content": PROMPT}], base) == gold_score(PROMPT, base)


def test_flesch_reading_ease_by_hand():
    words = ["the", "cat", "sat"]  # one sentence, 3 words, 3 syllables
    assert [syllables(w) for w in words] == [1, 1, 1]
    assert flesch_reading_ease("The cat sat.", words) == pytest.approx(206.835 - 1.015 * 3 - 84.6 * 1)
    two = ["the", "cat", "sat", "it", "ran"]  # two sentences: 2.5 words each
    assert flesch_reading_ease("The cat sat. It ran!", two) == pytest.approx(206.835 - 1.015 * 2.5 - 84.6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("agreement", [0.6, 0.72, 0.9])
@pytest.mark.parametrize("noise", ["thurstone", "flip"])
def test_pair_labels_agree_at_the_configured_rate(seed, agreement, noise):
    g = torch.Generator().manual_seed(seed)
    n = 4000
    groups = torch.randn(n, 2, generator=g).tolist()
    labels = label_groups(groups, agreement, g, noise)
    rate = sum(lab == (0, 1) if a > b else lab == (1, 0) for lab, (a, b) in zip(labels, groups)) / n
    # Each label agrees with probability p_i, mean(p_i) = agreement exactly (flip: every p_i;
    # thurstone: sigma is solved for it), and the variance is at most the binomial one.
    assert abs(rate - agreement) < 3 * (agreement * (1 - agreement) / n) ** 0.5
    assert label_groups([[1.0, 1.0], [2.0]], agreement, g, noise) == [None, None]  # a tie, one answer: no label
    with pytest.raises(ValueError, match="agreement"):
        label_groups(groups, 0.3, g, noise)


def test_thurstone_sigma_by_hand():
    # Every pair 1.0 apart: P(agree) = Phi(1 / (sigma sqrt 2)) = 0.72, sigma = 1 / (sqrt 2 Phi^-1(0.72)).
    sigma = thurstone_sigma([[0.0, 1.0], [3.0, 2.0], [5.0, 6.0, 5.0]], 0.72)  # the tie 5.0/5.0 does not count
    assert sigma == pytest.approx(1 / (2 ** 0.5 * torch.distributions.Normal(0, 1).icdf(torch.tensor(0.72)).item()),
                                  rel=1e-6)
    assert thurstone_sigma([[0.0, 1.0]], 1.0) == 0.0
    with pytest.raises(ValueError, match="above 0.5"):  # no finite sigma: refused, not searched for ever
        thurstone_sigma([[0.0, 1.0]], 0.5)


def test_a_perfect_labeler_picks_the_best_and_the_worst_of_k():
    g = torch.Generator().manual_seed(0)
    groups = [[0.3, 0.9, -0.2, 0.5], [1.0, 2.0, 3.0]]
    assert label_groups(groups, 1.0, g, "thurstone") == label_groups(groups, 1.0, g, "flip") == [(1, 2), (2, 0)]
    with pytest.raises(ValueError, match="noise"):
        label_groups(groups, 0.72, g, "coin")


@pytest.fixture(scope="module")
def tiny_words_model():
    """A tiny random model whose samples are letters and spaces: word-like answers that the
    gold scorer tells apart (length, repetition, readability)."""
    from frugal_rlhf.models.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model("tiny-llama")[:2]
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        keep = torch.zeros(head.shape[0], 1)
        keep[[i for i in range(len(tok)) if tok.decode([i]) == " " or tok.decode([i]).isalpha()
              and tok.decode([i]).isascii()]] = 3
        head.mul_(keep)
    return model.eval(), tok


@pytest.mark.parametrize("noise,seed", [("thurstone", s) for s in range(3)] + [("flip", s) for s in range(3)])
def test_gold_labeler_follows_the_gold_scorer_at_the_configured_rate(tiny_words_model, tmp_path, noise, seed):
    model, tok = tiny_words_model
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about the number {i}."}]} for i in range(80)]
    out = tmp_path / "prefs.jsonl"
    summary = build_pairs(model, tok, rows, out, "gold", max_new_tokens=12, temperature=1.0, batch_size=40,
                          max_prompt_length=64, seed=seed, device="cpu", autocast=nullcontext(),
                          label_agreement=0.72, label_noise=noise)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    n = len(pairs)
    assert summary["labeler"] == "gold" and summary["pairs"] == n >= 30  # gold ties (one-word gibberish) label nothing
    # the judge's verdict recomputed from the texts, not read from the file
    agree = sum(gold_score(p["prompt"], p["chosen"]) > gold_score(p["prompt"], p["rejected"]) for p in pairs)
    assert abs(agree / n - 0.72) < 3 * (0.72 * 0.28 / n) ** 0.5
    assert summary["observed_agreement"] == pytest.approx(agree / n)


@pytest.mark.parametrize("agreement,noise,match", [(0.4, "thurstone", r"\[0.5, 1\]"), (0.5, "thurstone", "above 0.5"),
                                                   (0.72, "gaussian", "label noise")])
def test_gold_labeler_settings_are_refused_before_any_sampling(tmp_path, agreement, noise, match):
    """No model is given: the refusal comes before the first answer is sampled, not after."""
    with pytest.raises(ValueError, match=match):
        build_pairs(None, None, [{"prompt": "hi"}], tmp_path / "p.jsonl", "gold", label_agreement=agreement,
                    label_noise=noise)
    assert not (tmp_path / "p.jsonl").exists()
