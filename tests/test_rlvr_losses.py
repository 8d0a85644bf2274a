"""The GRPO family's estimator and loss math (rl/losses.py), on hand-computed values."""
import math

import pytest
import torch

from frugal_rlhf.rl import losses as L

NAN = float("nan")


def test_aggregate_loss_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])  # padding is NaN: it must not leak
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert L.aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert L.aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert L.aggregate_loss(loss, mask, "token-sum-norm", max_len=5).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError, match="max_len"):
        L.aggregate_loss(loss, mask, "token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        L.aggregate_loss(loss, mask, "mean")


def test_policy_loss_aggregation_weighs_long_and_short_answers_as_documented():
    # ratio 1 everywhere: each token's loss is -A.
    adv = torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.zeros(2, 3)
    loss = lambda agg: L.policy_loss(logp, logp, adv, mask, agg=agg, max_len=3)[0].item()  # noqa: E731
    assert loss("token-mean") == pytest.approx(-(1 + 1 + 1 + 3) / 4)
    assert loss("seq-mean-token-mean") == pytest.approx(-(1 + 3) / 2)
    assert loss("token-sum-norm") == pytest.approx(-6 / (2 * 3))


def test_decoupled_clip_raises_only_the_upper_bound():
    mask = torch.ones(1, 1)
    up = torch.log(torch.tensor([[1.25]]))  # ratio 1.25, positive advantage
    pos = torch.ones(1, 1)
    # Symmetric 0.2: the ratio is clipped at 1.2 (no gradient); DAPO's 0.28 lets 1.25 through.
    assert L.policy_loss(up, torch.zeros(1, 1), pos, mask, 0.2)[0].item() == pytest.approx(-1.2)
    assert L.policy_loss(up, torch.zeros(1, 1), pos, mask, 0.2, clip_eps_high=0.28)[0].item() == pytest.approx(-1.25)
    down = torch.log(torch.tensor([[0.7]]))  # ratio 0.7, negative advantage: the lower bound stays 0.8
    loss, stats = L.policy_loss(down, torch.zeros(1, 1), -pos, mask, 0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(0.8) and stats["clipfrac"] == 1.0


def test_scaled_group_advantages_by_hand():
    score = torch.tensor([1.0, 3.0, 0.0, 4.0])  # two groups of 2, both with mean 2
    centered = [-1.0, 1.0, -2.0, 2.0]
    assert L.scaled_group_advantages(score, 2, "none").tolist() == pytest.approx(centered)
    batch_std = math.sqrt((1 + 1 + 4 + 4) / 3)  # unbiased std of the whole batch around its mean 2
    assert L.scaled_group_advantages(score, 2, "batch").tolist() == pytest.approx([c / batch_std for c in centered],
                                                                                  rel=1e-5)
    # group: each group by its own std (sqrt(2) and sqrt(8)): both groups give -+0.7071
    r = 1 / math.sqrt(2)
    assert L.scaled_group_advantages(score, 2, "group").tolist() == pytest.approx([-r, r, -r, r], rel=1e-5)
    with pytest.raises(ValueError, match="unknown reward scaling"):
        L.scaled_group_advantages(score, 2, "rank")


def test_rloo_baseline_leaves_the_sample_out():
    score = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    # 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5; a constant group gives 0.
    assert L.rloo_advantages(score, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="RLOO needs groups"):
        L.rloo_advantages(score, 1)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 0.5: row 0: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5; row 1: G1 = 3, G0 = 1.5, pad 0
    assert L.discounted_returns(rewards, mask, 0.5).tolist() == [[1.5, 1.0, 2.0], [1.5, 3.0, 0.0]]
    assert L.discounted_returns(rewards, mask, 1.0).tolist() == [[3.0, 2.0, 2.0], [3.0, 3.0, 0.0]]


def test_zero_spread_finds_groups_of_equal_scores():
    score = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert L.zero_spread(score, 2).tolist() == [True, False, True]
    # a group apart by one float32 ulp is a tie: the advantage gives it 0
    tie = torch.tensor([0.3, torch.nextafter(torch.tensor(0.3), torch.tensor(1.0)).item(), 0.0, 1.0])
    assert L.zero_spread(tie, 2).tolist() == [True, False]
    assert L.group_advantages(tie, 2)[:2].abs().max() == 0


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    # budget 10, buffer 4: free up to 6 tokens, then -(L - 6) / 4, at most -1
    assert L.overlong_penalty(lengths, 10, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="overlong buffer"):
        L.overlong_penalty(lengths, 10, 0)
