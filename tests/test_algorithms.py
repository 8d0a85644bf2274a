"""The algorithm registry (rl/algorithms.py): what each estimator and preference loss declares,
that an algorithm added there reaches the trainer with nothing else changed, that no name is
compared outside it, and the one definition of a tied group (the two tie bugs of issue 35)."""
import ast
import math
from pathlib import Path

import pytest
import torch
from conftest import TEST_SEED
from test_ppo import PROMPTS, shared_roles
from test_rlvr import run_rl

import frugal_rlhf
from frugal_rlhf.config import PPOConfig, PreferenceConfig
from frugal_rlhf.models.memory import Held
from frugal_rlhf.rl import algorithms as A
from frugal_rlhf.rl import losses as L
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.ppo import PPOTrainer


def test_estimators_declare_what_they_need():
    table = {n: (e.method, e.critic, e.groups, e.kl_in_loss) for n, e in A.ESTIMATORS.items()}
    assert table == {"gae": ("PPO", True, False, False), "group": ("GRPO", False, True, True),
                     "rloo": ("RLOO", False, True, True), "reinforce++": ("REINFORCE++", False, False, False)}
    assert A.held_roles(PPOConfig(advantage="gae")) == Held(critic=True)
    assert A.held_roles(PPOConfig(advantage="group")) == Held(critic=False)


def test_preference_losses_declare_what_they_need():
    table = {n: (p.reference, p.beta, p.length_normalized, p.paired, p.smoothing)
             for n, p in A.PREFERENCE_LOSSES.items()}
    assert table == {"dpo": (True, 0.1, False, True, 0.0), "cdpo": (True, 0.1, False, True, 0.1),
                     "ipo": (True, 0.1, False, True, 0.0), "simpo": (False, 2.0, True, True, 0.0),
                     "orpo": (False, 0.1, True, True, 0.0), "kto": (True, 0.1, False, False, 0.0)}
    assert A.held_roles(PreferenceConfig(loss="dpo")) == Held(reference=True)
    assert A.held_roles(PreferenceConfig(loss="dpo", precompute_ref=True)) == Held(reference=False)
    assert A.held_roles(PreferenceConfig(loss="simpo")) == Held(reference=False)
    with pytest.raises(ValueError, match="expected one of dpo, cdpo"):
        A.preference_loss("dpoo")


def test_preference_entries_compute_the_losses_of_rl_losses():
    logp = torch.tensor([-3.0, -5.0, -2.0, -2.5])
    ref = torch.tensor([-4.0, -4.5, -2.2, -2.0])
    avg = logp / torch.tensor([3.0, 5.0, 2.0, 2.5])
    x = A.PreferenceInputs(logp, avg, ref, beta=0.1, smoothing=0.0, simpo_gamma=1.0, orpo_lambda=0.1)
    want = {"dpo": L.dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], 0.1),
            "ipo": L.ipo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], 0.1),
            "simpo": L.simpo_loss(avg[0::2], avg[1::2], 0.1, 1.0), "orpo": L.orpo_loss(avg[0::2], avg[1::2], 0.1)}
    for name, expected in want.items():
        for got, exp in zip(A.preference_loss(name).compute(x), expected):
            assert torch.equal(got, exp), name


