"""The OpenAI wire formats: chat vs completions choices and chunks, logprobs, usage, SSE."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from frugal_rlhf.serve.engine import Finished
from frugal_rlhf.serve.sampler import TokenLogprob


def usage(prompt_tokens: int, done: list[Finished]) -> dict:
    completion = sum(d.completion_tokens for d in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


@dataclass
class Choice:
    text: str = ""
    done: Finished | None = None
    logprobs: list[TokenLogprob] | None = None


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], clean_up_tokenization_spaces=False)


def _chat_logprobs(tokenizer, entries: list[TokenLogprob] | None) -> dict | None:
    if entries is None:
        return None

    def one(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def _completion_logprobs(tokenizer, entries: list[TokenLogprob] | None, offset: int) -> dict | None:
    """The legacy completions format; text_offset counts from `offset` over the tokens' texts."""
    if entries is None:
        return None
    tokens = [_token_text(tokenizer, e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


class Shape:
    """What differs between the chat and the completions wire formats."""

    def __init__(self, chat: bool, tokenizer, echo: str = ""):
        self.chat, self.tokenizer, self.echo = chat, tokenizer, echo

    def head(self, model: str) -> dict:
        return {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": model}

    def logprobs(self, entries, offset: int = 0) -> dict | None:
        if self.chat:
            return _chat_logprobs(self.tokenizer, entries)
        return _completion_logprobs(self.tokenizer, entries, offset)

    def chunk(self, index: int, text: str, finish: str | None, logprobs=None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def whole(self, index: int, c: Choice) -> dict:
        logprobs = self.logprobs(c.logprobs, len(self.echo))
        if not self.chat:
            return {"index": index, "text": self.echo + c.text, "logprobs": logprobs, "finish_reason": c.done.reason}
        return {"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                "finish_reason": c.done.reason}
