"""The GRPO family end to end on a tiny model: each estimator raises a reward with a known optimum
(the letters task of test_ppo: the fraction of lowercase letters, 1.0 at best, ~0.1 at the start),
program rewards reach the trainer, and a failing reward function stops the run with its checkpoint."""
import json

import pytest
import torch
from conftest import TEST_SEED
from test_ppo import PROMPTS, letter_reward, mean, shared_roles

from frugal_rlhf.config import PPOConfig
from frugal_rlhf.rl.rewards import RewardError, RewardSet
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.ppo import PPOTrainer

ESTIMATORS = {
    "rloo": dict(advantage="rloo", group_size=4, rollout_batch_size=4),
    "reinforce++": dict(advantage="reinforce++", group_size=1, rollout_batch_size=16),
    # Dr. GRPO (no std scaling, no length normalization) with DAPO's clip-higher and dynamic sampling
    "dr-grpo+dapo": dict(advantage="group", group_size=4, rollout_batch_size=4, scale_rewards="none",
                         loss_agg="token-sum-norm", clip_eps_high=0.28, dynamic_sampling=True),
}


def run_rl(tmp_path, **kw):
    """test_ppo's letters run without a critic."""
    actor, _, ref, tok = shared_roles()
    cfg = PPOConfig(**{"model": "tiny-llama", "output": str(tmp_path / "ppo"), "max_steps": 20, "lora_rank": 8,
                       "batch_size": 8, "lr": 3e-3, "max_new_tokens": 12, "kl_coef": 0.01, "dtype": "fp32",
                       "save_every": 0, "eval_every": 0, "ppo_epochs": 2, **kw})
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    trainer = PPOTrainer(strategy, actor, None, None, ref, config=cfg, tokenizer=tok, reward_fn=letter_reward(tok),
                         prompts=PROMPTS)
    return trainer, [m for m in trainer.fit() if m["step"] > 0]


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_raises_the_reward(tmp_path, name):
    torch.manual_seed(TEST_SEED)  # the adapters' initialization, then the run's sampling: the suite's seed
    # 8 tokens and 4 epochs a rollout: more updates per generated token than test_ppo's runs, for cost.
    trainer, m = run_rl(tmp_path, seed=TEST_SEED, max_steps=30, max_new_tokens=8, ppo_epochs=4, **ESTIMATORS[name])
    assert trainer.critic is None and "value_loss" not in m[-1]
    rewards = [x["reward"] for x in m]
    # Without learning the 5-step means differ by noise of ~0.03 (16 answers x 8 tokens a step); the
    # estimators without std scaling (rloo, Dr. GRPO) climb slower than GRPO: +0.2 in 30 steps.
    assert mean(rewards[-5:]) > mean(rewards[:5]) + 0.2, rewards
    if name == "dr-grpo+dapo":
        assert all("dropped_groups" in x for x in m)


def test_estimator_options_are_checked_before_models_load(tmp_path):
    from frugal_rlhf.rl.algorithms import check_estimator

    bad = [(dict(advantage="ppo"), "expected one of"), (dict(advantage="rloo", group_size=1), "group_size >= 2"),
           (dict(advantage="gae", dynamic_sampling=True), "dynamic-sampling"),
           (dict(advantage="group", group_size=2, loss_agg="sum"), "unknown loss aggregation"),
           (dict(advantage="group", group_size=2, scale_rewards="max"), "scale_rewards")]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            check_estimator(PPOConfig(**kw), kw["advantage"] == "gae")


def letters_text(prompts, completions, rows):
    """The letters task read from decoded text, and a row field: what a user function sees."""
    assert all(r["answer"] == "x" for r in rows)
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]


def raise_after_two_calls(prompts, completions, rows):
    raise_after_two_calls.calls = getattr(raise_after_two_calls, "calls", 0) + 1
    if raise_after_two_calls.calls > 2:
        raise RuntimeError("boom")
    return [0.5] * len(completions)


def _text_trainer(tmp_path, spec, **kw):
    actor, _, ref, tok = shared_roles()
    cfg = PPOConfig(**{"model": "tiny-llama", "output": str(tmp_path / "ppo"), "lora_rank": 8, "rollout_batch_size": 4,
                       "batch_size": 16, "lr": 3e-3, "max_new_tokens": 8, "kl_coef": 0.01, "dtype": "fp32",
                       "eval_every": 0, "advantage": "group", "group_size": 4, "overlong_penalty": 2, **kw})
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    rows = [{"prompt": [{"role": "user", "content": p}], "reference": "x", "answer": "x"} for p in PROMPTS]
    return PPOTrainer(strategy, actor, None, None, ref, config=cfg, tokenizer=tok, prompts=rows, eval_prompts=rows[:4],
                      rewards=RewardSet([spec]))


