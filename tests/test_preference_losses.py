"""DPO, IPO, cDPO, SimPO, ORPO and KTO losses against values computed by hand (math module only)."""
import math

import pytest
import torch

from frugal_rlhf.rl.losses import dpo_loss, ipo_loss, kto_loss, log1mexp, orpo_loss, simpo_loss


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def softplus(x):
    return math.log1p(math.exp(x))


def test_dpo_hand_value_and_rewards():
    # h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1; beta h = 0.5; loss = log(1 + e^-0.5)
    loss, rc, rr = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)
    assert loss.item() == pytest.approx(softplus(-0.5), abs=1e-12)
    assert loss.item() == pytest.approx(0.4740769841801067, abs=1e-12)
    assert rc.item() == pytest.approx(0.25) and rr.item() == pytest.approx(-0.25)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    lc, lr = t(-3.0).requires_grad_(), t(-3.0).requires_grad_()
    loss, _, _ = dpo_loss(lc, lr, t(-3.0), t(-3.0), beta=0.1)
    loss.sum().backward()
    # d/dh -log s(beta h) at h = 0 is -beta/2
    assert lc.grad.item() == pytest.approx(-0.05) and lr.grad.item() == pytest.approx(0.05)


def test_dpo_limit_beta_to_zero_is_log2_minus_half_beta_h():
    for beta in (1e-3, 1e-5):
        loss, _, _ = dpo_loss(t(-1.0), t(-4.0), t(-2.0), t(-2.0), beta=beta)  # h = 3
        # -log s(x) = log 2 - x/2 + x^2/8 + O(x^4): the error is the x^2 term
        assert loss.item() == pytest.approx(math.log(2) - beta * 3 / 2, abs=(beta * 3) ** 2 / 8 * 1.01)


def test_identical_chosen_and_rejected():
    same = t(-2.5, -7.0)
    ref = t(-1.0, -9.0)
    for eps in (0.0, 0.1, 0.5):
        loss, rc, rr = dpo_loss(same, same, ref, ref, beta=0.3, label_smoothing=eps)
        torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))
        torch.testing.assert_close(rc, rr)
    loss, _, _ = ipo_loss(same, same, ref, ref, beta=0.25)  # (0 - 1/(2 * 0.25))^2 = 4
    torch.testing.assert_close(loss, torch.full_like(loss, 4.0))
    loss, _, _ = simpo_loss(same, same, beta=2.0, gamma=1.0)  # -log s(-1) = log(1 + e)
    torch.testing.assert_close(loss, torch.full_like(loss, softplus(1.0)))
    # ORPO: log odds 0 -> NLL + lam log 2
    loss, _, _ = orpo_loss(same / 10, same / 10, lam=0.5)
    torch.testing.assert_close(loss, -same / 10 + 0.5 * math.log(2))


def test_label_smoothing_cdpo():
    # beta h = 0.5: -(0.8) log s(0.5) - 0.2 log s(-0.5) = 0.8 softplus(-0.5) + 0.2 softplus(0.5)
    loss, _, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * softplus(-0.5) + 0.2 * softplus(0.5), abs=1e-12)
    # eps = 0.5: the label carries no information, swapping chosen and rejected changes nothing
    a, _, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, label_smoothing=0.5)
    b, _, _ = dpo_loss(t(-2.0), t(-1.0), t(-1.5), t(-1.5), beta=0.5, label_smoothing=0.5)
    torch.testing.assert_close(a, b)
    # the minimum of the smoothed loss sits at finite h = log((1-eps)/eps) / beta, where the gradient is 0
    eps, beta = 0.2, 0.5
    h = torch.tensor(math.log((1 - eps) / eps) / beta, dtype=torch.float64, requires_grad=True)
    loss, _, _ = dpo_loss(h, t(0.0), t(0.0), t(0.0), beta=beta, label_smoothing=eps)
    loss.sum().backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_ipo_hand_value_and_target():
    # h = 1, beta = 0.1: (1 - 5)^2 = 16; zero exactly at h = 1/(2 beta) = 5
    loss, rc, rr = ipo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert loss.item() == pytest.approx(16.0)
    assert (rc - rr).item() == pytest.approx(0.1)
    loss, _, _ = ipo_loss(t(0.0), t(-5.0), t(0.0), t(0.0), beta=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)


def test_simpo_hand_value():
    # beta (a_c - a_r) - gamma = 2 (-0.5 + 1.0) - 0.5 = 0.5 -> softplus(-0.5)
    loss, rc, rr = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(softplus(-0.5), abs=1e-12)
    assert rc.item() == pytest.approx(-1.0) and rr.item() == pytest.approx(-2.0)
    # label smoothing as in cDPO
    loss, _, _ = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-0.5) + 0.1 * softplus(0.5), abs=1e-12)


def test_orpo_hand_value():
    # p_c = 0.5, p_r = 0.25: odds 1 and 1/3, log odds ratio = log 3; lam = 0.2
    a_c, a_r = math.log(0.5), math.log(0.25)
    loss, rc, rr = orpo_loss(t(a_c), t(a_r), lam=0.2)
    expected = -a_c + 0.2 * softplus(-math.log(3))  # = log 2 + 0.2 log(4/3)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(math.log(2) + 0.2 * math.log(4 / 3), abs=1e-12)
    assert rc.item() == pytest.approx(0.2 * a_c)


def test_log1mexp_is_accurate_at_both_ends():
    x = t(-1e-10, -0.1, -0.7, -50.0)
    expected = t(math.log(1e-10), math.log(-math.expm1(-0.1)), math.log(-math.expm1(-0.7)), -math.exp(-50.0))
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-9, atol=0)


def test_kto_hand_values():
    # r = 1 (desirable), r = -1 (undesirable), z = 0.5, beta = 2
    loss, reward = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), 0.5, beta=2.0,
                            desirable_weight=1.0, undesirable_weight=1.5)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss[0].item() == pytest.approx(1 - s(2 * (1 - 0.5)), abs=1e-12)
    assert loss[1].item() == pytest.approx(1.5 * (1 - s(2 * (0.5 - -1))), abs=1e-12)
    torch.testing.assert_close(reward, t(2.0, -2.0))
    # beta -> 0: both halves approach w/2 (no preference signal left)
    loss, _ = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), 0.5, beta=1e-9)
    torch.testing.assert_close(loss, t(0.5, 0.5))


def test_kto_gradients_raise_desirable_and_lower_undesirable():
    logp = t(-2.0, -2.0).requires_grad_()
    loss, _ = kto_loss(logp, t(-2.0, -2.0), torch.tensor([True, False]), 0.0, beta=0.1)
    loss.sum().backward()
    assert logp.grad[0] < 0 < logp.grad[1]
