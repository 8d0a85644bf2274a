"""Rewards from the command line: verifiable (program) rewards and the reward model, weighted.

A spec is ``KIND[:ARG][=WEIGHT]`` (the weight is the text after the last ``=`` when it is a
number; default 1.0):

* ``rm:PATH``                 the reward model trained by `frugal rm` (scored by the trainer)
* ``math`` / ``math:strict``  1 if the final number equals the row's reference answer, else 0.
  Lenient (``math``, ``math:lenient``): the last number in the response. Strict: the response
  must state the answer in a recognised form (just the number; ``#### N``; ``Answer: N`` or
  ``the answer is N`` at the end; ``\\boxed{N}``; ``<answer>N</answer>``)
* ``format:REGEX``            1 if REGEX matches the response anywhere (``re.DOTALL``), else 0
* ``length:TARGET``           1 - |tokens - TARGET| / TARGET, floored at 0
* ``python:pkg.module:fn``    ``fn(prompts, completions, rows) -> [B] numbers``: prompts are the
  last user messages, completions the decoded responses, rows the data rows (``prompt``
  messages, ``reference``, ``answer`` and so on)

Specs are checked when parsed (unknown kind, bad regex, missing module or function, missing
reward model, a weight that is not a finite number), before any model is loaded. Each
component's raw value is logged as ``reward_<name>``; the score is the weighted sum.

A program reward runs in a worker thread with a time limit (``--reward-timeout``, in the
probe before training as in every step): a call that hangs, calls ``sys.exit`` or raises
stops the run with one line naming the reward (and the row, when one row alone fails).
"""
from __future__ import annotations

import importlib
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?"
_STRICT = [re.compile(p, re.S | re.I) for p in (
    rf"^\s*({NUMBER})\s*\.?\s*$",                                   # just the number
    rf"(?:####|answer\s*(?:is)?\s*:?)\s*\$?\s*({NUMBER})\s*\.?\s*$",  # ... #### N / Answer: N / the answer is N
    rf"\\boxed\{{\s*({NUMBER})\s*\}}",
    rf"<answer>\s*({NUMBER})\s*</answer>",
)]


class RewardError(ValueError):
    """A bad reward spec, or a reward function that failed or returned bad values."""


def parse_number(text) -> float | None:
    """'1,234' -> 1234.0; None when text is not a number."""
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None


def final_answer(text: str, strict: bool) -> float | None:
    """The number a response gives as its answer (see the module doc), or None."""
    if strict:
        for pattern in _STRICT:
            found = list(pattern.finditer(text))
            if found:
                return parse_number(found[-1].group(1))
        return None
    numbers = re.findall(NUMBER, text)
    return parse_number(numbers[-1]) if numbers else None


def answers_match(given: float | None, reference) -> bool:
    ref = parse_number(reference) if reference is not None else None
    if given is None or ref is None:
        return False
    return abs(given - ref) <= 1e-6 * max(1.0, abs(ref))


@dataclass
class Component:
    name: str                  # the metric is reward_<name>
    kind: str                  # rm | math | format | length | python
    weight: float
    fn: Callable | None = None  # (prompts, completions, rows, lengths) -> list of numbers; None for rm
    arg: str | None = None


def _math(strict: bool):
    def reward(prompts, completions, rows, lengths):
        return [float(answers_match(final_answer(c, strict), r.get("answer"))) for c, r in zip(completions, rows)]
    return reward


def _format(pattern: re.Pattern):
    return lambda prompts, completions, rows, lengths: [float(bool(pattern.search(c))) for c in completions]


def _length(target: int):
    return lambda prompts, completions, rows, lengths: [max(0.0, 1.0 - abs(n - target) / target) for n in lengths]