def test_program_rewards_reach_the_trainer_and_are_logged_per_component(tmp_path):
    torch.manual_seed(0)
    metrics = [m for m in _text_trainer(tmp_path, "python:test_rlvr:letters_text=2", max_steps=2,
                                        save_every=0).fit() if m["step"] > 0]
    for m in metrics:  # the score is 2 x the function's value plus the overlong penalty, each logged
        assert m["reward"] == pytest.approx(2 * m["reward_letters_text"] + m["reward_overlong"], abs=1e-5)
        assert -1 <= m["reward_overlong"] <= 0
    assert "eval_reward_letters_text" in metrics[-1]


def test_a_failing_reward_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    raise_after_two_calls.calls = 0  # the step-0 evaluation and step 1 succeed, step 2 raises
    torch.manual_seed(0)
    trainer = _text_trainer(tmp_path, "python:test_rlvr:raise_after_two_calls", max_steps=4, save_every=1)
    with pytest.raises(RewardError, match=r"RuntimeError: boom on row 0 of the batch \(prompt 'Write letters \d+', "
                                          r"completion '.*'\)"):
        trainer.fit()
    assert [p.name for p in trainer.checkpoints()] == ["step-0000001"]
    torch.manual_seed(0)
    resumed = _text_trainer(tmp_path, "math", max_steps=2, save_every=1, resume=True)
    rows = {m["step"]: m for m in resumed.fit()}
    # Step 1 is the failed run's (kept, not redone); step 2 is new, under the new reward.
    assert sorted(rows) == [0, 1, 2]
    assert "reward_raise_after_two_calls" in rows[1] and "reward_math" in rows[2]


def test_rm_component_is_the_reward_models_score_weighted(tmp_path):
    """--reward rm:PATH=2 --reward length:4 scores 2 x what --reward-model alone gives, plus the length term."""
    from frugal_rlhf.data.tokenize import PromptCollator, encode_prompt
    from frugal_rlhf.models.roles import RewardModel, SharedLM
    from frugal_rlhf.models.loading import load_model

    torch.manual_seed(0)
    hf, tok = load_model("tiny-llama", torch.float32)
    rm = RewardModel(SharedLM(hf))
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    actor, _, ref, _ = shared_roles()
    cfg = PPOConfig(model="tiny-llama", output=str(tmp_path / "out"), dtype="fp32", save_every=0, eval_every=0,
                    advantage="group", group_size=2)
    strategy = NaiveStrategy(seed=0, dtype="fp32")
    strategy.setup_distributed()
    plain = PPOTrainer(strategy, actor, None, rm, ref, config=cfg, tokenizer=tok)
    mixed = PPOTrainer(strategy, actor, None, rm, ref, config=cfg, tokenizer=tok,
                       rewards=RewardSet([f"rm:{tmp_path}=2", "length:4"]))
    rows = [{"prompt": [{"role": "user", "content": "Say hi"}], "reference": None}]
    batch = PromptCollator(tok.pad_token_id)([{"prompt_ids": encode_prompt(tok, r["prompt"], 64)} for r in rows])
    resp = torch.tensor([[70, 71, 72, 73], [80, 81, tok.pad_token_id, tok.pad_token_id]])
    seq = torch.cat([batch["input_ids"].repeat(2, 1), resp], 1)
    attn = torch.cat([batch["attention_mask"].repeat(2, 1), (resp != tok.pad_token_id).long()], 1)
    with torch.no_grad():
        alone, _ = plain.scorer(seq, attn, batch["input_ids"].shape[1])
        both, parts = mixed.scorer(seq, attn, batch["input_ids"].shape[1], rows)
    length = torch.tensor([1.0, 0.5])  # 4 and 2 tokens against the target 4
    torch.testing.assert_close(both, 2 * alone + length)
    torch.testing.assert_close(parts["reward_rm"], alone)


def test_recipe_comparison_and_verdict_by_hand():
    from frugal_rlhf.app.recipes import compare, verdict

    before = {"strict": [0, 0, 0, 0, 1, 0, 0, 0], "lenient": [1, 0, 1, 0, 1, 0, 0, 0]}
    after = {"strict": [1, 0, 1, 0, 1, 0, 0, 0], "lenient": [1, 0, 1, 0, 1, 0, 0, 0]}
    r = compare(before, after)
    # strict 1/8 -> 3/8; paired differences [1,0,1,0,0,0,0,0]: mean 0.25, unbiased variance
    # (2 x 0.75^2 + 6 x 0.25^2) / 7 = 1.5 / 7, SE sqrt(variance / 8)
    assert r["strict"]["before"] == 0.125 and r["strict"]["after"] == 0.375
    assert r["strict"]["change"] == 0.25 and r["strict"]["change_se"] == pytest.approx((1.5 / 7 / 8) ** 0.5)
    assert verdict(r).startswith("no significant change")  # +0.25 is within 2 x 0.164
    form = {"strict": [1, 1, 1, 1, 1, 1, 0, 0], "lenient": before["lenient"]}  # +0.75 strict, lenient flat
    assert verdict(compare(before, form)).startswith("format only")
    better = {"strict": form["strict"], "lenient": [1, 1, 1, 1, 1, 1, 1, 0]}  # +0.5 lenient, SE 0.189
    assert verdict(compare(before, better)).startswith("learned")


