"""`frugal chat MODEL`: a terminal chat with any model spec.

Tokens are printed as they are sampled; the conversation is kept as a message list and
formatted with the tokenizer's chat template each turn. Commands: /reset, /exit (or EOF).
Ctrl-C during an answer stops that answer; Ctrl-C at the prompt leaves.
"""
from __future__ import annotations

import argparse
import re
import sys

import torch

from frugal_rlhf.data.tokenize import stop_tokens
from frugal_rlhf.generation import SampleConfig, sample
from frugal_rlhf.serve.command import load_for_inference
from frugal_rlhf.serve.tokens import IncrementalDecoder, context_length

PROMPT = "you> "
ANSWER = "assistant> "
# C0 control characters other than tab/newline: a model must not be able to drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def add_chat_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default="default",
                        help="model spec: default, tiny-llama, a HF directory, a .gguf file or a PEFT adapter")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: among the likeliest tokens "
                        "holding this probability; 1 = off")
    parser.add_argument("--system", default=None, help="system prompt at the start of the conversation")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable answers; unset: random")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="compute dtype: auto = bf16 where the device runs it fast, else fp32")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the model (only for a model you trust)")
    return parser


def _prompt_ids(tokenizer, messages: list[dict], budget: int) -> list[int] | None:
    """Template the conversation; drop the oldest turns (never the system prompt) until it fits."""
    messages = list(messages)
    while True:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return ids
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None  # the latest message alone does not fit
        del messages[first]


def _answer(model, tokenizer, ids: list[int], args, generator, out) -> str:
    """Sample one answer, printing it as it streams; returns the full text."""
    eos = stop_tokens(tokenizer, model)
    config = SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id or 0)
    decoder, parts = IncrementalDecoder(tokenizer), []

    def show(text: str) -> None:
        parts.append(text)
        out.write(_CONTROL.sub("", text))
        out.flush()

    def on_step(tokens, finished) -> bool:
        token = int(tokens[0])
        if token not in eos:
            show(decoder.push(token))
        return True

    device = next(model.parameters()).device
    try:
        sample(model, torch.tensor([ids], device=device), torch.ones(1, len(ids), dtype=torch.long, device=device),
               config, generator=generator, on_step=on_step)
    finally:  # also on Ctrl-C: keep what was printed
        show(decoder.flush())
        out.write("\n")
    return "".join(parts)


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def chat_loop(model, tokenizer, args, out=sys.stdout) -> int:
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    budget = context_length(model, tokenizer) - args.max_new_tokens
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    print("Type a message. /reset clears the conversation, /exit leaves.", file=out, flush=True)
    while (line := _read(PROMPT)) is not None:
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not line:
            continue
        ids = _prompt_ids(tokenizer, system + history + [{"role": "user", "content": line}], budget)
        if ids is None:
            print("(that message is too long for this model's context)", file=out, flush=True)
            continue
        out.write(ANSWER)
        try:
            reply = _answer(model, tokenizer, ids, args, generator, out)
        except KeyboardInterrupt:
            print("(stopped)", file=out, flush=True)
            continue  # a stopped answer is not kept
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        print("--max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_for_inference(args.model, args.dtype, args.trust_remote_code)
    return chat_loop(model, tokenizer, args)

