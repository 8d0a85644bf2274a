"""Tests for frugal_rlhf.rl.losses: hand-computed values (plain Python, independent of
the implementation) and behavioural properties. Tiny tensors, runs in well under a second."""
import math

import pytest
import torch

from frugal_rlhf.ops import entropy_from_logits
from frugal_rlhf.rl import losses as L

t = torch.tensor


def close(a, b, tol=1e-6):
    a = a.tolist() if isinstance(a, torch.Tensor) else a
    b = b.tolist() if isinstance(b, torch.Tensor) else b
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y, tol)
    else:
        assert abs(a - b) <= tol, (a, b)


MASK = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 0 length 3, row 1 length 2


# ---------------------------------------------------------------- masked helpers
def test_masked_sum_mean_ignore_padding_even_inf_nan():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    assert L.masked_sum(x, MASK).item() == 15.0
    assert L.masked_mean(x, MASK).item() == 3.0
    close(L.masked_sum(x, MASK, dim=1), [6.0, 9.0])
    close(L.masked_mean(x, MASK, dim=1), [2.0, 4.5])
    x2 = x.clone(); x2[1, 2] = float("inf")
    assert L.masked_mean(x2, MASK.bool()).item() == 3.0   # bool mask works too
    # empty mask: division guarded, result 0 (not nan)
    assert L.masked_mean(x, torch.zeros_like(MASK)).item() == 0.0
    close(L.masked_mean(x, t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), dim=1), [1.5, 0.0])


def test_masked_var_hand_computed():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(vals) / len(vals)
    ss = sum((v - mean) ** 2 for v in vals)
    close(L.masked_var(x, MASK, unbiased=False), ss / 5)
    close(L.masked_var(x, MASK), ss / 4)
    assert L.masked_var(x, t([[1.0, 0, 0], [0, 0, 0]])).item() == 0.0  # single element


def test_masked_whiten_mean0_var1_and_ignores_padding():
    x = t([[1.0, 2.0, 7.0], [-3.0, 0.5, 123.0]])
    w = L.masked_whiten(x, MASK)
    assert abs(L.masked_mean(w, MASK).item()) < 1e-6
    assert abs(L.masked_var(w, MASK).item() - 1.0) < 1e-5
    assert w[1, 2].item() == 0.0                       # masked position returned as 0
    x_other = x.clone(); x_other[1, 2] = -1e6          # change only the padding
    assert torch.equal(L.masked_whiten(x_other, MASK), w)
    # hand value for one element
    vals = [1.0, 2.0, 7.0, -3.0, 0.5]
    m = sum(vals) / 5
    var = sum((v - m) ** 2 for v in vals) / 4
    close(w[0, 2], (7.0 - m) / math.sqrt(var + 1e-8), 1e-5)
    # shift_mean=False keeps the mean, rescales the spread
    w2 = L.masked_whiten(x, MASK, shift_mean=False)
    close(L.masked_mean(w2, MASK), m, 1e-5)
    close(L.masked_var(w2, MASK), 1.0, 1e-5)
    assert w2[1, 2].item() == 0.0


