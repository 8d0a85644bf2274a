"""PPO: the loop. Math lives in rl.losses, rollouts in rl.experience; this file only orders them.

One step = one rollout batch of prompts -> Experience -> `ppo_epochs` passes over shuffled
mini-batches updating actor (clipped surrogate [+ entropy bonus] [+ PPO-ptx]) and critic
(clipped value loss toward returns = advantages + old values). The advantage estimator
(rl/algorithms.py) says whether there is a critic, whether each prompt is sampled
`group_size` times and compared within its group, and whether the KL to the reference is a
per-token reward penalty or a loss term (GRPO's k3, weighted by the KL coefficient).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from ..config import PPOConfig
from ..data.formats import load_dataset_file
from ..data.loader import LazyEncoded, split_rows
from ..data.tokenize import (IGNORE, PromptCollator, SFTCollator, encode_conversation, encode_prompt, 
                             stop_tokens)
from ..device import reset_phase_peak
from ..generation import SampleConfig
from ..generation.engines import check_rollout_engine, make_engine, resolve_engine
from ..models.build import build_ppo_roles
from ..models.memory import sampling_batch
from ..models.modes import inference, train_without_dropout
from ..rl import losses as L
from ..rl.algorithms import check_estimator, estimator
from ..rl.experience import RolloutSettings, RunningMoments, make_experience
from ..rl.kl import AdaptiveKLController, FixedKLController
from ..rl.rewards import RewardSet
from ..rl.scoring import Scorer
from .base import Trainer, make_optimizer, make_scheduler

EVAL_SAMPLES = 32  # answers per call in evaluation (eval_chunk)
log = logging.getLogger("frugal_rlhf")


class GeneratorState:
    """A torch.Generator made checkpointable (the sampling randomness of the run)."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["state"])


