"""Offline preference optimization (DPO, cDPO, IPO, SimPO, ORPO; KTO on unpaired rows).

No reward model and no rollouts: the policy's log-likelihood of each answer, against the
reference's, is the implicit reward. Chosen and rejected sit in adjacent rows, their shared
prompt encoded once per pair (the reward model's PairCollator layout), and only answer
positions go through the LM head (SequenceScorer). The reference is the base with the
adapters off (LoRA: no second model), a frozen copy (full fine-tuning), or, with
precompute_ref, log-probs computed once before training and kept in the run directory.
The losses are the pure functions of rl.losses; this file only feeds them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from ..data.formats import load_dataset_file
from ..data.loader import LazyEncoded, split_rows
from ..data.tokenize import PairCollator, answer_length, answer_mask, attention, encode_prompt, encode_response, pad
from ..data.unpaired import load_unpaired, unpair
from ..models.sequence import SequenceScorer
from ..rl import losses as L
from ..rl.algorithms import PreferenceInputs, preference_loss
from ..rundir import atomic_write
from .reward import encode_pair
from .supervised import SupervisedTrainer

log = logging.getLogger("frugal_rlhf")

REF_FILE = "ref_logprobs.safetensors"


def encode_scored_pair(tokenizer, row, max_length: int) -> dict:
    """A pair as the reward model encodes it, plus each answer's token count and the cap on
    the shared prefix that leaves the prompt's last position (which predicts the first answer
    token) to each row."""
    enc = encode_pair(tokenizer, row, max_length)
    return {**enc, "max_shared": enc["max_shared"] - 1, "index": row["index"]}


def encode_unpaired(tokenizer, row, max_length: int) -> dict:
    n = answer_length(tokenizer, row["completion"], max_length)
    prompt_ids = encode_prompt(tokenizer, row["prompt"], max(max_length - n, max_length // 2))
    return {"ids": encode_response(tokenizer, prompt_ids, row["completion"], max_length), "answer": n,
            "label": row["label"], "index": row["index"]}


@dataclass
class ScoredCollator:
    """Pairs in adjacent rows (PairCollator) or unpaired rows (right-padded), with the mask of
    answer tokens and each sequence's number (`seq`: 2i, 2i+1 for pair i; i for row i)."""

    pad_id: int
    paired: bool = True
    share: bool = True

    def __call__(self, rows):
        if self.paired:
            batch = PairCollator(self.pad_id, self.share)(rows)
            seq = [2 * r["index"] + k for r in rows for k in (0, 1)]
        else:
            ids = [r["ids"] for r in rows]
            batch = {"input_ids": pad(ids, self.pad_id), "attention_mask": attention(ids), "shared": 0,
                     "label": torch.tensor([r["label"] for r in rows])}
            batch["answer_mask"] = answer_mask(batch["attention_mask"], [r["answer"] for r in rows])
            seq = [r["index"] for r in rows]
        batch["seq"] = torch.tensor(seq)
        return batch


