"""Rows to batches: lazy encoding, the deterministic held-out split, and the resumable loader
whose position a checkpoint saves (placement-free: a strategy only tells it its rank)."""
from __future__ import annotations

import torch


class LazyEncoded:
    """A list of raw rows encoded on first access: a 50-step run on a 17k-row dataset only
    pays for the rows it sees."""

    def __init__(self, rows, encode):
        self.rows, self.encode, self.cache = rows, encode, {}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if i not in self.cache:
            self.cache[i] = self.encode(self.rows[i])
        return self.cache[i]


def split_rows(rows, eval_split: float, max_eval_rows: int, seed: int):
    """Deterministic held-out split (the same rows for every run with the same seed)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max_eval_rows, int(len(rows) * eval_split)) if eval_split > 0 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


class ResumableLoader:
    """Endless shuffled batches whose position (epoch, batch) is saved and restored exactly.

    Each epoch's order comes from (seed, epoch), so a resumed run sees the same batches as an
    uninterrupted one. With several ranks, every global batch is split between them. With
    `accum` micro-batches per optimizer step, an epoch ends on a whole step: batch b x accum a
    then sees exactly the rows of batch b*a x accum 1, across epochs too (the memory planner
    relies on it).
    """

    def __init__(self, dataset, batch_size: int, collate_fn, shuffle=True, seed=0, rank=0, world_size=1,
                 drop_last=True, accum: int = 1):
        if len(dataset) < batch_size * world_size * accum and drop_last:
            raise ValueError(f"the data has {len(dataset)} rows, fewer than one global batch "
                             f"({batch_size * world_size * accum}); lower the batch size or add data")
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last, self.accum = drop_last, accum
        self.epoch, self.index = 0, 0

    @property
    def global_batch(self):
        return self.batch_size * self.world_size

    def batches_per_epoch(self):
        n = len(self.dataset)
        return n // (self.global_batch * self.accum) * self.accum if self.drop_last else -(-n // self.global_batch)

    def _order(self):
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def next_batch(self):
        if self.index >= self.batches_per_epoch():
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
        start = self.index * self.global_batch
        mine = order[start:start + self.global_batch][self.rank::self.world_size]
        self.index += 1
        return self.collate_fn([self.dataset[i] for i in mine])

    def __iter__(self):
        for _ in range(self.batches_per_epoch()):  # one epoch from the current position
            yield self.next_batch()

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