def test_masked_whiten_with_all_reduce_equals_whitening_the_global_batch():
    """Two ranks (threads here) whiten their own rows with the sums all-reduced between them:
    each gets its rows of the whole batch whitened at once."""
    import threading

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    m = (torch.rand(6, 5, generator=g) > 0.3).float()
    barrier, parts, out = threading.Barrier(2), {}, {}

    def rank(r, rows):
        def all_reduce(t):  # every rank gets the element-wise sum of both ranks' tensors
            parts[r] = t
            barrier.wait()
            total = parts[0] + parts[1]
            barrier.wait()  # both have read before either writes the next tensor
            return total
        out[r] = L.masked_whiten(x[rows], m[rows], all_reduce=all_reduce)

    threads = [threading.Thread(target=rank, args=(r, rows)) for r, rows in enumerate((slice(0, 2), slice(2, 6)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    close(torch.cat([out[0], out[1]]), L.masked_whiten(x, m), 1e-12)
    assert not torch.allclose(out[0], L.masked_whiten(x[:2], m[:2]))  # not this rank's own statistics


# ----------------------------------------------------------------------- KL penalty
def test_kl_penalty_known_numbers():
    logp, ref = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -0.5])
    close(L.kl_penalty(logp, ref, "k1"), [0.5, -1.0, 0.0])
    k3 = [(math.exp(r - l) - 1) - (r - l) for l, r in zip([-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5])]
    close(L.kl_penalty(logp, ref, "k3"), k3, 1e-6)
    close(L.kl_penalty(logp, ref, "k2"), [0.125, 0.5, 0.0])
    close(L.kl_penalty(logp, ref), [0.5, -1.0, 0.0])   # default k1
    with pytest.raises(ValueError):
        L.kl_penalty(logp, ref, "k9")


def test_k3_nonnegative_and_second_order_match():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(64, generator=g) * 5, -torch.rand(64, generator=g) * 5
    assert (L.kl_penalty(logp, ref, "k3") >= 0).all()
    assert (L.kl_penalty(logp, ref, "k1") < 0).any()   # k1 per-token can be negative
    d = 1e-2
    k1 = L.kl_penalty(t([-1.0 + d]), t([-1.0]), "k1").item()
    k3 = L.kl_penalty(t([-1.0 + d]), t([-1.0]), "k3").item()
    assert abs(k3 - k1 ** 2 / 2) < 1e-6 and k3 > 0


# ------------------------------------------------------------------- reward shaping
def test_shape_rewards_score_at_last_real_token():
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    logp = t([[-1.0, -1.0, -1.0], [-2.0, -1.0, 9.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -0.5], [-1.0, -1.0, 0.0], [-2.0, -2.0, -2.0]])
    score = t([2.0, -3.0, 5.0])
    rewards, kl = L.shape_rewards(score, logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 0.05 + 2.0], [0.1, -3.0, 0.0], [0.0, 0.0, 0.0]])  # empty row: nothing
    rewards_c, _ = L.shape_rewards(score, logp, ref, mask, kl_coef=0.1, clip=1.0)
    close(rewards_c[:, -1], [0.05 + 1.0, 0.0, 0.0])
    close(rewards_c[1, 1], -1.0)
    _, kl3 = L.shape_rewards(score, logp, ref, mask, kl_coef=0.1, estimator="k3")
    assert (kl3 >= 0).all() and kl3[1, 2].item() == 0.0


# ---------------------------------------------------------------------------- GAE
def _gae_by_hand(rewards, values, gamma, lam):
    """Plain-Python GAE on one unpadded row; V after the end is 0."""
    n = len(rewards)
    adv, last = [0.0] * n, 0.0
    for i in range(n - 1, -1, -1):
        next_v = values[i + 1] if i + 1 < n else 0.0
        delta = rewards[i] + gamma * next_v - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_hand_computed_two_rows_different_lengths():
    rows_r = [[0.1, -0.2, 1.0], [0.5, 2.0]]
    rows_v = [[0.3, 0.6, 0.2], [-0.4, 1.1]]
    rewards = t([rows_r[0], rows_r[1] + [7.0]])   # padding holds garbage
    values = t([rows_v[0], rows_v[1] + [-5.0]])
    r_before, v_before = rewards.clone(), values.clone()
    adv, ret = L.gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    for b in range(2):
        a_hand, ret_hand = _gae_by_hand(rows_r[b], rows_v[b], 0.9, 0.8)
        n = len(a_hand)
        close(adv[b, :n], a_hand, 1e-6)
        close(ret[b, :n], ret_hand, 1e-6)
    # spot check one value fully written out: row 1, t=1 is the last token
    close(adv[1, 1], 2.0 + 0.0 - 1.1, 1e-6)
    assert adv[1, 2].item() == 0.0 and ret[1, 2].item() == 0.0
    assert torch.equal(rewards, r_before) and torch.equal(values, v_before)  # inputs untouched


