"""Unpaired feedback for KTO: {"prompt": [messages], "completion": str, "label": bool}.

Rows with a ``label`` column (true = a desirable answer) are read like SFT rows without it
(``prompt``/``completion``, ``messages``, ShareGPT, Alpaca...): the final assistant message is
the completion, everything before it the prompt. A file of preference pairs (any format the
reward model reads) gives two rows per pair: chosen desirable, rejected undesirable.
"""
from __future__ import annotations

import itertools
import logging

from .formats import load_dataset_file, normalize_row
from .readers import DataError, read_records

log = logging.getLogger("frugal_rlhf")


def _label(value) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV cells are strings
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise DataError(f"wrong type: expected true or false, got {value!r}", field="label")
    return value


def unpair(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
            for p in pairs for k in ("chosen", "rejected")]


def load_unpaired(spec, skip_bad_rows: bool = False, limit: int | None = None) -> list[dict]:
    records = list(itertools.islice(read_records(spec), limit))
    first = next((r for _, r in records if isinstance(r, dict)), {})
    if "label" not in first:
        return unpair(load_dataset_file(spec, "preference", skip_bad_rows, limit))
    rows, skipped = [], 0
    for number, record in records:
        try:
            if not isinstance(record, dict):
                raise DataError(f"expected a record (an object), got {type(record).__name__}")
            label = _label(record.get("label"))
            messages = normalize_row({k: v for k, v in record.items() if k != "label"}, "sft")["messages"]
        except DataError as e:
            error = DataError(e.reason, file=str(spec), row=number, field=e.field)
            if not skip_bad_rows:
                raise error from None
            skipped += 1
            log.warning("skipping bad row: %s", error)
            continue
        rows.append({"prompt": messages[:-1], "completion": messages[-1]["content"], "label": label})
    log.info("%s: %d unpaired rows (%d desirable)%s", spec, len(rows), sum(r["label"] for r in rows),
             f", skipped {skipped} bad rows" if skipped else "")
    return rows
