"""One training job for tests/test_strategies.py, run under torchrun (2 ranks, gloo) or in-process.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py --strategy fsdp --stage 3 --out DIR

Tasks (each writes DIR/<task>.safetensors with the trained tensors and DIR/result.json on rank 0):
- sft: SFTTrainer on the arithmetic rows, a checkpoint (model + optimizer) at the last step, the
  export at the end (the full_models hook under FSDP);
- rm: RewardTrainer on synthetic pairs, the same way;
- shared: an actor and a critic with their own LoRA adapters on ONE base, stepped together as
  PPO does (DDP's all-reduce path for shared parameters).
--optim sgd (the default) trains sft/rm with SGD + momentum and PPO with SGD instead of the
trainers' AdamW, so that weights differ between strategies only by lr x the rounding of the
gradients (tests/test_strategies.py derives the tolerances); --optim adamw keeps AdamW for sft/rm.
--load CKPT first loads a trained-state file into a fresh actor and saves it back (round trip).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import arithmetic_rows  # noqa: E402

from frugal_rlhf.config import RewardConfig, SFTConfig  # noqa: E402
from frugal_rlhf.strategies import make_strategy  # noqa: E402
from frugal_rlhf.strategies.base import set_seed  # noqa: E402

GLOBAL_BATCH = 8
SHARED_LR = 1e-2
# One thread per rank: two ranks with two OpenMP threads each on a shared 2-core machine spin
# against each other (measured: 5 s per step instead of 0.05 s).
torch.set_num_threads(1)


def preference_rows(n=48):
    return [{"prompt": [{"role": "user", "content": f"Say a number ({i})"}], "chosen": f"{i} is a fine number.",
             "rejected": "no"} for i in range(n)]


def sgd(momentum):
    """The trainers' optimizer factory, as SGD (weight decay is 0 in these runs)."""
    return lambda params, lr, weight_decay=0.0: torch.optim.SGD([p for p in params if p.requires_grad], lr=lr,
                                                                momentum=momentum)


def use_sgd(args):
    import frugal_rlhf.trainers.ppo as ppo
    import frugal_rlhf.trainers.supervised as supervised

    ppo.make_optimizer = sgd(0.0)
    if args.optim == "sgd":
        supervised.make_optimizer = sgd(args.momentum)


def train_config(cls, args, strategy, task):
    return cls(model="tiny-llama", output=str(Path(args.out) / task), max_steps=args.steps,
               batch_size=GLOBAL_BATCH // (strategy.world_size * args.accum), grad_accum=args.accum, lr=args.lr, max_length=64, warmup_ratio=0.0,
               # 8 held-out rows, evaluated at the last step right before its checkpoint: under
               # FSDP ZeRO-2 that no-grad pass leaves blocks gathered when the checkpoint is taken
               save_every=args.steps, eval_every=0, eval_split=0.125, dtype=args.dtype, seed=7,
               lora_rank=args.lora, checkpoint_format=args.ckpt_format)


def run_supervised(args, strategy, task, resume=False):
    from frugal_rlhf.trainers.reward import RewardTrainer
    from frugal_rlhf.trainers.supervised import SFTTrainer

    if task == "sft":
        cfg = train_config(SFTConfig, args, strategy, task)
        if resume:
            cfg.max_steps, cfg.resume = args.steps + 2, True
        trainer = SFTTrainer(strategy, cfg, rows=arithmetic_rows())
    else:
        trainer = RewardTrainer(strategy, train_config(RewardConfig, args, strategy, task), rows=preference_rows())
    if not resume:  # the start, against which an AdamW run's moves are bounded
        strategy.save_model(trainer.model, Path(args.out) / f"{task}-init.safetensors")
    metrics = trainer.fit()
    strategy.save_model(trainer.model, Path(args.out) / f"{'resumed' if resume else task}.safetensors")
    metrics = [m for m in metrics if "loss" in m]  # training steps (not the step-0 evaluation)
    out = {"loss": [m["loss"] for m in metrics], "grad_norm": [m["grad_norm"] for m in metrics]}
    if hasattr(strategy, "local_numel"):
        local, full = strategy.local_numel(trainer.model)
        out["local_numel"], out["full_numel"] = local, full
        out["sum_local_numel"] = strategy.all_reduce_sum(local)
    out["drift"] = replica_drift(strategy, trainer.model) if args.strategy == "ddp" else 0.0
    return out, trainer


