"""The pure math of RLHF: masking helpers, KL penalties, reward shaping, GAE,
PPO policy/value losses and the reward-model pairwise loss (the KL-coefficient
controllers, which hold state, are in rl/kl.py).

Conventions
-----------
* Per-token tensors are ``[B, T]`` over *response (action) positions*.
* ``mask`` is ``[B, T]`` (bool or float), 1 for real action tokens. Response tokens
  are contiguous from position 0; padding comes after the end of each row.
* Masked positions never affect any result: they are replaced by 0 *before* any
  arithmetic, so even ``inf``/``nan`` padding cannot leak into outputs or gradients.
* Functions do not detach their inputs. Rollout quantities (rewards, advantages,
  returns, old log-probs, old values) should be computed under ``torch.no_grad()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------- masking helpers
def _keep(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is set, 0 elsewhere (never touches masked values arithmetically)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Sum of x over masked elements (all of them if dim is None, else along dim)."""
    x = _keep(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Mean of x over masked elements; an empty mask gives 0 (count clamped to 1)."""
    count = mask.to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked elements.

    With ``unbiased`` the n/(n-1) Bessel correction is applied when n > 1
    (with a single element the variance is 0 either way).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce=None) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked elements (unbiased var).

    With ``shift_mean=False`` the mean is added back (only the scale changes).
    ``all_reduce`` (a strategy's: a tensor summed element-wise over every rank) makes mean and
    variance those of all ranks' batches together; None: of this batch alone.
    Masked-out positions are returned as 0.
    """
    reduce = all_reduce or (lambda t: t)
    total, n = reduce(torch.stack([masked_sum(x, mask), mask.to(x.dtype).sum()]))
    mean = total / n.clamp(min=1)
    var = reduce(masked_sum((x - mean) ** 2, mask)) / n.clamp(min=1)
    if n > 1:  # Bessel's correction, as masked_var
        var = var * n / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _keep(whitened, mask)


# ----------------------------------------------------------------------- KL & rewards
def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    * ``k1``: logp - ref_logp (unbiased, can be negative per token)
    * ``k2``: 0.5 * (logp - ref_logp)^2 (biased, non-negative)
    * ``k3``: (r - 1) - log r with r = ref/pi = exp(ref_logp - logp)
      (unbiased, non-negative; written as expm1(d) - d for stability)
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        d = ref_logp - logp  # log r
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {estimator!r} (expected 'k1', 'k2' or 'k3')")


def token_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """kl_penalty at the real tokens, 0 elsewhere. [B, T]"""
    return _keep(kl_penalty(logp, ref_logp, estimator), mask)


def score_rewards(score: Tensor, mask: Tensor, clip: float | None = None) -> Tensor:
    """The sequence score (optionally clipped to [-clip, clip]) at the last real token of each
    row, 0 elsewhere; rows with no real tokens receive nothing. [B, T]"""
    score = clip_score(score, clip)
    last = mask.long().sum(1) - 1  # [B]; -1 for an empty row, which matches no position
    is_last = torch.arange(mask.shape[1], device=mask.device)[None, :] == last[:, None]
    return torch.where(is_last, score[:, None], torch.zeros_like(mask, dtype=score.dtype))


def shape_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                  kl_coef: float, estimator: str = "k1", clip: float | None = None):
    """Per-token rewards: -kl_coef * KL at every real token, plus the score_rewards.
    Returns ``(rewards [B,T], kl [B,T])``.
    """
    kl = token_kl(logp, ref_logp, mask, estimator)
    return -kl_coef * kl + score_rewards(score.to(kl.dtype), mask, clip), kl