class PreferenceTrainer(SupervisedTrainer):
    stage = "dpo"

    def __init__(self, strategy, config, policy: SequenceScorer | None = None, rows=None):
        self.algorithm = preference_loss(config.loss)  # what it needs (rl/algorithms.py)
        self.paired = self.algorithm.paired
        policy = policy or self.role_from_config(SequenceScorer, config)
        self.tokenizer = policy.tokenizer
        train_rows, eval_rows = self.load_rows(config, rows)
        log.info("%s: %d training %s, %d held out", config.loss, len(train_rows), "pairs" if self.paired else "rows",
                 len(eval_rows))
        # one numbering over both splits: a precomputed reference is one table
        train_rows = [{**r, "index": i} for i, r in enumerate(train_rows)]
        eval_rows = [{**r, "index": len(train_rows) + i} for i, r in enumerate(eval_rows)]
        encode = encode_scored_pair if self.paired else encode_unpaired
        encoded = [LazyEncoded(part, lambda row: encode(self.tokenizer, row, config.max_length))
                   for part in (train_rows, eval_rows)]
        collate = ScoredCollator(self.tokenizer.pad_token_id, self.paired, share=not config.gradient_checkpointing)
        super().__init__(strategy, config, policy, *encoded, collate)
        self.beta = config.beta if config.beta is not None else self.algorithm.beta
        self.smoothing = config.label_smoothing if config.label_smoothing is not None else self.algorithm.smoothing
        self.reference, self.ref_table = None, None
        if self.algorithm.reference:
            self.setup_reference(policy, encoded, collate)

    def load_rows(self, config, rows):
        if rows is None and not self.paired:
            rows = load_unpaired(config.data, config.skip_bad_rows, config.max_rows)
        elif rows is not None and not self.paired and "chosen" in rows[0]:
            rows = unpair(rows)
        elif rows is None:
            rows = load_dataset_file(config.data, "preference", config.skip_bad_rows, config.max_rows)
        return split_rows(rows, config.eval_split, config.max_eval_rows, config.seed)

    # ---- the reference --------------------------------------------------------------------------
    def setup_reference(self, policy, encoded, collate):
        cfg = self.config
        if cfg.precompute_ref:
            self.ref_table = self.precomputed_reference(encoded, collate)
        elif policy.adapter is not None:
            self.reference = self.strategy.prepare(SequenceScorer(policy.lm, None))  # the base, adapters off
        else:
            self.reference = self.strategy.prepare(SequenceScorer(cfg.model, dtype=cfg.dtype, trainable=False,
                                                                  trust_remote_code=cfg.trust_remote_code))

    @torch.no_grad()
    def precomputed_reference(self, encoded, collate) -> torch.Tensor:
        """Each sequence's reference log-prob, computed before the first update (the policy
        itself then: adapters off with LoRA, the untouched weights in full fine-tuning) and
        stored with the run, so a resumed run reads the same table."""
        path = self.out / REF_FILE
        n = sum(len(part) for part in encoded) * (2 if self.paired else 1)
        if path.exists():
            table = load_file(str(path))["ref_logprobs"]
            if table.numel() != n:
                raise ValueError(f"{path} holds {table.numel()} reference log-probs, this run has {n} sequences: "
                                 "it belongs to other data; delete it or use another --output")
            return table.to(self.strategy.device)
        if self.config.resume and self.checkpoints():
            raise ValueError(f"{path} is missing but {self.ckpt_root} has checkpoints: the reference cannot be "
                             "recomputed from an updated policy")
        policy = self.strategy.unwrap(self.model)
        scorer = SequenceScorer(policy.lm, None) if policy.adapter else self.model
        scorer.eval()
        table = torch.zeros(n)
        for part in encoded:
            for i in range(0, len(part), self.config.batch_size):
                batch = self.to_device(collate([part[j] for j in range(i, min(i + self.config.batch_size, len(part)))]))
                with self.strategy.autocast():
                    logp, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["answer_mask"], batch["shared"])
                table[batch["seq"].cpu()] = logp.float().cpu()
        if self.strategy.is_rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: save_file({"ref_logprobs": table.contiguous()}, tmp))
        log.info("%s: reference log-probs of %d sequences precomputed -> %s", self.config.loss, n, path)
        return table.to(self.strategy.device)

    def reference_logprobs(self, batch):
        if self.ref_table is not None:
            return self.ref_table[batch["seq"]]
        self.reference.eval()
        with torch.no_grad():
            return self.reference(batch["input_ids"], batch["attention_mask"], batch["answer_mask"],
                                  batch["shared"])[0].float()

    # ---- the loss --------------------------------------------------------------------------------
    def weight(self, batch):
        return batch["seq"].shape[0] // (2 if self.paired else 1)

    def loss_sum(self, batch):
        logp, n = self.model(batch["input_ids"], batch["attention_mask"], batch["answer_mask"], batch["shared"])
        logp = logp.float()
        ref = self.reference_logprobs(batch) if self.algorithm.reference else None
        if not self.paired:
            return self.kto_loss_sum(logp, ref, batch["label"])
        cfg, c, r = self.config, slice(0, None, 2), slice(1, None, 2)
        loss, rc, rr = self.algorithm.compute(PreferenceInputs(logp, logp / n.clamp(min=1), ref, self.beta,
                                                               self.smoothing, cfg.simpo_gamma, cfg.orpo_lambda))
        stats = {"accuracy": (rc > rr).float().sum(), "margin": (rc - rr).sum(), "chosen_reward": rc.sum(),
                 "rejected_reward": rr.sum(), "chosen_logp": logp[c].detach().sum(),
                 "rejected_logp": logp[r].detach().sum()}
        return loss.sum(), loss.shape[0], stats

    def kto_loss_sum(self, logp, ref, label):
        """The reference point z: the batch's mean log-ratio (over every rank), detached and
        clamped at 0, an estimate of KL(policy || reference) from the answers at hand (the KTO
        paper pairs each prompt with another row's answer for it, at the cost of another forward)."""
        ratio = (logp - ref).detach()
        total, count = float(ratio.sum()), ratio.numel()
        if self.model.training:  # held-out batches may differ in number between ranks: no collective there
            total, count = self.strategy.all_reduce_sum(total), self.strategy.all_reduce_sum(count)
        z = max(0.0, total / count)
        loss, reward = L.kto_loss(logp, ref, label, z, self.beta, self.config.desirable_weight,
                                  self.config.undesirable_weight)
        # Accuracy: the fraction of (desirable, undesirable) rows of the batch whose rewards are in
        # the right order, the paired accuracy's unpaired form (a batch lacking one side: chance).
        # The sign of a reward alone says little: undesirable answers pushed down drag similar
        # desirable ones below 0 while keeping them above.
        d, u = reward[label.bool()], reward[~label.bool()]
        ranked = (d[:, None] > u[None, :]).float().mean() if d.numel() and u.numel() else torch.tensor(0.5)
        sign = label.float() * 2 - 1
        stats = {"accuracy": ranked * reward.numel(), "margin": (reward * sign).sum(),
                 "kl": torch.tensor(z * ratio.numel())}
        return loss.sum(), loss.shape[0], stats

    def finish(self):
        if self.strategy.is_rank0:
            final = self.run.read_metrics()[-1]  # the loop evaluated at the last step
            self.run.write_json("eval.json", {"loss": self.config.loss, "accuracy": final.get("eval_accuracy"),
                                              "margin": final.get("eval_margin"), "eval_loss": final.get("eval_loss"),
                                              "n_held_out": len(self.eval_loader.dataset) if self.eval_loader else 0})
            self.run.plot(["loss", "accuracy", "eval_accuracy", "margin"], "dpo.png", self.config.loss.upper())
            self.export_policy(self.config.loss.upper())

    def policy(self):
        return self.strategy.unwrap(self.model)
