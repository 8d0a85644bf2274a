"""The critic of four-role PPO: started from the reward model (InstructGPT's and coati's
initialization) it values a partial answer as the reward model scores it, and its warm-up
trains it alone while the actor waits."""
import pytest
import torch
from conftest import TEST_SEED
from test_ppo import PROMPTS, letter_reward

from frugal_rlhf.config import PPOConfig
from frugal_rlhf.models.build import build_ppo_roles
from frugal_rlhf.models.loading import load_model
from frugal_rlhf.models.reward_io import save_reward_model
from frugal_rlhf.models.roles import Actor, Critic, RewardModel, SharedLM
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.ppo import PPOTrainer


def _reward_model_on_disk(tmp_path, pooling):
    hf, tok = load_model("tiny-llama", torch.float32)
    hf.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(TEST_SEED)
    rm = RewardModel(str(tmp_path / "base"), lora_rank=4, dtype="fp32", pooling=pooling)
    for name, p in rm.named_parameters():  # a trained-looking adapter: B is 0 at initialization
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    save_reward_model(rm, rm.tokenizer, tmp_path / "rm", base=str(tmp_path / "base"), standalone=False)
    return rm, tok


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_critic_from_the_reward_model_values_each_prefix_as_the_reward_model_scores_it(tmp_path, pooling):
    rm, tok = _reward_model_on_disk(tmp_path, pooling)
    cfg = PPOConfig(model=str(tmp_path / "base"), reward_model=str(tmp_path / "rm"), lora_rank=4, dtype="fp32")
    roles = build_ppo_roles(cfg, with_critic=True)
    assert roles.shared and roles.critic.pooling == pooling
    prompt = torch.tensor([[5, 6, 7, 8]])
    answer = torch.tensor([[20, 21, 22, 23, 24]])
    seq = torch.cat([prompt, answer], 1)
    with torch.no_grad():
        values = roles.critic(seq, torch.ones_like(seq), answer.shape[1])[0]
        for t in range(1, answer.shape[1]):  # V(s_t): the prompt and the first t answer tokens
            prefix = seq[:, :prompt.shape[1] + t]
            mask = torch.zeros_like(prefix)
            mask[:, prompt.shape[1]:] = 1
            want = rm(prefix, torch.ones_like(prefix), answer_mask=mask)[0]
            torch.testing.assert_close(values[t], want, rtol=1e-5, atol=1e-5)
    # the critic is a trainable copy: training it leaves the reward model's adapter as it was
    critic_params = dict(roles.critic.named_parameters())
    reward_params = dict(roles.reward_model.named_parameters())
    assert all(p.requires_grad for n, p in critic_params.items() if ".critic." in n)
    assert not any(p.requires_grad for n, p in reward_params.items() if ".reward." in n)


def test_fresh_critic_when_asked(tmp_path):
    _reward_model_on_disk(tmp_path, "mean")
    cfg = PPOConfig(model=str(tmp_path / "base"), reward_model=str(tmp_path / "rm"), lora_rank=4, dtype="fp32",
                    critic_init="fresh")
    critic = build_ppo_roles(cfg, with_critic=True).critic
    assert critic.pooling == "last" and float(critic.head.weight.abs().sum()) == 0.0  # V = 0 at the start


def test_critic_warmup_moves_the_critic_alone_first(tmp_path):
    torch.manual_seed(TEST_SEED)
    hf, tok = load_model("tiny-llama", torch.float32)
    lm = SharedLM(hf)
    lm.add_adapter("actor", 8)
    lm.add_adapter("critic", 8)
    actor, critic, ref = Actor(lm, "actor"), Critic(lm, "critic"), Actor(lm, None)
    cfg = PPOConfig(model="tiny-llama", output=str(tmp_path / "ppo"), max_steps=3, critic_warmup_steps=2,
                    rollout_batch_size=4, batch_size=4, lr=3e-3, max_new_tokens=6, dtype="fp32", save_every=0,
                    eval_every=0, seed=TEST_SEED)
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    trainer = PPOTrainer(strategy, actor, critic, None, ref, config=cfg, tokenizer=tok,
                         reward_fn=letter_reward(tok), prompts=PROMPTS)

    def snapshot(role):  # the role's own trained tensors (both roles register the shared body)
        return {n: p.detach().clone() for n, p in role.named_parameters() if n in role.trainable_state_names()}

    actor0, critic0 = snapshot(actor), snapshot(critic)
    metrics = [m for m in trainer.fit(stop_at=2) if m["step"] > 0]
    assert all(torch.equal(actor0[n], p) for n, p in snapshot(actor).items())  # the actor waited
    assert any(not torch.equal(critic0[n], p) for n, p in snapshot(critic).items())  # the critic learned
    assert all("policy_loss" not in m and "value_loss" in m for m in metrics)
    trainer.config.resume = True
    metrics = [m for m in trainer.fit() if m["step"] == 3]
    assert "policy_loss" in metrics[0]
    assert any(not torch.equal(actor0[n], p) for n, p in snapshot(actor).items())  # then it moves