# ------------------------------------------------------------------------------- GAE
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation (Schulman et al. 2016), backwards over T.

        delta_t = r_t + gamma * V_{t+1} - V_t       (V_{t+1} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}

    Returns ``(advantages, returns)`` with ``returns = advantages + values``: the
    lambda-return, i.e. the correct value-function target (not the advantages).
    Masked positions are 0 in both outputs.
    """
    m = mask.to(values.dtype)
    r, v = _keep(rewards, mask).to(values.dtype), _keep(values, mask)
    T = v.shape[1]
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    advs = [None] * T
    for t in reversed(range(T)):
        # next_value / next_adv are already 0 past the last real token.
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advs[t] = adv
        next_value, next_adv = v[:, t], adv
    advantages = torch.stack(advs, dim=1)
    returns = _keep(advantages + v, mask)
    return advantages, returns


# ------------------------------------------------------------------ group advantages
def group_advantages(score: Tensor, group_size: int, eps: float = 1e-6, tied: Tensor | None = None) -> Tensor:
    """GRPO (Shao et al. 2024): each completion's score against the other completions of the
    same prompt, ``(s - mean_group) / (std_group + eps)``, which replaces a learned critic.
    ``score`` is [B] with the ``group_size`` completions of a prompt adjacent; returns [B].
    A tied group (``tied`` [B], default :func:`zero_spread` of ``score``) gets 0: no signal."""
    g = _groups(score, group_size, "group advantages need").double()
    # float64 keeps the mean of equal float32 scores exact (their deviations exactly 0); a
    # float64 input can still leave ~eps * |score| of rounding, which the mask also zeroes.
    return _untie(((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1), score, group_size,
                  tied)


def _groups(score: Tensor, group_size: int, what: str) -> Tensor:
    """[B] scores as [B // group_size, group_size] rows, one per prompt (its completions adjacent)."""
    if group_size < 2 or score.numel() % group_size:
        raise ValueError(f"{what} groups of 2+ completions; got {score.numel()} scores in groups of {group_size}")
    return score.view(-1, group_size)


def _untie(adv: Tensor, score: Tensor, group_size: int, tied: Tensor | None) -> Tensor:
    """Per-completion advantages [B] (any float dtype) with the tied groups' set to exactly 0,
    in the score's dtype."""
    tied = zero_spread(score, group_size).repeat_interleave(group_size) if tied is None else tied
    return torch.where(tied, torch.zeros_like(adv), adv).to(score.dtype)


def zero_spread(score: Tensor, group_size: int, raw: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """[B // group_size] bool: the tied groups, whose scores are all equal up to rounding; they
    carry no signal. The one definition of a tie, for the advantages, dynamic sampling and the
    logged zero_std_frac alike.

    ``score`` is what the advantages use; it may be the ``raw`` scores the reward gave (default)
    normalized (divided by ``scale``, the running std) and then clipped. Rounding is the raw
    dtype's: a spread of at most 4 eps |raw| / scale. So a group one ulp apart before the
    normalization stays tied after it, and a group clipped to one value is tied though its raw
    scores differed. (A tied group's float32 std is not 0, its mean is not exact: dividing by
    it turned noise into advantages of up to +-0.64.)"""
    raw = score if raw is None else raw
    g, r = score.view(-1, group_size).double(), raw.view(-1, group_size).double()
    spread = g.max(1).values - g.min(1).values
    return spread <= 4 * torch.finfo(raw.dtype).eps * r.abs().max(1).values / scale


def clip_score(score: Tensor, clip: float | None) -> Tensor:
    return score if clip is None else score.clamp(-clip, clip)


# ------------------------------------------------------------------------ PPO losses
def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                clip_eps: float = 0.2, clip_eps_high: float | None = None,
                agg: str = "token-mean", max_len: int | None = None, weights: Tensor | None = None):
    """PPO clipped surrogate (to minimise), token-level mean over the mask.

        ratio  = exp(logp - old_logp)
        loss_t = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))

    ``clip_eps_high`` defaults to ``clip_eps`` (set it higher for asymmetric
    "clip-higher", DAPO). ``agg``/``max_len``: how token losses become one number
    (:func:`aggregate_loss`). ``weights`` (detached, [B, T]) scale each token's loss before
    aggregation (:func:`tis_weights`). Stats (python floats): ``clipfrac`` (fraction of tokens where the
    clipped term is strictly larger, i.e. no gradient), ``approx_kl`` (k3 estimate
    of KL(old || new): mean of (ratio - 1) - log ratio), ``ratio_mean``.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = _keep(logp - old_logp, mask)
    ratio = torch.exp(log_ratio)
    adv = _keep(advantages, mask).to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    token_loss = torch.maximum(unclipped, clipped)
    loss = aggregate_loss(token_loss if weights is None else token_loss * weights, mask, agg, max_len)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def actor_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None, agg: str = "token-mean", max_len: int | None = None,
                    weights: Tensor | None = None, entropy: Tensor | None = None, entropy_coef: float = 0.0,
                    ref_logp: Tensor | None = None, kl_coef: float = 0.0, ptx_nll: Tensor | float = 0.0,
                    ptx_coef: float = 0.0):
    """The actor's whole loss: PPO's clipped surrogate (:func:`policy_loss`, its tokens weighted
    by ``weights``: truncated importance sampling, :func:`tis_weights`), minus
    ``entropy_coef`` times the mean entropy, plus ``kl_coef`` times the k3 KL to the reference
    aggregated like the surrogate when ``ref_logp`` is given (GRPO's KL as a loss term, where
    the estimator does not put it in the rewards), plus ``ptx_coef`` times the language-model
    loss on demonstrations (PPO-ptx, InstructGPT). Returns (loss, stats) with the surrogate
    alone as ``policy_loss`` in the stats."""
    pg_loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_eps, clip_eps_high, agg, max_len, weights)
    loss = pg_loss
    stats["policy_loss"] = float(pg_loss.detach())
    if entropy is not None:
        ent = masked_mean(entropy, mask)
        loss = loss - entropy_coef * ent
        stats["entropy"] = float(ent.detach())
    if ref_logp is not None:
        kl_loss = aggregate_loss(kl_penalty(logp, ref_logp, "k3"), mask, agg, max_len)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = float(kl_loss.detach())
    if ptx_coef:
        loss = loss + ptx_coef * ptx_nll
    return loss, stats


def lm_nll(logp: Tensor, mask: Tensor) -> Tensor:
    """The language-model loss: the mean negative log-likelihood of the masked tokens."""
    return -masked_sum(logp, mask) / mask.to(logp.dtype).sum().clamp(min=1)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_eps: float | None = 0.2):
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) with
    ``V_clip = V_old + clamp(V - V_old, -clip_eps, clip_eps)``. ``clip_eps=None``
    gives the plain 0.5 * MSE. Stats: ``vf_clipfrac`` (fraction where the clipped
    error is strictly larger)."""
    values, old_values = _keep(values, mask), _keep(old_values, mask)
    returns = _keep(returns, mask).to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), {"vf_clipfrac": 0.0}
    v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask).item()
    return loss, {"vf_clipfrac": clipfrac}