def test_gae_returns_are_value_targets_not_advantages():
    rewards = t([[0.0, 0.0, 1.0, 0.0], [0.3, -1.0, 0.0, 0.0]])
    values = t([[0.5, 0.2, 0.9, 4.0], [1.0, 0.4, 3.0, 3.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(ret - values * mask, adv, 1e-6)
    assert not torch.allclose(ret, adv)
    # lam = 1: returns are the discounted reward-to-go, independent of the values
    _, ret1 = L.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    for b, n in enumerate([3, 2]):
        for i in range(n):
            togo = sum(0.9 ** (k - i) * rewards[b, k].item() for k in range(i, n))
            close(ret1[b, i], togo, 1e-6)
    # lam = 0: one-step TD advantages
    adv0, _ = L.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(adv0[0, 0], 0.0 + 0.9 * 0.2 - 0.5, 1e-6)


# ------------------------------------------------------------------- policy loss
def _ploss(ratio_val, adv_val, **kw):
    logp = torch.tensor([[math.log(ratio_val)]], requires_grad=True)
    loss, stats = L.policy_loss(logp, torch.zeros(1, 1), t([[adv_val]]), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_group_advantages_hand_values():
    # Groups [1, 2, 3] (mean 2, sample std 1) and [5, 5, 5] (all equal: no signal).
    close(L.group_advantages(t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], 1e-5)
    # [0, 4]: mean 2, sample std sqrt(8)
    close(L.group_advantages(t([0.0, 4.0]), 2), [-2 / math.sqrt(8), 2 / math.sqrt(8)], 1e-5)
    with pytest.raises(ValueError, match="groups of 2"):
        L.group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError):
        L.group_advantages(t([1.0, 2.0]), 1)


def test_group_advantages_tied_groups_are_exactly_zero():
    """A group whose completions all score the same carries no signal: exactly 0, whatever the
    value (the float32 mean of 16 copies of 13.78885269165039 is not exact, and the old code
    divided that rounding by a std of ~2e-6, giving advantages of up to +-0.64)."""
    assert torch.equal(L.group_advantages(torch.full((16,), 13.78885269165039), 16), torch.zeros(16))
    g = torch.Generator().manual_seed(0)
    for size in (3, 5, 6, 8, 16):
        values = torch.randn(200, 1, generator=g) * 10 ** torch.randint(-3, 4, (200, 1), generator=g)
        tied = values.expand(200, size).reshape(-1)
        assert torch.equal(L.group_advantages(tied, size), torch.zeros_like(tied)), size
        assert bool(L.zero_spread(tied, size).all())
    # one tied group among groups with a spread: only it is zero and counted
    score = t([1.0, 2.0, 3.0, 0.1, 0.1, 0.1, 0.0, 0.0, 1.0])
    assert L.zero_spread(score, 3).tolist() == [False, True, False]
    close(L.group_advantages(score, 3), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0] + [-1 / math.sqrt(3)] * 2 + [2 / math.sqrt(3)], 1e-5)


def test_policy_loss_inside_band_equals_unclipped():
    loss, grad, stats = _ploss(1.1, 2.0)
    close(loss, -2.0 * 1.1, 1e-6)
    close(grad, -2.0 * 1.1, 1e-5)           # d(-A*exp(x))/dx = -A*ratio
    assert stats["clipfrac"] == 0.0


def test_policy_loss_clipping_cases_via_autograd():
    loss, grad, stats = _ploss(1.5, 1.0)      # A>0, ratio>1+eps: clipped, no gradient
    close(loss, -1.2, 1e-6); assert grad == 0.0 and stats["clipfrac"] == 1.0
    loss, grad, stats = _ploss(0.5, -1.0)     # A<0, ratio<1-eps: clipped, no gradient
    close(loss, 0.8, 1e-6); assert grad == 0.0 and stats["clipfrac"] == 1.0
    loss, grad, stats = _ploss(1.5, -1.0)     # A<0, ratio>1+eps: NOT clipped, pushed back
    close(loss, 1.5, 1e-6); assert grad > 0 and stats["clipfrac"] == 0.0
    loss, grad, _ = _ploss(0.5, 1.0)          # A>0, ratio<1-eps: NOT clipped
    close(loss, -0.5, 1e-6); assert grad < 0
    loss, grad, _ = _ploss(1.5, 1.0, clip_eps_high=0.6)   # asymmetric upper bound
    close(loss, -1.5, 1e-6); assert grad < 0


def test_policy_loss_hand_value_masking_and_stats():
    logp = t([[-1.0, -0.5, -2.0], [-0.3, -1.0, 50.0]])
    old = t([[-1.1, -1.0, -2.0], [-0.1, -1.0, 0.0]])
    adv = t([[1.0, 2.0, -1.0], [-0.5, 0.3, 1e9]])
    loss, stats = L.policy_loss(logp, old, adv, MASK, clip_eps=0.2)
    terms, kls, ratios = [], [], []
    for b, n in enumerate([3, 2]):
        for i in range(n):
            r = math.exp(logp[b, i].item() - old[b, i].item())
            a = adv[b, i].item()
            terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
            kls.append((r - 1) - math.log(r)); ratios.append(r)
    close(loss, sum(terms) / 5, 1e-5)
    close(stats["approx_kl"], sum(kls) / 5, 1e-5)
    close(stats["ratio_mean"], sum(ratios) / 5, 1e-5)
    close(stats["clipfrac"], 1 / 5, 1e-6)     # only token (0,1): ratio e^0.5 > 1.2 with A>0
    assert all(isinstance(v, float) for v in stats.values())


def test_policy_loss_higher_advantage_lower_loss():
    logp, old, mask = t([[-1.0, -0.8]]), t([[-1.05, -0.8]]), torch.ones(1, 2)
    lo, _ = L.policy_loss(logp, old, t([[0.5, 0.5]]), mask)
    hi, _ = L.policy_loss(logp, old, t([[1.5, 0.5]]), mask)
    assert hi.item() < lo.item()


def test_tis_weights_hand_values_cap_and_mask():
    # trainer / engine probabilities 0.6/0.4, 0.1/0.4, 0.9/0.05, 0.5/0.5, 0.3/0.6 -> ratios 1.5,
    # 0.25, 18 (capped at 2), 1, 0.5; the last token is padding with a ratio of e^30
    trainer = t([[math.log(0.6), math.log(0.1), math.log(0.9)], [math.log(0.5), math.log(0.3), 0.0]])
    engine = t([[math.log(0.4), math.log(0.4), math.log(0.05)], [math.log(0.5), math.log(0.6), -30.0]])
    w, stats = L.tis_weights(trainer, engine, MASK, cap=2.0)
    close(w, [[1.5, 0.25, 2.0], [1.0, 0.5, 0.0]], 1e-6)
    assert w[0, 2].item() == 2.0 and w[1, 0].item() == 1.0 and w[1, 2].item() == 0.0
    close(stats["tis_weight_mean"], (1.5 + 0.25 + 2.0 + 1.0 + 0.5) / 5, 1e-6)
    assert stats["tis_clipped_frac"] == pytest.approx(1 / 5)  # the padding's ratio never counts
    assert not w.requires_grad
    same, stats = L.tis_weights(trainer, trainer, MASK, cap=2.0)  # the trainer's own numbers: exactly 1
    assert torch.equal(same, MASK.float()) and stats == {"tis_weight_mean": 1.0, "tis_clipped_frac": 0.0}


def test_policy_loss_takes_tis_weights_per_token():
    logp, old, adv = t([[-1.0, -0.5]]), t([[-1.1, -0.5]]), t([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    loss, _ = L.policy_loss(logp, old, adv, mask, weights=t([[0.5, 2.0]]))
    r = math.exp(0.1)
    close(loss, (0.5 * -1.0 * r + 2.0 * 2.0 * 1.0) / 2, 1e-6)
    plain, _ = L.policy_loss(logp, old, adv, mask)
    ones, _ = L.policy_loss(logp, old, adv, mask, weights=torch.ones(1, 2))
    assert torch.equal(ones, plain)


def test_logprob_mismatch_max_mean_and_kl():
    engine, trainer = t([[-1.0, -2.0, -9.0]]), t([[-1.5, -2.0, 0.0]])
    mask = t([[1.0, 1.0, 0.0]])
    m = L.logprob_mismatch(engine, trainer, mask)
    assert m["gen_logprob_mismatch"] == 0.5 and m["gen_logprob_mismatch_mean"] == 0.25
    # k3 on the engine's samples, log r = trainer - engine: (e^-0.5 - 1 + 0.5) and 0, over 2 tokens
    close(m["gen_kl"], (math.exp(-0.5) - 0.5) / 2, 1e-6)


# -------------------------------------------------------------------- value loss
def test_value_loss_clipping_hand_values():
    values, old, ret, mask = t([[1.0, 0.0]]), t([[0.5, 0.1]]), t([[2.0, 0.0]]), torch.ones(1, 2)
    # tok0: v-old=0.5 -> v_clip=0.7; max((1-2)^2, (0.7-2)^2) = 1.69 (clipped active)
    # tok1: v-old=-0.1 inside band -> both 0
    loss, stats = L.value_loss(values, old, ret, mask, clip_eps=0.2)
    close(loss, 0.5 * (1.69 + 0.0) / 2, 1e-6)
    close(stats["vf_clipfrac"], 0.5)
    loss_nc, stats_nc = L.value_loss(values, old, ret, mask, clip_eps=None)
    close(loss_nc, 0.5 * (1.0 + 0.0) / 2, 1e-6)
    assert stats_nc["vf_clipfrac"] == 0.0
    # clipping only applies when it makes the error larger: moving toward the
    # target beyond the band keeps the unclipped (smaller-is-better) error
    loss2, stats2 = L.value_loss(t([[1.0]]), t([[1.5]]), t([[0.0]]), torch.ones(1, 1))
    close(loss2, 0.5 * 1.69, 1e-6)   # v_clip=1.3 -> 1.69 > 1.0: clipped term active
    assert stats2["vf_clipfrac"] == 1.0


def test_value_loss_targets_gae_returns_and_ignores_padding():
    rewards = t([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    values = t([[0.2, 0.4, 0.0], [0.1, 0.3, 0.0]])
    _, ret = L.gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    v = values.clone().requires_grad_(True)
    loss, _ = L.value_loss(v, values, ret, MASK, clip_eps=None)
    loss.backward()
    # gradient of 0.5*mean((v-R)^2) is (v-R)/n: descent moves V toward the returns
    close(v.grad, (values - ret) * MASK / 5, 1e-6)
    assert v.grad[1, 2].item() == 0.0
    zero, _ = L.value_loss(ret, ret, ret + (1 - MASK) * 100.0, MASK)
    assert zero.item() == 0.0


# ------------------------------------------------------------ explained variance
def test_explained_variance():
    ret = t([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    assert L.explained_variance(ret + (1 - MASK) * 9, ret, MASK) == pytest.approx(1.0)
    const = torch.full_like(ret, 3.0)
    assert L.explained_variance(const, ret, MASK) == pytest.approx(0.0, abs=1e-6)
    noisy = ret + t([[0.5, -0.5, 0.5], [-0.5, 0.5, 0.0]])
    rv = [1.0, 2.0, 3.0, 4.0, 5.0]; ev = [-0.5, 0.5, -0.5, 0.5, -0.5]
    var = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1)
    assert L.explained_variance(noisy, ret, MASK) == pytest.approx(1 - var(ev) / var(rv), abs=1e-6)
    assert math.isnan(L.explained_variance(ret, torch.ones_like(ret), MASK))


# ------------------------------------------------------------------------ entropy
def test_entropy_from_logits():
    logits = t([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, -1000.0, 0.0], [1.0, 2.0, 3.0, float("-inf")]])
    ent = entropy_from_logits(logits)
    z = [math.exp(1.0), math.exp(2.0), math.exp(3.0)]
    p = [v / sum(z) for v in z]
    close(ent, [math.log(4), 0.0, -sum(q * math.log(q) for q in p)], 1e-5)
    assert ent.shape == (3,)
    # gradient by hand: dH/dz_i = -p_i * (log p_i + H)
    zs = [0.5, -1.0, 2.0]
    x = torch.tensor(zs, requires_grad=True)
    entropy_from_logits(x).backward()
    e = [math.exp(v) for v in zs]
    p = [v / sum(e) for v in e]
    h = -sum(q * math.log(q) for q in p)
    close(x.grad, [-q * (math.log(q) + h) for q in p], 1e-5)
    x = torch.tensor([[1.0, float("-inf"), 0.0]], requires_grad=True)
    entropy_from_logits(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 1].item() == 0.0


# ------------------------------------------------------------------ pairwise loss
def test_pairwise_loss_hand_values_and_margin():
    loss, stats = L.pairwise_loss(t([1.0]), t([0.0]))
    close(loss, math.log(1 + math.exp(-1.0)), 1e-6)
    loss, stats = L.pairwise_loss(t([1.0, 0.0]), t([0.0, 2.0]))
    close(loss, (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2, 1e-6)
    assert stats["accuracy"] == 0.5 and stats["margin"] == pytest.approx(-0.5)
    # margin shifts the logit: margin 1 on (1, 0) gives log 2, and raises the loss
    lm, _ = L.pairwise_loss(t([1.0]), t([0.0]), margin=t([1.0]))
    close(lm, math.log(2.0), 1e-6)
    # logexp is the same loss (with and without margin), stable for large gaps
    rc, rr, m = t([3.0, -1.0, 200.0]), t([0.5, 0.2, -200.0]), t([0.5, 0.0, 1.0])
    for margin in (None, m):
        a, _ = L.pairwise_loss(rc, rr, margin=margin)
        b, _ = L.pairwise_loss(rc, rr, margin=margin, variant="logexp")
        close(a, b, 1e-6)
    big, _ = L.pairwise_loss(t([-200.0]), t([200.0]), variant="logexp")
    close(big, 400.0, 1e-3)
    with pytest.raises(ValueError):
        L.pairwise_loss(rc, rr, variant="hinge")


def test_pairwise_loss_centering():
    rc, rr = t([3.0, 1.0]), t([1.0, 0.0])
    base, _ = L.pairwise_loss(rc, rr)
    cen, _ = L.pairwise_loss(rc, rr, center_coef=0.01)
    close(cen - base, 0.01 * (16.0 + 1.0) / 2, 1e-6)
    # shifting both rewards leaves the plain loss unchanged but the centered one grows
    base2, _ = L.pairwise_loss(rc + 5, rr + 5)
    cen2, _ = L.pairwise_loss(rc + 5, rr + 5, center_coef=0.01)
    close(base, base2, 1e-6)
    assert cen2.item() > cen.item()