def _python(path: str):
    module, _, name = path.rpartition(":")
    if not module or not name:
        raise RewardError(f"reward python:{path}: expected python:package.module:function")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
        raise RewardError(f"reward python:{path}: {module!r} is not a module path (package.module, no relative "
                          "imports)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise RewardError(f"reward python:{path}: cannot import module {module!r} ({e})") from None
    except AttributeError:
        raise RewardError(f"reward python:{path}: module {module!r} has no function {name!r}") from None
    except BaseException as e:  # noqa: BLE001 - the module's own code failed (or exited) at import
        raise RewardError(f"reward python:{path}: importing {module!r} raised {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise RewardError(f"reward python:{path}: {name!r} is not callable")
    return lambda prompts, completions, rows, lengths: fn(prompts, completions, rows)


def parse_reward(spec: str) -> Component:
    """One spec -> Component; raises RewardError (one line) on anything wrong with it."""
    body, weight = spec, 1.0
    head, sep, tail = spec.rpartition("=")
    if sep and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", tail.strip(), re.I):
        body, weight = head, float(tail)
        if not math.isfinite(weight):
            raise RewardError(f"reward {spec!r}: the weight {tail.strip()} is not a finite number")
    kind, _, arg = body.partition(":")
    kind = kind.strip().lower()
    if kind == "rm":
        if not arg or not Path(arg).is_dir():
            raise RewardError(f"reward {spec!r}: rm:PATH needs a reward-model directory (from `frugal rm`)")
        return Component("rm", kind, weight, None, arg)
    if kind == "math":
        if arg not in ("", "strict", "lenient"):
            raise RewardError(f"reward {spec!r}: math takes :strict or :lenient, not {arg!r}")
        strict = arg == "strict"
        return Component("math_strict" if strict else "math", kind, weight, _math(strict), arg or "lenient")
    if kind == "format":
        if not arg:
            raise RewardError(f"reward {spec!r}: format:REGEX needs a regular expression")
        try:
            pattern = re.compile(arg, re.S)
        except re.error as e:
            raise RewardError(f"reward {spec!r}: bad regular expression ({e})") from None
        return Component("format", kind, weight, _format(pattern), arg)
    if kind == "length":
        if not arg.isdigit() or int(arg) < 1:
            raise RewardError(f"reward {spec!r}: length:TARGET needs a positive number of tokens")
        return Component("length", kind, weight, _length(int(arg)), arg)
    if kind == "python":
        return Component(arg.rpartition(":")[2] or "python", kind, weight, _python(arg), arg)
    raise RewardError(f"unknown reward {spec!r}: expected rm:PATH, math[:strict], format:REGEX, length:TARGET or "
                      "python:module:function, each optionally =WEIGHT")


class RewardSet:
    """Weighted reward components parsed from specs; see the module doc."""

    def __init__(self, specs, timeout: float = 60.0):
        self.timeout = timeout  # seconds one call of a program reward may take
        if isinstance(specs, str):
            specs = [specs]
        if not specs:
            raise RewardError("no reward given: pass --reward (e.g. --reward math) or --reward-model")
        self.components = [parse_reward(s) for s in specs]
        seen = {}
        for c in self.components:  # two components of one kind get distinct metric names
            seen[c.name] = seen.get(c.name, 0) + 1
            if seen[c.name] > 1:
                c.name = f"{c.name}{seen[c.name]}"
        models = [c for c in self.components if c.kind == "rm"]
        if len(models) > 1:
            raise RewardError("at most one rm: reward (the trainer holds one reward model)")
        self.model_path = models[0].arg if models else None

    @property
    def needs_answer(self) -> bool:
        return any(c.kind == "math" for c in self.components)

    def check_rows(self, rows, source: str = "prompts"):
        """A math reward needs every row's reference answer: say which row lacks it, before training."""
        if not self.needs_answer:
            return
        for i, row in enumerate(rows, 1):
            if parse_number(row.get("answer")) is None:
                raise RewardError(f"{source}: row {i}: field 'answer': the math reward needs a numeric reference "
                                  f"answer ({{'prompt', 'answer'}} rows or GSM8K's question/answer '#### N')")

    def probe(self, rows):
        """Call every program reward once on a few rows, their references as completions: a
        function with the wrong shape or a NaN fails here, before any model is loaded."""
        rows = list(rows)[:2]
        if rows:
            completions = [r.get("reference") or "" for r in rows]
            self(prompt_texts(rows), completions, rows, [len(c.split()) for c in completions], model_scores=None,
                 probe=True)

    def __call__(self, prompts, completions, rows, lengths, model_scores=None, probe=False):
        """-> (total [B] float tensor, {"reward_<name>": [B] tensor}) of the raw components."""
        parts = {}
        for c in self.components:
            if c.kind == "rm":
                if probe:
                    continue
                values = model_scores.float().cpu()
            else:
                values = _checked(c, _call(c, self.timeout, prompts, completions, rows, lengths), prompts,
                                  completions)
            parts[f"reward_{c.name}"] = values
        total = sum(c.weight * parts[f"reward_{c.name}"] for c in self.components if f"reward_{c.name}" in parts)
        return (total if torch.is_tensor(total) else torch.zeros(len(completions))), parts


def prompt_texts(rows) -> list[str]:
    """The last user message of each row's prompt (what a reward function reads as 'the prompt')."""
    return [r["prompt"][-1]["content"] if isinstance(r.get("prompt"), list) else str(r.get("prompt")) for r in rows]


def _where(i, prompts, completions) -> str:
    return f"row {i} of the batch (prompt {_short(prompts[i])}, completion {_short(completions[i])})"


def _short(text, n=80) -> str:
    text = str(text)
    return repr(text if len(text) <= n else text[:n] + "...")


def _call(c: Component, timeout: float, prompts, completions, rows, lengths):
    try:
        return _within(timeout, c, prompts, completions, rows, lengths)
    except RewardError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - find the row it fails on, for the message
        for i in range(len(completions)):
            try:
                _within(timeout, c, prompts[i:i + 1], completions[i:i + 1], rows[i:i + 1], lengths[i:i + 1])
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001
                raise RewardError(f"reward {c.name} raised {type(e).__name__}: {e} on "
                                  f"{_where(i, prompts, completions)}") from e
        raise RewardError(f"reward {c.name} raised {type(batch_error).__name__}: {batch_error} on a batch of "
                          f"{len(completions)} completions (on none of them alone)") from batch_error


def _within(timeout: float, c: Component, *args):
    """c.fn(*args) in a worker thread, waited for at most `timeout` seconds. A thread cannot be
    stopped: one that hangs is left behind (a daemon) and the run ends with the error."""
    box = {}

    def call():
        try:
            box["value"] = c.fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=call, name=f"reward-{c.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(f"reward {c.name} did not return within {timeout:g} s on {len(args[1])} completions "
                          "(--reward-timeout)")
    error = box.get("error")
    if isinstance(error, SystemExit):
        raise RewardError(f"reward {c.name} called sys.exit({error.code!r}): a reward function must return one "
                          "number per completion")
    if error is not None and not isinstance(error, Exception):
        raise RewardError(f"reward {c.name} raised {type(error).__name__}") from error
    if error is not None:
        raise error
    return box["value"]


def _checked(c: Component, values, prompts, completions) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float32).cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise RewardError(f"reward {c.name} returned {type(values).__name__}, not a list of numbers ({e})") from None
    if t.shape != (len(completions),):
        raise RewardError(f"reward {c.name} returned shape {tuple(t.shape)} for {len(completions)} completions; "
                          f"expected one number per completion")
    bad = (~torch.isfinite(t)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"reward {c.name} returned {float(t[i])} on {_where(i, prompts, completions)}")
    return t