@torch.no_grad()
def logprob_mismatch(sampled: Tensor, trained: Tensor, mask: Tensor) -> dict[str, float]:
    """Training-inference mismatch: how far the log-probs the generation engine reported for
    the tokens it sampled are from the trainer's forward on the same tokens (same weights):
    the max and mean of |engine - trainer| over real tokens, and ``gen_kl``, the per-token
    KL(engine || trainer) estimated on the engine's own samples (k3: non-negative, unbiased).
    Rounding alone keeps them near the dtype's epsilon times the logits' size; more means the
    two paths compute different things (masks, positions, adapters, dtypes, a quantized copy)."""
    sampled, trained = sampled.float(), trained.float()
    gap = (sampled - trained).abs()
    return {"gen_logprob_mismatch": float(gap[mask.bool()].max()) if mask.any() else 0.0,
            "gen_logprob_mismatch_mean": float(masked_mean(gap, mask)),
            "gen_kl": float(masked_mean(kl_penalty(sampled, trained, "k3"), mask))}


@torch.no_grad()
def tis_weights(trainer_logp: Tensor, engine_logp: Tensor, mask: Tensor, cap: float):
    """Truncated importance sampling (TIS, Yao et al. 2025, "Your Efficient RL Framework Secretly
    Brings You Off-Policy RL Training"): the tokens were sampled from the engine's distribution,
    the policy loss assumes the trainer's, so each token's loss is weighted by
    min(pi_trainer / pi_engine, cap) = min(exp(trainer_logp - engine_logp), cap). The cap bounds
    the variance a token the engine found far less likely would add. Detached (no gradient
    flows through a weight), 0 at masked tokens. Returns (weights [B, T], stats):
    ``tis_weight_mean`` and ``tis_clipped_frac`` (tokens whose ratio exceeded the cap)."""
    ratio = torch.exp(trainer_logp.float() - engine_logp.float())
    weights = _keep(ratio.clamp(max=cap), mask)
    return weights, {"tis_weight_mean": masked_mean(weights, mask).item(),
                     "tis_clipped_frac": masked_mean((ratio > cap).float(), mask).item()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked elements (python float).
    1 = perfect value function, 0 = no better than a constant; nan if Var(returns) == 0."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1.0 - masked_var(returns - values, mask) / var_returns).item()


# ----------------------------------------------------------------- reward model loss
def pairwise_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None,
                  variant: str = "logsigmoid", center_coef: float = 0.0):
    """Bradley-Terry reward-model loss on scores [B] for chosen/rejected answers.

    * ``logsigmoid``: mean(-logsigmoid(r_c - r_r - margin))
    * ``logexp``: mean(log(1 + exp(r_r - r_c + margin))) written as softplus. It is
      mathematically identical to ``logsigmoid`` and exists only for parity with the
      option names of other frameworks; it supports ``margin`` the same way.

    ``margin`` ([B] or None = 0) demands that chosen beat rejected by that much.
    ``center_coef > 0`` adds center_coef * mean((r_c + r_r)^2) (reward centering:
    keeps rewards near 0 without changing the preference). Stats: ``accuracy``
    (fraction r_c > r_r) and ``margin`` (mean r_c - r_r).
    """
    diff = r_chosen - r_rejected
    shifted = diff if margin is None else diff - margin
    if variant == "logsigmoid":
        loss = -F.logsigmoid(shifted).mean()
    elif variant == "logexp":
        loss = F.softplus(-shifted).mean()
    else:
        raise ValueError(f"unknown pairwise loss variant {variant!r} (expected 'logsigmoid' or 'logexp')")
    if center_coef > 0:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).float().mean().item(), "margin": diff.float().mean().item()}
    return loss, stats