def test_recipe_math_runs_end_to_end_on_a_tiny_model(tmp_path):
    from frugal_rlhf.app.pipeline import packaged_config
    from frugal_rlhf.app.recipes import load_recipe_config, run_math_recipe

    cfg = load_recipe_config(packaged_config("rlvr-math-quick"), {"output": str(tmp_path), "eval_problems": 8})
    cfg.ppo = {**cfg.ppo, "max_steps": 2, "eval_prompts": 2, "dtype": "fp32"}
    result = run_math_recipe(cfg)
    assert result["n_eval"] == 8 and result["steps"] == 2
    assert {"before", "after", "change", "change_se"} <= set(result["lenient"]) and result["verdict"]
    for mode in ("strict", "lenient"):  # each problem's correctness, for paired comparisons between runs
        per = result["correct"][mode]
        assert len(per["before"]) == len(per["after"]) == 8 and sum(per["after"]) / 8 == result[mode]["after"]
    report = (tmp_path / "report.md").read_text()
    assert "| lenient |" in report and "| strict |" in report and (tmp_path / "grpo" / "rlvr.png").exists()
    train = {json.loads(line)["prompt"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()}
    test = {json.loads(line)["prompt"] for line in (tmp_path / "data" / "test.jsonl").read_text().splitlines()}
    assert not train & test


def test_recipe_accuracy_is_the_trained_weights_whatever_engine_sampled_the_rollouts(tmp_path):
    """Accuracy greedily decodes the trainer's own weights (the torch engine), not the rollout
    engine: another engine's rounding would flip greedy answers and measure the engine too."""
    from frugal_rlhf.app.prefs import generate_responses
    from frugal_rlhf.app.recipes import accuracy
    from frugal_rlhf.data.formats import load_dataset_file
    from frugal_rlhf.data.math_problems import generate, write_jsonl
    from frugal_rlhf.data.tokenize import stop_tokens
    from frugal_rlhf.generation import SampleConfig
    from frugal_rlhf.generation.engines import RolloutEngine, make_engine

    class Refuses(RolloutEngine):  # stands for llama.cpp or vLLM
        def generate(self, *args, **kw):
            raise AssertionError("accuracy sampled from the rollout engine")

    trainer, _ = run_rl(tmp_path, advantage="group", group_size=2, rollout_batch_size=2, max_steps=1)
    trainer.engine = Refuses()
    rows = load_dataset_file(str(write_jsonl(generate(6, 2, 0, "test"), tmp_path / "test.jsonl")), "prompt")
    got = accuracy(trainer, rows, 6, 4)
    tok = trainer.tokenizer
    cfg = SampleConfig(6, 0.0, 0, 1.0, stop_tokens(tok), tok.pad_token_id)
    torch_answers = generate_responses(make_engine("torch", autocast=trainer.strategy.autocast), trainer.policy(),
                                       tok, [r["prompt"] for r in rows], cfg, 4, 256, 0, trainer.strategy.device)
    assert got["answers"] == torch_answers and len(got["lenient"]) == 6


def test_bench_compare_math_reward_is_ours_on_both_sides(tmp_path):
    """`bench compare --stage grpo --reward math`: TRL's reward function is our lenient math
    reward in TRL's calling form (same numbers on the same completions), and our side runs
    GRPO on the recipe's problems with that reward and no reward model (no timing asserted)."""
    from frugal_rlhf.bench.peers import _frugal, math_rows
    from frugal_rlhf.bench.trl_grpo import math_reward
    from frugal_rlhf.rl.rewards import RewardSet

    rows = math_rows(8)
    assert len({r["prompt"][0]["content"] for r in rows}) == 8
    texts = [f"It is {r['answer']}." if i % 2 else "It is 3." for i, r in enumerate(rows)]
    ours = RewardSet(["math"]).components[0].fn(None, texts, rows, None)
    theirs = math_reward([[{"role": "assistant", "content": t}] for t in texts], [r["answer"] for r in rows])
    assert theirs == ours and sum(ours) >= 4  # every odd row answers right
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = _frugal("grpo", "tiny-llama", str(path), 2, 4, 64, 4, "fp32", 4, reward="math")
    assert len(rates) == 1 and rates[0] > 0
