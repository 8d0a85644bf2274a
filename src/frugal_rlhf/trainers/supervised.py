"""Trainers with a fixed dataset and a differentiable loss: SFT (and the reward model).

Gradient accumulation is exact: every micro-batch's summed loss is divided by the weight
(answer tokens, or pairs) of the whole accumulated batch, so k micro-batches of n equal one
batch of k*n. (A mean per micro-batch, then a mean of means, silently over-weights short
sequences; that was a real bug in a peer.)
"""
from __future__ import annotations

import logging
import time

import torch

from ..data.formats import load_dataset_file
from ..data.loader import LazyEncoded, split_rows
from ..data.tokenize import IGNORE, SFTCollator, TruncationStats, encode_conversation, pack
from ..models.roles import Actor
from .base import Trainer, make_optimizer, make_scheduler

log = logging.getLogger("frugal_rlhf")


class SupervisedTrainer(Trainer):
    """Subclasses implement `loss_sum(batch) -> (summed loss, weight, {stat: summed value})`."""

    # The held-out loss before any update: what "the loss falls" is measured against (single
    # training steps vary more between batches than a short run moves the loss).
    evaluate_at_start = True

    def __init__(self, strategy, config, model, train_set, eval_set, collate):
        super().__init__(strategy, config)
        self.model = model
        self.checkpoint_activations(model)
        optim = make_optimizer(self.param_groups(model), config.learning_rate(), config.weight_decay)
        self.scheduler = make_scheduler(optim, config)
        self.model, self.optim = strategy.prepare((model, optim))
        self.loader = strategy.setup_dataloader(train_set, config.batch_size, collate, accum=config.grad_accum)
        self.eval_loader = (strategy.setup_dataloader(eval_set, config.batch_size, collate, shuffle=False,
                                                      drop_last=False) if len(eval_set) else None)
        self.models = {"model": self.model}
        self.optimizers = {"model": self.optim}
        self.stateful = {"scheduler": self.scheduler, "loader": self.loader}

    def param_groups(self, model):
        return model.trainable_parameters()

    @staticmethod
    def role_from_config(role_cls, config, **role_settings):
        return role_cls(config.model, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                        lora_targets=config.lora_targets, dtype=config.dtype,
                        trust_remote_code=config.trust_remote_code, quantize=config.quantize_base,
                        **role_settings)

    @staticmethod
    def load_split(config, rows, kind: str):
        """(train, held-out) rows: given rows, or config.data read as `kind`."""
        if rows is None:
            rows = load_dataset_file(config.data, kind, config.skip_bad_rows, config.max_rows)
        return split_rows(rows, config.eval_split, config.max_eval_rows, config.seed)

    def train_step(self, step):
        self.model.train()
        batches = [self.to_device(self.loader.next_batch()) for _ in range(self.config.grad_accum)]
        total_weight = self.strategy.all_reduce_sum(sum(float(self.weight(b)) for b in batches))
        loss_total, stats, tokens, encoded = 0.0, {}, 0, 0
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            with self.strategy.autocast():
                loss_sum, _, batch_stats = self.loss_sum(batch)
            loss = loss_sum / total_weight * self.strategy.world_size  # DDP averages over ranks
            self.strategy.backward(loss, self.model, self.optim, last=i == len(batches) - 1)
            loss_total += float(loss_sum.detach())
            real = int((batch["attention_mask"] > 0).sum())
            tokens += real
            encoded += batch.get("encoded", real)  # fewer when a shared prompt is encoded once
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        loss = self.strategy.all_reduce_sum(loss_total) / total_weight  # the global loss: every rank decides alike
        grad_norm = self.optimizer_step(self.optim, self.model, loss)
        self.scheduler.step()
        elapsed = time.perf_counter() - t0
        tokens = self.strategy.all_reduce_sum(tokens)
        out = {"loss": loss, "grad_norm": grad_norm,
               "lr": self.scheduler.get_last_lr()[0],
               "tokens": tokens, "encoded_tokens": self.strategy.all_reduce_sum(encoded),
               "sequences": self.strategy.all_reduce_sum(
                   sum(int(b["attention_mask"].amax(-1).sum()) for b in batches)),  # packed rows count each
               "tokens_per_s": tokens / elapsed}
        out.update({k: self.strategy.all_reduce_sum(v) / total_weight for k, v in stats.items()})
        return out

    @torch.no_grad()
    def evaluate(self):
        if self.eval_loader is None:
            return {}
        self.model.eval()
        self.eval_loader.load_state_dict({"epoch": 0, "index": 0})
        loss, weight, stats = 0.0, 0.0, {}
        for batch in self.eval_loader:
            with self.strategy.autocast():
                loss_sum, w, batch_stats = self.loss_sum(self.to_device(batch))
            loss, weight = loss + float(loss_sum), weight + float(w)
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        weight = self.strategy.all_reduce_sum(weight)
        out = {"eval_loss": self.strategy.all_reduce_sum(loss) / weight}
        out.update({f"eval_{k}": self.strategy.all_reduce_sum(v) / weight for k, v in stats.items()})
        return out