def run_shared(args, strategy):
    """Actor + critic on one shared base, three PPO-like updates on one fixed global batch."""
    from frugal_rlhf.models.loading import load_model
    from frugal_rlhf.models.roles import Actor, Critic, SharedLM
    from frugal_rlhf.rl import losses as L

    hf, _ = load_model("tiny-llama", torch.float32)
    lm = SharedLM(hf)
    lm.add_adapter("actor", 4)
    lm.add_adapter("critic", 4)
    actor, critic = Actor(lm, "actor"), Critic(lm, "critic")
    # a zero head would give the critic adapter no gradient; own generator: task order must not matter
    critic.head.weight.data.normal_(std=0.1, generator=torch.Generator().manual_seed(5))
    # Plain SGD: a weight difference is then lr x the gradient difference, so the test can be tight.
    # (Adam's first steps move every weight by ~lr * sign(g): on a near-zero gradient, such as a
    # LoRA A whose B starts at zero, fp32 rounding alone flips the sign and moves it by ~lr.)
    ao = torch.optim.SGD(actor.trainable_parameters(), lr=SHARED_LR)
    co = torch.optim.SGD(critic.trainable_parameters(), lr=SHARED_LR)
    (actor, ao), (critic, co) = strategy.prepare((actor, ao), (critic, co))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (GLOBAL_BATCH, 24), generator=g)
    mask = torch.ones_like(ids)
    mine = slice(strategy.rank, None, strategy.world_size)
    ids, mask = ids[mine].to(strategy.device), mask[mine].to(strategy.device)
    n_global, losses, norms = GLOBAL_BATCH * 23, [], []
    for _ in range(3):
        logp, _ = actor(ids, mask)
        values = critic(ids, mask, 23)
        # Sums over this rank's rows / global count * world_size: averaged over ranks = global mean.
        a_loss = -logp.sum() / n_global * strategy.world_size
        c_loss = ((values - 1.0) ** 2).sum() / n_global * strategy.world_size
        strategy.backward(a_loss, actor, ao)
        strategy.backward(c_loss, critic, co)
        norms.append([strategy.optimizer_step(ao, 1.0, actor), strategy.optimizer_step(co, 1.0, critic)])
        losses.append(strategy.all_reduce_sum(float((a_loss + c_loss).detach())) / strategy.world_size)
    for name, role in (("actor", actor), ("critic", critic)):
        path = Path(args.out) / f"shared-{name}.safetensors"
        strategy.save_model(role, path)
    # PPO's advantage whitening with statistics over all ranks equals whitening the global batch.
    x = torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64)
    m = (torch.rand(GLOBAL_BATCH, 5, generator=g) > 0.3).float()
    err = float((L.masked_whiten(x[mine], m[mine], all_reduce=strategy.all_reduce) - L.masked_whiten(x, m)[mine])
                .abs().max())
    return {"loss": losses, "grad_norm": norms, "whiten_err": strategy.all_reduce_sum(err)}, (actor, critic)


def replica_drift(strategy, model) -> float:
    """Largest difference between this rank's trainable weights and rank 0's (0 = in sync)."""
    if strategy.world_size == 1:
        return 0.0
    import torch.distributed as dist

    mine = torch.cat([p.detach().reshape(-1).float() for p in strategy.unwrap(model).trainable_parameters()])
    first = mine.clone()
    dist.broadcast(first, src=0)
    return strategy.all_reduce_sum(float((mine - first).abs().max()))