def _names_compared(tree, names):
    """(line, constant) of every comparison of an `advantage` or `loss` field with one of `names`."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        about = any(isinstance(s, ast.Attribute) and s.attr in ("advantage", "loss") or
                    isinstance(s, ast.Name) and s.id in ("advantage", "loss") for s in sides)
        consts = [c.value for s in sides for c in ([s] if isinstance(s, ast.Constant) else getattr(s, "elts", []))
                  if isinstance(c, ast.Constant)]
        found += [(node.lineno, c) for c in consts if about and c in names]
    return found


def test_no_algorithm_name_is_compared_outside_the_registry():
    names = set(A.ESTIMATORS) | set(A.PREFERENCE_LOSSES)
    root = Path(frugal_rlhf.__file__).parent
    hits = {str(p.relative_to(root)): _names_compared(ast.parse(p.read_text()), names)
            for p in root.rglob("*.py") if p.name != "algorithms.py"}
    assert {p: h for p, h in hits.items() if h} == {}
    # the check itself sees such a comparison
    assert _names_compared(ast.parse("if cfg.advantage in ('group', 'x'): pass"), names) == [(1, "group")]


def test_a_registered_estimator_reaches_the_trainer(tmp_path):
    """The registry's own example: a median baseline over each prompt's completions, registered
    in one place, trains with nothing else changed (and raises the letters reward)."""
    @A.register_estimator("median-baseline", "MedianPG", groups=True, kl_in_loss=True)
    def _median(x):
        g = x.outcome.view(-1, x.group_size)
        return A.outcome_advantages(x, (g - g.median(1, keepdim=True).values).view(-1))

    try:
        torch.manual_seed(TEST_SEED)  # as test_rlvr's estimators, which climb +0.2 on this run
        trainer, m = run_rl(tmp_path, seed=TEST_SEED, max_steps=30, max_new_tokens=8, ppo_epochs=4,
                            advantage="median-baseline", group_size=4, rollout_batch_size=4)
        assert trainer.critic is None and "kl_loss" in m[-1]  # what the entry declared: no critic, KL as a loss
        rewards = [x["reward"] for x in m]
        assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
        assert "MedianPG" in (tmp_path / "ppo" / "final" / "README.md").read_text()
    finally:
        del A.ESTIMATORS["median-baseline"]


# ---------------------------------------------------------------- the one definition of a tie
def test_batch_scaling_gives_a_tied_batch_zero_advantages():
    """Issue 35's reproduction: 16 equal scores in one group, scaled by the batch's std (rounding
    noise) gave 0.6422 each."""
    score = torch.full((16,), 13.78885269165039)
    for scale in L.REWARD_SCALES:
        assert torch.equal(L.scaled_group_advantages(score, 16, scale), torch.zeros(16)), scale
    # a tied group beside an informative one: 0 under every scale, the other group as before
    mixed = torch.tensor([13.78885269165039] * 4 + [1.0, 2.0, 3.0, 4.0])
    for scale in L.REWARD_SCALES:
        adv = L.scaled_group_advantages(mixed, 4, scale)
        assert torch.equal(adv[:4], torch.zeros(4)) and adv[4:].abs().min() > 0.05, scale
    assert torch.equal(L.rloo_advantages(score, 4), torch.zeros(16))


def test_ties_are_decided_on_the_score_the_advantages_use():
    """Normalization cannot untie a group one ulp apart; clipping ties a group it flattens."""
    c = 13.78885269165039
    ulp = torch.nextafter(torch.tensor(c), torch.tensor(math.inf)).item()
    raw = torch.tensor([c, ulp, c, c, 11.0, 12.0, 13.0, 14.0, 1.0, 2.0, 3.0, 4.0])
    normalized = (raw - c) / 0.25  # as RunningMoments.normalize with a running mean at c: group 0 near 0
    assert L.zero_spread(normalized, 4).tolist() == [False, False, False]  # the old test: one ulp looked apart
    assert L.zero_spread(normalized, 4, raw, 0.25).tolist() == [True, False, False]
    clipped = L.clip_score(raw, 10.0)
    assert L.zero_spread(clipped, 4, raw).tolist() == [True, True, False]
    assert L.zero_spread(raw, 4).tolist() == [True, False, False]  # the old test, on the raw score


class _Scores:
    """A reward that returns fixed scores per rollout, in the trainer's contract."""

    def __init__(self, scores):
        self.scores = torch.tensor(scores)

    def __call__(self, seq, attn, prompt_length):
        return self.scores[:seq.shape[0]].clone()


@pytest.mark.parametrize("setting", ["normalize", "clip"])
def test_dynamic_sampling_and_advantages_agree_on_ties(tmp_path, setting):
    """The trainer's rollout: a tied group gets zero advantages, is dropped by dynamic sampling
    and counted in zero_std_frac; an informative one gets advantages and is kept. On the old
    code a group one ulp apart under --normalize-reward was dropped yet got +-0.44, and raw
    scores [11, 12, 13, 14] under reward_clip 10 were kept yet got 0."""
    c = 13.78885269165039
    ulp = torch.nextafter(torch.tensor(c), torch.tensor(math.inf)).item()
    if setting == "normalize":  # group 0 one ulp apart (a tie), group 1 informative
        scores, kw, tied = [c, ulp, c, c, c - 1, c + 1, c - 2, c + 2], dict(normalize_reward=True), [True, False]
    else:  # group 0 informative, group 1 all clipped to 10 (a tie)
        scores, kw, tied = [1.0, 2.0, 3.0, 4.0, 11.0, 12.0, 13.0, 14.0], dict(reward_clip=10.0), [False, True]
    torch.manual_seed(TEST_SEED)
    actor, _, ref, tok = shared_roles()
    cfg = PPOConfig(model="tiny-llama", output=str(tmp_path / "t"), advantage="group", group_size=4,
                    rollout_batch_size=2, batch_size=8, max_steps=1, lora_rank=8, max_new_tokens=4,
                    dynamic_sampling=True, dtype="fp32", save_every=0, eval_every=0, **kw)
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    trainer = PPOTrainer(strategy, actor, None, None, ref, config=cfg, tokenizer=tok, reward_fn=_Scores(scores),
                         prompts=PROMPTS[:2])
    seen = []
    real_informative = trainer.informative
    trainer.informative = lambda exp: seen.append((exp, real_informative(exp))) or seen[-1][1]
    m = [x for x in trainer.fit() if x["step"] == 1][0]
    whole, kept_exp = seen[0]
    tied_rows = torch.tensor(tied).repeat_interleave(4)
    per_row = whole.advantages.abs().sum(1)
    assert torch.equal(per_row[tied_rows], torch.zeros(4))  # the tie: exactly no signal
    assert (per_row[~tied_rows] > 0.1).all()  # the informative group: an advantage at every completion
    assert whole.tied.tolist() == tied_rows.tolist()
    assert kept_exp.score.tolist() == pytest.approx(torch.tensor(scores)[~tied_rows].tolist())
    assert m["dropped_groups"] == 1 and m["zero_std_frac"] == 0.5