# ------------------------------------------------- outcome-reward estimators (RLVR family)
def aggregate_loss(loss: Tensor, mask: Tensor, agg: str = "token-mean", max_len: int | None = None) -> Tensor:
    """One number from per-token losses [B, T].

    * ``token-mean``: sum over all real tokens / their count (DAPO): every token weighs the same.
    * ``seq-mean-token-mean``: each row's token mean, then the mean over rows (original GRPO):
      a token of a short answer weighs more than one of a long answer.
    * ``token-sum-norm``: sum over real tokens / (B * max_len) with a constant max_len
      (Dr. GRPO): no length normalization, so no bias toward long wrong answers.
    """
    if agg == "token-mean":
        return masked_mean(loss, mask)
    if agg == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=1).mean()
    if agg == "token-sum-norm":
        if not max_len:
            raise ValueError("loss aggregation 'token-sum-norm' needs max_len (the generation budget)")
        return masked_sum(loss, mask) / (loss.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {agg!r} (expected token-mean, seq-mean-token-mean or token-sum-norm)")


REWARD_SCALES = ("group", "batch", "none")


def scaled_group_advantages(score: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6,
                            tied: Tensor | None = None) -> Tensor:
    """GRPO advantages [B] with a choice of scale (Dr. GRPO drops the per-group std):

    * ``group``: :func:`group_advantages`, (s - group mean) / (group std + eps)
    * ``batch``: (s - group mean) / (std of the whole batch's scores + eps)
    * ``none``:  s - group mean (Dr. GRPO: easy and hard prompts are not up-weighted)

    Tied groups (``tied`` [B], default :func:`zero_spread` of ``score``) get exactly 0 under
    every scale: a batch of equal scores has a batch std of rounding noise, which turned the
    rounding of each group's mean into advantages of 0.64.
    """
    if scale == "group":
        return group_advantages(score, group_size, eps, tied)
    if scale not in REWARD_SCALES:
        raise ValueError(f"unknown reward scaling {scale!r} (expected {', '.join(REWARD_SCALES)})")
    g = _groups(score, group_size, "group advantages need").double()
    centered = (g - g.mean(1, keepdim=True)).view(-1)
    if scale == "batch":
        centered = centered / (score.double().std() + eps)
    return _untie(centered, score, group_size, tied)


def rloo_advantages(score: Tensor, group_size: int, tied: Tensor | None = None) -> Tensor:
    """RLOO (Ahmadian et al. 2024): a completion's score minus the mean of the OTHER completions
    of its prompt, s_i - (sum_g - s_i) / (G - 1); unbiased because the baseline excludes s_i.
    ``score`` is [B] with groups adjacent; returns [B] (tied groups: 0, as :func:`group_advantages`)."""
    g = _groups(score, group_size, "RLOO needs").double()
    return _untie((g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).view(-1), score, group_size, tied)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE returns-to-go G_t = sum_{k >= t} gamma^(k-t) r_k over real tokens (0 elsewhere).
    REINFORCE++ (Hu 2025) uses them, with the per-token KL inside r, as advantages after
    whitening over the global batch (no critic, no per-prompt baseline)."""
    r = _keep(rewards, mask)
    out, running = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return _keep(out, mask)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment [B]: 0 up to max_len - buffer tokens, then falling
    linearly to -1 at max_len (a response cut at the budget gets -1), -1 beyond."""
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in 1..{max_len} (max_new_tokens), got {buffer}")
    over = lengths.to(torch.float32) - (max_len - buffer)
    return -(over / buffer).clamp(0.0, 1.0)


# ------------------------------------------------ offline preference optimization
# Inputs are per-sequence log-probs [B] of the answer tokens: summed (``logp``) or averaged
# per token (``avg_logp``). Each loss returns (per-row loss [B], chosen reward [B], rejected
# reward [B]); rewards are detached, for the metrics (accuracy = chosen reward > rejected).
def dpo_loss(logp_c: Tensor, logp_r: Tensor, ref_logp_c: Tensor, ref_logp_r: Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * h), h = log-ratio of chosen minus that of
    rejected (log-ratio = policy - reference log-prob). ``label_smoothing`` eps > 0 is cDPO: the
    label is taken to be wrong with probability eps, -(1-eps) log s(beta h) - eps log s(-beta h)."""
    h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, (beta * (logp_c - ref_logp_c)).detach(), (beta * (logp_r - ref_logp_r)).detach()


def ipo_loss(logp_c: Tensor, logp_r: Tensor, ref_logp_c: Tensor, ref_logp_r: Tensor, beta: float = 0.1):
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2, h as in DPO. It regresses the log-ratio gap to
    a finite target instead of pushing it to infinity (DPO's overfitting on deterministic labels)."""
    h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r)
    loss = (h - 1 / (2 * beta)) ** 2
    return loss, (beta * (logp_c - ref_logp_c)).detach(), (beta * (logp_r - ref_logp_r)).detach()


