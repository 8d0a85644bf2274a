"""Reward-model training from ranked pairs: -log sigmoid(r_chosen - r_rejected [- margin]).

Chosen and rejected of a batch go through the model in one forward pass, in adjacent rows
whose shared prompt is encoded once per pair when that saves work (PairCollator).
Pairs are formatted exactly as PPO will score them: the prompt through the chat template
with the generation prompt, then the answer tokens and the end-of-turn token.
"""
from __future__ import annotations

import logging

import torch

from ..data.loader import LazyEncoded
from ..data.tokenize import PairCollator, answer_length, encode_prompt, encode_response
from ..models.reward_io import save_reward_model
from ..models.roles import RewardModel
from ..rl.losses import pairwise_loss
from .base import batch_to
from .supervised import SupervisedTrainer

log = logging.getLogger("frugal_rlhf")


def encode_pair(tokenizer, row, max_length: int):
    """Both answers after the same prompt, cut on the left to the room the longer answer leaves
    (a long conversation before short answers keeps its context); with answers longer than
    half of max_length the prompt keeps half and encode_response cuts it further per answer.
    `answer` counts each side's answer tokens; `max_shared` keeps them out of the prefix the
    two rows share (a mean-pooled reward model reads every answer token of each row)."""
    answer = [answer_length(tokenizer, row[k], max_length) for k in ("chosen", "rejected")]
    prompt_ids = encode_prompt(tokenizer, row["prompt"], max(max_length - max(answer), max_length // 2))
    enc = {k: encode_response(tokenizer, prompt_ids, row[k], max_length) for k in ("chosen", "rejected")}
    prompt = min(len(enc["chosen"]) - answer[0], len(enc["rejected"]) - answer[1])
    return {**enc, "margin": row.get("margin"), "answer": answer, "max_shared": prompt}


class RewardTrainer(SupervisedTrainer):
    stage = "rm"

    def __init__(self, strategy, config, reward_model: RewardModel | None = None, rows=None):
        rm = reward_model or self.role_from_config(RewardModel, config, pooling=config.pooling)
        self.tokenizer = rm.tokenizer
        train_rows, eval_rows = self.load_split(config, rows, "preference")
        log.info("rm: %d training pairs, %d held out", len(train_rows), len(eval_rows))
        encode = lambda row: encode_pair(self.tokenizer, row, config.max_length)  # noqa: E731
        super().__init__(strategy, config, rm, LazyEncoded(train_rows, encode), LazyEncoded(eval_rows, encode),
                         PairCollator(self.tokenizer.pad_token_id, share=not config.gradient_checkpointing))

    def param_groups(self, model):
        """With head_lr, the score head in a group of its own: a fresh linear layer on ~100 pairs
        barely leaves its random start at the adapter's lr (Adam moves each weight ~lr a step),
        so the adapter bends the features toward a random direction instead."""
        params = model.trainable_parameters()
        if self.config.head_lr is None:
            return params
        head = {id(p) for p in model.head.parameters()}
        return [{"params": [p for p in params if id(p) not in head]},
                {"params": [p for p in params if id(p) in head], "lr": self.config.head_lr}]

    def weight(self, batch):
        return batch["margin"].shape[0]

    def loss_sum(self, batch):
        scores = pair_scores(self.model, batch)
        n = batch["margin"].shape[0]
        loss, stats = pairwise_loss(scores[0::2], scores[1::2], batch["margin"], variant=self.config.loss,
                                    center_coef=self.config.center_coef)
        return loss * n, n, {"accuracy": stats["accuracy"] * n, "margin": stats["margin"] * n}

    def finish(self):
        if self.strategy.is_rank0:
            final_eval = self.run.read_metrics()[-1]  # the loop evaluated at the last step
            model = self.strategy.unwrap(self.model)
            save_reward_model(model, self.tokenizer, self.out, base=self.config.model)
            write_eval(self.run, final_eval, len(self.eval_loader.dataset) if self.eval_loader else 0)
            self.run.plot(["loss", "accuracy", "eval_accuracy", "eval_margin"], "reward.png", "Reward model")


def pair_scores(rm, batch):
    """Scores of a PairCollator batch: chosen at even rows, rejected at odd rows."""
    return rm(batch["input_ids"], batch["attention_mask"], shared_prefix=(2, batch["shared"]),
              answer_mask=batch["answer_mask"]).float()


def write_eval(run, metrics: dict, n_pairs: int) -> dict:
    result = {"accuracy": metrics.get("eval_accuracy"), "mean_margin": metrics.get("eval_margin"),
              "loss": metrics.get("eval_loss"), "n_pairs": n_pairs}
    run.write_json("eval.json", result)
    return result


@torch.no_grad()
def evaluate_reward_model(rm: RewardModel, rows, max_length: int = 512, batch_size: int = 8) -> dict:
    """Held-out pairwise accuracy and mean margin of an existing reward model."""
    tok = rm.tokenizer
    device = next(rm.parameters()).device
    collate = PairCollator(tok.pad_token_id)
    correct, margin_sum = 0.0, 0.0
    rm.eval()
    for i in range(0, len(rows), batch_size):
        batch = collate([encode_pair(tok, r, max_length) for r in rows[i:i + batch_size]])
        scores = pair_scores(rm, batch_to(batch, device))
        correct += float((scores[0::2] > scores[1::2]).sum())
        margin_sum += float((scores[0::2] - scores[1::2]).sum())
    return {"accuracy": correct / max(1, len(rows)), "mean_margin": margin_sum / max(1, len(rows)),
            "n_pairs": len(rows)}