@torch.no_grad()
def check_packing(actor: Actor):
    """Refuse packing on a model whose forward ignores per-sequence positions or a 4D mask
    (e.g. BLOOM's ALiBi): packed sequences there would silently attend to each other."""
    a, b = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    device = next(actor.parameters()).device

    def logp(ids, mask, packed=False):
        return actor(torch.tensor([ids], device=device), torch.tensor([mask], device=device), packed=packed)[0][0]

    try:
        packed = logp(a + b, [1] * len(a) + [2] * len(b), packed=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing: no packing here
        raise ValueError(f"--packing: this model ({type(actor.lm.hf_model()).__name__}) does not take packed "
                         f"rows ({e}); train without --packing") from e
    alone = torch.cat([logp(a, [1] * len(a)), logp(b, [1] * len(b))])
    keep = torch.ones(len(a) + len(b) - 1, dtype=torch.bool)
    keep[len(a) - 1] = False  # the boundary token is predicted across sequences: not compared
    atol = 1e-3 if packed.dtype == torch.float32 else 5e-2  # mixing sequences moves log-probs by ~1 or more
    if not torch.allclose(packed[keep].float().cpu(), alone.float().cpu(), atol=atol):
        raise ValueError(f"--packing: packed sequences of {type(actor.lm.hf_model()).__name__} see each other "
                         "(its attention ignores per-sequence positions or the block mask); train without --packing")


class SFTTrainer(SupervisedTrainer):
    """Causal-LM loss on the assistant tokens only."""

    stage = "sft"

    def __init__(self, strategy, config, actor: Actor | None = None, rows=None):
        actor = actor or self.role_from_config(Actor, config)
        self.tokenizer = actor.tokenizer
        train_rows, eval_rows = self.load_split(config, rows, "sft")
        self.truncation = TruncationStats()
        encode = lambda row: encode_conversation(self.tokenizer, row["messages"], config.max_length,  # noqa: E731
                                                 self.truncation)
        log.info("sft: %d training rows, %d held out", len(train_rows), len(eval_rows))
        train_set = LazyEncoded(train_rows, encode)
        if config.packing:
            check_packing(actor)
            train_set = pack([encode(r) for r in train_rows], config.max_length, config.seed)
            log.info("packing: %d conversations in %d rows of up to %d tokens (%.0f%% filled)", len(train_rows),
                     len(train_set), config.max_length,
                     100 * sum(len(r["input_ids"]) for r in train_set) / (len(train_set) * config.max_length))
        super().__init__(strategy, config, actor, train_set, LazyEncoded(eval_rows, encode),
                         SFTCollator(self.tokenizer.pad_token_id))

    def weight(self, batch):
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss_sum(self, batch):
        logp, _ = self.model(batch["input_ids"], batch["attention_mask"], packed=batch["packed"])
        mask = (batch["labels"][:, 1:] != IGNORE).float()
        return -(logp * mask).sum(), mask.sum(), {}

    def finish(self):
        if self.truncation.prompt_truncated or self.truncation.answer_truncated:
            log.info("truncation: %d prompts cut on the left, %d answers cut at the end (max_length=%d)",
                     self.truncation.prompt_truncated, self.truncation.answer_truncated, self.config.max_length)
        if self.strategy.is_rank0:
            self.run.plot(["loss", "eval_loss", "tokens_per_s"], "loss.png", "SFT")
            self.export_policy("SFT")

    def policy(self):
        return self.strategy.unwrap(self.model)

