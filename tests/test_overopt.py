"""The over-optimization curve reads PPO's evaluations and says what it shows, by hand-made runs."""
import pytest

from frugal_rlhf.app.evaluation import pairwise_accuracy
from frugal_rlhf.app.overopt import curve, describe, plot


def run(gold, proxy, kl):
    rows = [{"step": 4 * i, "eval_gold": g, "eval_reward": p, "eval_kl": k}
            for i, (g, p, k) in enumerate(zip(gold, proxy, kl))]
    return [{"step": 1, "reward": 0.3}, *rows]  # a training row without evaluation is not a point


def test_curve_is_gains_over_the_first_evaluation_against_sqrt_kl():
    pts = curve(run([1.0, 1.5, 1.25], [-1.0, 0.0, 1.0], [0.0, 4.0, -0.01]))
    assert [p["step"] for p in pts] == [0, 4, 8]
    assert [p["gold"] for p in pts] == [0.0, 0.5, 0.25]
    assert [p["proxy"] for p in pts] == [0.0, 1.0, 2.0]
    assert [p["sqrt_kl"] for p in pts] == [0.0, 2.0, 0.0]  # a slightly negative KL estimate counts as 0
    assert curve([{"step": 1, "reward": 0.3}]) == []


def test_describe_names_the_gold_peak_only_when_the_proxy_keeps_rising_past_it():
    gamed = describe(curve(run([0, 0.5, 0.2, 0.1], [0, 1, 2, 3], [0, 1, 4, 9])))
    assert "Gold peaked at sqrt(KL) = 1.00 (step 4)" in gamed and "gaming the reward model" in gamed
    rising = describe(curve(run([0, 0.2, 0.4], [0, 1, 2], [0, 1, 4])))
    assert "still rising" in rising and "gaming" not in rising
    both_fell = describe(curve(run([0, 0.5, 0.1], [0, 1, 0.5], [0, 1, 4])))
    assert "not the proxy being gamed" in both_fell
    never = describe(curve(run([0, -0.1, -0.2], [0, 1, 2], [0, 1, 4])))
    assert "Gold never rose" in never and "peaked" not in never
    assert "Too few" in describe(curve(run([0, 1], [0, 1], [0, 1])))


def test_plot_writes_a_png(tmp_path):
    assert plot(curve(run([0, 0.5, 0.2], [0, 1, 2], [0, 1, 4])), tmp_path / "o.png").stat().st_size > 1000
    assert plot([], tmp_path / "none.png") is None


def test_reward_model_accuracy_against_gold_pairs_answers_of_one_prompt():
    # 2 prompts x 4 answers: pairs (0,1), (2,3), (4,5), (6,7); the pair (6,7) ties on gold
    gold = [1, 0, 0, 1, 2, 1, 5, 5]
    proxy = [0.9, 0.1, 0.5, 0.2, 3, 2, 0, 1]
    acc = pairwise_accuracy(proxy, gold, 4)
    assert acc == {"accuracy": pytest.approx(2 / 3), "n_pairs": 3}
