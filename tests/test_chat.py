"""`frugal chat` driven like a person at a terminal (pexpect)."""
from __future__ import annotations

import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed (pip install -e '.[dev]')")

TIMEOUT = 60  # first start imports torch and transformers


def _spawn(*args):
    child = pexpect.spawn(sys.executable, ["-m", "frugal_rlhf.cli", "chat", "tiny-llama", "--max-new-tokens", "12",
                                           "--dtype", "fp32", *args],
                          encoding="utf-8", timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"})
    child.expect_exact("you> ")
    return child


def test_chat_streams_answers_resets_and_exits():
    child = _spawn("--seed", "0", "--system", "You are terse.")
    try:
        child.sendline("What is two plus two?")
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")  # the answer streamed out and the next prompt came back
        assert child.before.strip() != ""
        child.sendline("And three?")  # a second turn, with history
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_leaves_cleanly_on_eof():
    child = _spawn()
    try:
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_prompt_keeps_history_and_drops_oldest_turns_when_too_long():
    from frugal_rlhf.app.chat import _prompt_ids
    from frugal_rlhf.models.loading import load_model

    _, tokenizer = load_model("tiny-llama")
    system = [{"role": "system", "content": "S"}]
    turns = [{"role": "user", "content": "first " * 20}, {"role": "assistant", "content": "one"},
             {"role": "user", "content": "second"}]
    full = tokenizer.decode(_prompt_ids(tokenizer, system + turns, 10_000))
    assert "first" in full and "second" in full and full.endswith("<|im_start|>assistant\n")
    short = tokenizer.decode(_prompt_ids(tokenizer, system + turns, 80))
    assert "first" not in short and "second" in short and "S<|im_end|>" in short  # system prompt kept
    assert _prompt_ids(tokenizer, system + [{"role": "user", "content": "x" * 200}], 80) is None