def run_ppo(args, strategy):
    """A short PPO run with actor and critic on one shared base (letters reward, as in test_ppo)."""
    from frugal_rlhf.config import PPOConfig
    from frugal_rlhf.models.loading import load_model
    from frugal_rlhf.models.roles import Actor, Critic, SharedLM
    from frugal_rlhf.trainers.ppo import PPOTrainer

    hf, tok = load_model("tiny-llama", torch.float32)
    lm = SharedLM(hf)
    lm.add_adapter("actor", 4)
    lm.add_adapter("critic", 4)
    actor, critic, ref = Actor(lm, "actor"), Critic(lm, "critic"), Actor(lm, None)
    letters = torch.tensor([tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"])

    def letter_reward(seq, attn, prompt_length):  # fraction of response tokens that are letters
        resp, mask = seq[:, prompt_length:], attn[:, prompt_length:].float()
        return (torch.isin(resp, letters.to(resp.device)).float() * mask).sum(1) / mask.sum(1).clamp(min=1)

    # --greedy: deterministic rollouts and one mini-batch per rollout, so that 2 ranks x 4 rows
    # meet the single process's 8 rows exactly (sampling draws differ with the batch split).
    per_rank = 8 // strategy.world_size
    cfg = PPOConfig(model="tiny-llama", output=str(Path(args.out) / "ppo"), max_steps=args.steps, lora_rank=4,
                    rollout_batch_size=per_rank, batch_size=per_rank if args.greedy else per_rank // 2, lr=3e-3,
                    max_new_tokens=8, dtype="fp32", save_every=args.steps, eval_every=0, seed=7,
                    temperature=0.0 if args.greedy else 1.0, ppo_epochs=2)
    trainer = PPOTrainer(strategy, actor, critic, None, ref, config=cfg, tokenizer=tok, reward_fn=letter_reward,
                         prompts=[f"Write letters {i}" for i in range(64)])
    metrics = trainer.fit()
    for name in ("actor", "critic"):
        strategy.save_model(trainer.models[name], Path(args.out) / f"ppo-{name}.safetensors")
    out = {"reward": [m["reward"] for m in metrics if "reward" in m],
           "policy_loss": [m.get("policy_loss") for m in metrics if "reward" in m],
           "value_loss": [m.get("value_loss") for m in metrics if "reward" in m],
           "response_length": [m["response_length"] for m in metrics if "reward" in m],
           "drift": ([replica_drift(strategy, trainer.actor), replica_drift(strategy, trainer.critic)]
                     if args.strategy == "ddp" else [])}
    return out, trainer


def run_uneven(args, strategy):
    """Generation in which rank 0 stops after 1 token and rank 1 runs to 12, then one update:
    per-token gathers would leave rank 1 waiting for a rank that stopped (a hang)."""
    from frugal_rlhf.generation import SampleConfig, sample
    from frugal_rlhf.models.loading import load_model
    from frugal_rlhf.models.roles import Actor, SharedLM

    hf, tok = load_model("tiny-llama", torch.float32)
    lm = SharedLM(hf)
    lm.add_adapter("actor", 4)
    actor = Actor(lm, "actor")
    optim = torch.optim.SGD(actor.trainable_parameters(), lr=SHARED_LR)
    actor, optim = strategy.prepare((actor, optim))
    ids = torch.randint(3, 250, (4, 6), generator=torch.Generator().manual_seed(strategy.rank)).to(strategy.device)
    stop = tuple(range(len(tok))) if strategy.rank == 0 else ()  # rank 0: every token ends the answer
    with strategy.unsharded(actor), actor.lm.role(actor.adapter) as model:
        out = sample(model, ids, torch.ones_like(ids), SampleConfig(12, 1.0, eos_token_ids=stop),
                     torch.Generator().manual_seed(0))
    logp, _ = actor(out.sequences, out.attention_mask, out.action_mask.shape[1])
    strategy.backward(-(logp * out.action_mask).sum(), actor, optim)
    strategy.optimizer_step(optim, 1.0, actor)
    lengths = strategy.all_gather(torch.tensor([out.action_mask.shape[1]])).tolist()
    result = {"lengths": lengths}
    if hasattr(strategy, "local_numel"):  # resharded after generation: half the elements again
        result["local_numel"], result["full_numel"] = strategy.local_numel(actor)
    return result, actor


def run(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="naive")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--offload", default="none")
    p.add_argument("--tasks", default="sft")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora", type=int, default=0)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--load", default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--ckpt-format", default="full")
    p.add_argument("--optim", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    use_sgd(args)
    strategy = make_strategy(args.strategy, seed=7, dtype=args.dtype, zero_stage=args.stage, offload=args.offload)
    strategy.setup_distributed()
    result, keep = {"world_size": strategy.world_size}, []
    try:
        if args.load:
            from frugal_rlhf.models.roles import Actor

            actor = strategy.prepare(Actor("tiny-llama", lora_rank=args.lora, dtype="fp32"))
            strategy.load_model(actor, args.load)
            strategy.save_model(actor, Path(args.out) / "reloaded.safetensors")
            keep.append(actor)
        for task in args.tasks.split(","):
            set_seed(7)  # each task starts from the same random state, whichever ran before it
            if task == "resume":  # continue the sft run from its last checkpoint for 2 more steps
                result[task], model = run_supervised(args, strategy, "sft", resume=True)
            elif task == "ppo":
                result[task], model = run_ppo(args, strategy)
            elif task == "uneven":
                result[task], model = run_uneven(args, strategy)
            elif task == "shared":
                result[task], model = run_shared(args, strategy)
            else:
                result[task], model = run_supervised(args, strategy, task)
            keep.append(model)
        if strategy.is_rank0:
            (Path(args.out) / "result.json").write_text(json.dumps(result))
    finally:
        # DESIGN.md: barrier, drop the models, then destroy the process group (cleanup does both ends).
        strategy.barrier()
        keep.clear()
        gc.collect()
        strategy.cleanup()
    return result


if __name__ == "__main__":
    run()