def simpo_loss(avg_logp_c: Tensor, avg_logp_r: Tensor, beta: float = 2.0, gamma: float = 1.0,
               label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024): no reference; the reward is beta times the per-token mean
    log-prob, and chosen must beat rejected by the margin gamma: -log s(beta (a_c - a_r) - gamma)
    (label smoothing as in cDPO)."""
    z = beta * (avg_logp_c - avg_logp_r) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, (beta * avg_logp_c).detach(), (beta * avg_logp_r).detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(avg_logp_c: Tensor, avg_logp_r: Tensor, lam: float = 0.1):
    """ORPO (Hong et al. 2024): no reference; the chosen answer's NLL (per-token mean) plus
    lam * -log s(log odds ratio), odds(y) = p / (1 - p) with p = exp(mean log-prob). The
    rewards reported are lam times the mean log-probs."""
    # mean log-probs of exactly 0 (p = 1) would make the odds infinite
    a_c, a_r = (a.clamp(max=-1e-6) for a in (avg_logp_c, avg_logp_r))
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    loss = -avg_logp_c - lam * F.logsigmoid(log_odds)
    return loss, (lam * avg_logp_c).detach(), (lam * avg_logp_r).detach()


def kto_loss(logp: Tensor, ref_logp: Tensor, desirable: Tensor, kl_ref: Tensor | float, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024) on unpaired answers: r = policy - reference log-prob;
    desirable: w_d (1 - s(beta (r - z))), undesirable: w_u (1 - s(beta (z - r))), where z is
    the reference point (an estimate of KL(policy || reference), detached, >= 0).
    Returns (per-row loss, reward beta r detached)."""
    r = logp - ref_logp
    z = torch.as_tensor(kl_ref, dtype=r.dtype, device=r.device)
    value = torch.where(desirable.bool(), desirable_weight * torch.sigmoid(beta * (r - z)),
                        undesirable_weight * torch.sigmoid(beta * (z - r)))
    weight = torch.where(desirable.bool(), torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    return weight - value, (beta * r).detach()