class PPOTrainer(Trainer):
    stage = "ppo"
    evaluate_at_start = True

    def __init__(self, strategy, actor, critic, reward_model, reference, actor_optim=None, critic_optim=None,
                 config=None, tokenizer=None, prompts=None, eval_prompts=None, ptx_rows=None, reward_fn=None,
                 rewards=None):
        super().__init__(strategy, config or PPOConfig())
        cfg = self.config
        check_estimator(cfg, critic is not None, strategy.world_size)
        self.estimator = estimator(cfg.advantage)
        # the critic's warm-up: without a critic there is nothing to warm up (`frugal demo --advantage group`)
        self.warmup_steps = cfg.critic_warmup_steps if critic is not None else 0
        check_rollout_engine(cfg)
        self.tokenizer = tokenizer or actor.tokenizer
        self.reward_model, self.reference = reward_model, reference
        trained = {"actor": (actor, actor_optim or make_optimizer(actor.trainable_parameters(), cfg.learning_rate(),
                                                                  cfg.weight_decay))}
        if critic is not None:
            trained["critic"] = (critic, critic_optim or make_optimizer(
                critic.trainable_parameters(), cfg.critic_lr or cfg.learning_rate(), cfg.weight_decay))
        self.checkpoint_activations(*(m for m, _ in trained.values()))  # the update's forwards with gradients
        prepared = strategy.prepare(*trained.values())  # one call: FSDP shards models sharing a base together
        trained = dict(zip(trained, prepared if critic is not None else [prepared]))
        self.actor, self.actor_optim = trained["actor"]
        self.critic, self.critic_optim = trained.get("critic", (None, None))
        self.reward_model, self.reference = strategy.prepare(reward_model, reference)
        # name -> fn(prompts, answers) -> scores: logged on held-out answers as eval_<name>, never
        # a reward (the app gives the demo's hidden gold judge here).
        self.held_out_scorers = {}
        self.models = {k: m for k, (m, _) in trained.items()}
        self.optimizers = {k: o for k, (_, o) in trained.items()}
        self.schedulers = {k: make_scheduler(o, cfg) for k, o in self.optimizers.items()}
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKLController(cfg.kl_coef))
        self.moments = RunningMoments()
        self.gen = GeneratorState(cfg.seed)
        self.temperature = cfg.temperature if cfg.temperature > 0 else 1.0  # greedy rollouts: log-probs at T=1
        self.engine = self.make_engine()  # samples the rollouts (generation/engines.py)
        self.settings = RolloutSettings(
            SampleConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, stop_tokens(self.tokenizer),
                         self.tokenizer.pad_token_id),
            cfg.kl_estimator, cfg.gamma, cfg.lam, cfg.reward_clip, cfg.normalize_reward, cfg.whiten_advantages,
            cfg.advantage, cfg.group_size, cfg.scale_rewards)
        self.scorer = Scorer(self.tokenizer, self.reward_model, rewards, reward_fn, cfg.group_size,
                             self.settings.sample.eos_token_ids, cfg.max_new_tokens, cfg.overlong_penalty)
        self.stateful = {**{f"sched_{k}": v for k, v in self.schedulers.items()}, "kl": self.kl_ctl,
                         "moments": self.moments, "generator": self.gen}
        self.ptx_loader = None
        if ptx_rows:
            encode = lambda r: encode_conversation(self.tokenizer, r["messages"], cfg.max_length)  # noqa: E731
            self.ptx_loader = strategy.setup_dataloader(LazyEncoded(ptx_rows, encode), cfg.batch_size,
                                                        SFTCollator(self.tokenizer.pad_token_id))
            self.stateful["ptx_loader"] = self.ptx_loader
        if prompts is not None:
            self.set_prompts(prompts, eval_prompts)

    def make_engine(self):
        cfg, strategy = self.config, self.strategy
        # `auto` leaves sharded weights to torch (check_rollout_engine refuses the other engines there)
        name = "torch" if cfg.strategy in ("fsdp", "deepspeed") else resolve_engine(cfg.rollout_engine,
                                                                                   strategy.device.type, strategy.dtype)
        engine = make_engine(name, autocast=strategy.autocast, tokenizer=self.tokenizer, quant=cfg.rollout_quant)
        log.info("rollouts sampled by the %s engine%s", engine.name, "" if engine.matches_trainer else
                 f" (its log-probs differ from the trainer's: truncated importance sampling, cap {cfg.tis_cap})")
        return engine

    # ---- data --------------------------------------------------------------------------------
    def set_prompts(self, prompts, eval_prompts=None):
        """prompts: strings, message lists or {"prompt": messages} rows."""
        rows = [_as_prompt_row(p) for p in prompts]
        encode = lambda r: {"prompt_ids": encode_prompt(self.tokenizer, r["prompt"], self.config.max_prompt_length),  # noqa: E731
                            **r}
        self.eval_rows = [encode(_as_prompt_row(p)) for p in (eval_prompts or [])]
        self.loader = self.strategy.setup_dataloader(LazyEncoded(rows, encode), self.config.rollout_batch_size,
                                                     PromptCollator(self.tokenizer.pad_token_id))
        self.stateful["loader"] = self.loader

    def fit(self, prompts=None, eval_prompts=None, stop_at=None):
        if prompts is not None:
            self.set_prompts(prompts, eval_prompts)
        return super().fit(stop_at=stop_at)

    @classmethod
    def from_config(cls, strategy, cfg):
        """The short path: roles on one shared base, prompts and demonstrations from files."""
        check_estimator(cfg, estimator(cfg.advantage).critic, strategy.world_size)
        check_rollout_engine(cfg)
        # --reward specs are checked, and program rewards probed on the data, before any model loads.
        rewards = RewardSet(cfg.reward, cfg.reward_timeout) if cfg.reward else None
        rows = load_dataset_file(cfg.prompts, "prompt", cfg.skip_bad_rows, cfg.max_rows)
        if cfg.eval_data:
            train, held_out = rows, load_dataset_file(cfg.eval_data, "prompt", cfg.skip_bad_rows)[:cfg.eval_prompts]
        else:
            train, held_out = split_rows(rows, 1.0, cfg.eval_prompts, cfg.seed)
        if rewards is not None:
            rewards.check_rows(train, cfg.prompts)
            rewards.check_rows(held_out, cfg.eval_data or cfg.prompts)
            rewards.probe(rows)
            cfg = dataclasses.replace(cfg, reward_model=rewards.model_path)  # None: no reward model to load
        roles = build_ppo_roles(cfg, with_critic=estimator(cfg.advantage).critic)
        ptx = load_dataset_file(cfg.ptx_data, "sft", cfg.skip_bad_rows) if cfg.ptx_data and cfg.ptx_coef else None
        log.info("ppo: %d prompts, %d held out; roles on %s", len(train), len(held_out),
                 "one shared base" if roles.shared else "separate models")
        return cls(strategy, roles.actor, roles.critic, roles.reward_model, roles.reference, config=cfg,
                   tokenizer=roles.tokenizer, prompts=train, eval_prompts=held_out, ptx_rows=ptx, rewards=rewards)

    # ---- one PPO step ------------------------------------------------------------------------
    def train_step(self, step):
        batch = self.loader.next_batch()
        dev = self.strategy.device
        reset_phase_peak(dev)
        inference(self.actor, self.critic, self.reference, self.reward_model)
        with self.strategy.unsharded(self.actor):
            exp, timing = make_experience(self.actor, self.critic, self.with_rows(batch["rows"]), self.reference,
                                          batch["input_ids"].to(dev), batch["attention_mask"].to(dev), self.settings,
                                          self.kl_ctl.value, self.gen.generator, self.strategy, self.moments,
                                          policy_logprobs=not self.one_update(batch["input_ids"].shape[0]),
                                          engine=self.engine)
        memory = {"mem_rollout_gb": reset_phase_peak(dev) / 2**30}  # generation and scoring
        t0 = time.perf_counter()
        parts = {k: float(v.mean()) for k, v in exp.reward_parts.items()}
        stats = self.update(self.informative(exp), actor_moves=step > self.warmup_steps)
        timing["time_update"] = time.perf_counter() - t0
        memory["mem_update_gb"] = reset_phase_peak(dev) / 2**30
        for name, sched in self.schedulers.items():
            if name != "actor" or step > self.warmup_steps:  # the actor's schedule starts when it moves
                sched.step()
        self.engine.sync(self.policy())  # the next rollout samples from the updated actor
        mask = exp.action_mask
        kl = float((exp.kl * mask).sum(1).mean()) if exp.kl is not None else stats.pop("kl", float("nan"))
        local = {"kl": kl, "response_length": float(mask.sum(1).mean()),
                 "prompt_length": float(batch["attention_mask"].sum(1).float().mean()),
                 **timing, **stats, **parts}
        if exp.logprobs is not None:  # else the update measured it against its own first forward
            local.update(L.logprob_mismatch(exp.sample_logprobs, exp.logprobs, mask))
        if self.critic is not None:
            local["explained_variance"] = L.explained_variance(exp.values, exp.returns, mask)
        if exp.tied is not None:  # groups whose completions all scored the same: no signal (common with verifiable rewards)
            local["zero_std_frac"] = float(exp.tied.float().mean())
        if self.config.dynamic_sampling:
            local["dropped_groups"] = self.dropped_groups
        if self.config.normalize_reward:
            local["reward_norm"] = float(self.moments.normalize(exp.score).mean())
        # Every rank logs, and the KL controller adapts to, the global batch (a rank's own
        # share would let adaptive KL coefficients drift apart between ranks).
        out = self.strategy.mean_over_ranks(local)
        scores = self.strategy.all_gather(exp.score)
        out["reward"] = float(scores.mean())
        out["reward_std"] = float(scores.std()) if len(scores) > 1 else 0.0
        out["samples_per_s"] = len(scores) / sum(out[k] for k in timing)
        self.kl_ctl.update(out["kl"], len(scores))
        out["kl_coef"] = self.kl_ctl.value
        out.update({k: self.strategy.max_over_ranks(v) for k, v in memory.items()})
        self.warn(out)
        return out

    def with_rows(self, rows):
        return lambda seq, attn, prompt_length: self.scorer(seq, attn, prompt_length, rows)

    def informative(self, exp):
        """Dynamic sampling (DAPO): the update sees only groups whose scores differ (logged)."""
        if not self.config.dynamic_sampling:
            return exp
        keep = ~exp.tied
        self.dropped_groups = int(exp.tied.sum()) // self.config.group_size
        # With nothing left, all advantages are 0 anyway: update on the whole batch (KL term only).
        return exp.select(keep.nonzero().squeeze(1)) if keep.any() else exp

    def one_update(self, prompts: int) -> bool:
        """One optimizer step on the whole rollout (GRPO's usual setting): the rollout's log-probs
        would be those the update's own forward computes, so the experience skips them (as TRL
        does). An estimator with the KL in its rewards (PPO, REINFORCE++) needs them before."""
        cfg = self.config
        return (not self.estimator.needs_rollout_logprobs and cfg.ppo_epochs == 1
                and cfg.batch_size >= prompts * cfg.group_size)

    def update(self, exp, actor_moves: bool = True) -> dict:
        """`ppo_epochs` passes over the rollout's mini-batches; `actor_moves` False: the critic's
        warm-up (--critic-warmup-steps), its value loss alone on the first rollouts."""
        cfg, sums, count = self.config, {}, 0
        for model in self.models.values():
            train_without_dropout(model)
        # Mini-batches of whole groups let the update encode each prompt once per group too.
        group = cfg.group_size if cfg.batch_size % cfg.group_size == 0 else 1
        for _ in range(cfg.ppo_epochs):
            for mb in exp.minibatches(cfg.batch_size, self.gen.generator, group):
                shared = (group, mb.sequences.shape[1] - mb.num_actions - 1)
                # Actor, then critic, each forward followed by its backward: the actor's
                # activations are freed before the critic's forward, and with activation
                # checkpointing a block is recomputed while its own adapter is still active
                # (recomputing the actor's blocks after the critic's forward ran them with the
                # critic's adapter: wrong gradients, found by the test).
                row = self.actor_backward(mb, shared) if actor_moves else {}
                if row is None:
                    continue
                if self.critic is not None:
                    with self.strategy.autocast():
                        values = self.critic(mb.sequences, mb.attention_mask, mb.num_actions, shared).float()
                        vf_loss, vf = L.value_loss(values, mb.values, mb.returns, mb.action_mask, cfg.value_clip)
                    if self.nonfinite_on_any_rank(vf_loss):
                        self.skip_update("value loss")
                        continue
                    self.strategy.backward(cfg.vf_coef * vf_loss, self.critic, self.critic_optim)
                    row.update(value_loss=float(vf_loss.detach()), **vf)
                for name, model in self.models.items():
                    if name != "actor" or actor_moves:
                        row[f"{name}_grad_norm"] = self.optimizer_step(self.optimizers[name], model)
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / max(1, count) for k, v in sums.items()}

    def actor_backward(self, mb, shared) -> dict | None:
        """The actor's loss on one mini-batch (rl.losses.actor_objective) and its backward; its
        stats, or None when the loss was not finite (the update is skipped)."""
        cfg, n = self.config, mb.num_actions
        with self.strategy.autocast():
            logp, entropy = self.actor(mb.sequences, mb.attention_mask, n, temperature=self.temperature,
                                       with_entropy=True, shared_prefix=shared,
                                       entropy_grad=cfg.entropy_coef != 0)
            old = mb.logprobs if mb.logprobs is not None else logp.detach().float()
            # Truncated importance weights where the engine samples from other numbers than the
            # trainer's (rl/losses.py); none where it runs the trainer's own.
            weights, tis = (None, {}) if self.engine.matches_trainer else L.tis_weights(
                old, mb.sample_logprobs, mb.action_mask, cfg.tis_cap)
            loss, row = L.actor_objective(
                logp.float(), old, mb.advantages, mb.action_mask, clip_eps=cfg.clip_eps,
                clip_eps_high=cfg.clip_eps_high, agg=cfg.loss_agg, max_len=cfg.max_new_tokens, weights=weights,
                entropy=entropy, entropy_coef=cfg.entropy_coef,
                ref_logp=mb.ref_logprobs if self.estimator.kl_in_loss else None, kl_coef=self.kl_ctl.value,
                ptx_nll=self.ptx_nll(), ptx_coef=cfg.ptx_coef)
            row.update(tis)
        if self.nonfinite_on_any_rank(loss):
            self.skip_update("policy loss")
            return None
        self.strategy.backward(loss, self.actor, self.actor_optim)
        if mb.logprobs is None:  # one update on the whole rollout: its first forward gives the old log-probs
            row.update(L.logprob_mismatch(mb.sample_logprobs, old, mb.action_mask))
            if mb.kl is None:  # the rollout's KL, for the log and an adaptive coefficient
                row["kl"] = float(L.token_kl(old, mb.ref_logprobs, mb.action_mask, cfg.kl_estimator).sum(1).mean())
        return row

    def ptx_nll(self):
        """PPO-ptx: the actor's language-model loss on a batch of demonstrations (0 without)."""
        if self.ptx_loader is None or not self.config.ptx_coef:
            return 0.0
        batch = self.to_device(self.ptx_loader.next_batch())
        logp, _ = self.actor(batch["input_ids"], batch["attention_mask"])
        return L.lm_nll(logp, (batch["labels"][:, 1:] != IGNORE).float())

    def warn(self, m):
        if m["kl"] > 20:
            log.warning("KL to the reference is %.1f nats per response and may be running away: raise --kl-coef "
                        "or set --kl-target", m["kl"])
        if m.get("clipfrac", 0) > 0.5:
            log.warning("policy clip fraction %.2f: the update is too large; lower --lr or --ppo-epochs",
                        m["clipfrac"])
        if m["response_length"] < 1.5:
            log.warning("responses have collapsed to ~%.1f tokens: the policy may be gaming the reward",
                        m["response_length"])

    # ---- evaluation and output ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self):
        """Held-out prompts, sampled with a fixed seed: mean reward and KL to the reference, each
        reward component, and each held-out scorer's mean (eval_<name>)."""
        if not getattr(self, "eval_rows", None):
            return {}
        collate = PromptCollator(self.tokenizer.pad_token_id)
        scores, kls, parts, extra = [], [], {}, {name: [] for name in self.held_out_scorers}
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        dev = self.strategy.device
        inference(self.actor, self.critic, self.reference, self.reward_model)
        chunk = self.eval_chunk()
        for i in range(0, len(self.eval_rows), chunk):
            rows = self.eval_rows[i:i + chunk]
            batch = collate(rows)
            with self.strategy.unsharded(self.actor):
                exp, _ = make_experience(self.actor, self.critic, self.with_rows(batch["rows"]), self.reference,
                                         batch["input_ids"].to(dev), batch["attention_mask"].to(dev), self.settings,
                                         0.0, gen, self.strategy, engine=self.engine)
            scores.append(exp.score)
            kls.append((exp.kl * exp.action_mask).sum(1))
            for k, v in exp.reward_parts.items():
                parts.setdefault(f"eval_{k}", []).append(v)
            if self.held_out_scorers:
                prompts = [r["prompt"] for r in rows for _ in range(self.config.group_size)]
                for name, scorer in self.held_out_scorers.items():
                    extra[name] += scorer(prompts, self.answers(exp))
        return {"eval_reward": float(torch.cat(scores).mean()), "eval_kl": float(torch.cat(kls).mean()),
                **{k: float(torch.cat(v).mean()) for k, v in parts.items()},
                **{f"eval_{k}": sum(v) / len(v) for k, v in extra.items() if v}}

    def eval_chunk(self) -> int:
        """Held-out prompts sampled together: EVAL_SAMPLES answers where their KV cache fits (no
        gradient is kept, and decoding is memory-bound: a wider batch costs little more per
        step), at least a rollout batch. The demo's 5 evaluations at the rollout batch (8
        answers) took 320 of its PPO stage's 806 s."""
        cfg = self.config
        model = self.strategy.unwrap(self.actor).lm.model
        answers = sampling_batch(model.config, next(model.parameters()).element_size(),
                                 max(EVAL_SAMPLES, cfg.rollout_batch_size * cfg.group_size),
                                 cfg.max_prompt_length + cfg.max_new_tokens)
        # The smallest over ranks: a sharded model's ranks must decode in step.
        answers = -int(self.strategy.max_over_ranks(-float(answers)))
        return max(cfg.rollout_batch_size, answers // cfg.group_size)

    def answers(self, exp) -> list[str]:
        """The decoded answers of a rollout, without their stop tokens."""
        stops = self.settings.sample.eos_token_ids
        return [self.tokenizer.decode([int(t) for t, keep in zip(seq, mask) if keep and int(t) not in stops],
                                      skip_special_tokens=True).strip()
                for seq, mask in zip(exp.sequences[:, -exp.num_actions:], exp.action_mask)]

    def finish(self):
        if self.strategy.is_rank0:
            self.run.plot(["reward", "eval_reward", "kl", "response_length"], "ppo.png", "PPO")
            self.run.plot(["value_loss", "explained_variance", "clipfrac", "entropy"], "ppo_diagnostics.png")
            if self.scorer.names:
                self.run.plot(sorted(self.scorer.names), "rewards.png", "reward components")
            self.export_policy(self.estimator.method)
        self.engine.close()  # its copy of the policy (made again if the trainer samples after)

    def policy(self):
        return self.strategy.unwrap(self.actor)


def _as_prompt_row(p):
    if isinstance(p, str):
        return {"prompt": [{"role": "user", "content": p}], "reference": None}
    if isinstance(p, list):
        return {"prompt": p, "reference": None}
    return p
