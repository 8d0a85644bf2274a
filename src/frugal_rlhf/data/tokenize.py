"""Chat-template formatting, label masks, truncation and collation.

Label masking works on characters, not on template internals: the conversation is rendered
with the tokenizer's chat template, the character span of every assistant answer is found by
rendering the prefix before it (with the generation prompt) and the turn that ends it, and a
token carries loss iff it lies inside such a span. This works for any template whose
renderings of shorter conversations are prefixes of longer ones (true of common templates);
others get a clear error.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

IGNORE = -100


def render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the assistant answers."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not text.startswith(prefix) or not upto.startswith(prefix):
            raise ValueError("this chat template does not render conversations as prefixes of each "
                             "other; label masking needs that property")
        # The answer ends with the end-of-turn token (the model must learn to stop); what the
        # template adds after it (a newline) is not something to learn.
        end = upto.find(tokenizer.eos_token, len(prefix)) if tokenizer.eos_token else -1
        spans.append((len(prefix), end + len(tokenizer.eos_token) if end >= 0 else len(upto)))
    return text, spans


@dataclass
class TruncationStats:
    prompt_truncated: int = 0
    answer_truncated: int = 0


def encode_conversation(tokenizer, messages, max_length: int, stats: TruncationStats | None = None):
    """input_ids and labels (IGNORE outside assistant answers), at most max_length tokens.

    Too long: drop tokens from the left of the prompt; if the final answer still does not fit
    beside half a window of prompt, its tail is cut. The answer's start is never cut. Both
    are counted in stats.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE
              for tok, (a, b) in zip(ids, offsets)]
    if len(ids) > max_length:
        last_start = next((i for i, (a, _) in enumerate(offsets) if a >= spans[-1][0]), len(ids))
        # Keep as much prompt as fits beside the answer, but at least half the window, so that a
        # very long answer is still trained with its prompt (its tail is cut instead).
        keep_prompt = min(last_start, max(max_length - (len(ids) - last_start), max_length // 2))
        if stats is not None:
            stats.prompt_truncated += keep_prompt < last_start
            stats.answer_truncated += keep_prompt + len(ids) - last_start > max_length
        ids, labels = ids[last_start - keep_prompt:][:max_length], labels[last_start - keep_prompt:][:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_prompt(tokenizer, messages, max_length: int) -> list[int]:
    """Prompt tokens ending with the assistant's generation prompt, left-truncated."""
    ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def encode_response(tokenizer, prompt_ids: list[int], response: str, max_length: int) -> list[int]:
    """prompt + response + end-of-turn, at most max_length tokens (the prompt is cut on the left)."""
    resp = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    resp = resp[: max_length - 1]
    return prompt_ids[-(max_length - len(resp)):] + resp


def answer_length(tokenizer, text: str, max_length: int) -> int:
    """Tokens of an answer as encode_response writes it (+ end of turn, at most max_length - 1)."""
    return min(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1, max_length - 1)


def last_token_index(attention_mask):
    """Index of the last real token per row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def answer_mask(attention_mask, lengths) -> torch.Tensor:
    """[B, T] bool: the last `lengths[i]` real tokens of row i (its answer and end of turn)."""
    last = last_token_index(attention_mask)[:, None]
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (cols > last - torch.as_tensor(lengths, device=attention_mask.device)[:, None]) & (cols <= last)


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if side == "left" else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def attention(seqs: list[list[int]], side: str = "right") -> torch.Tensor:
    return pad([[1] * len(s) for s in seqs], 0, side)


def pack(rows: list[dict], max_length: int, seed: int) -> list[dict]:
    """Encoded conversations packed into rows of at most max_length tokens (best fit, in a
    seeded random order). A packed row's `segments` numbers its conversations 1, 2, ...;
    the collator turns them into the attention mask, which keeps conversations apart."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    free: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the tightest fit is a bisect away
    bins: list[list[dict]] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([])
            left, b = max_length, len(bins) - 1
        else:
            left, b = free.pop(k)
        bins[b].append(rows[i])
        if left - n > 0:
            bisect.insort(free, (left - n, b))
    packed = []
    for members in bins:
        packed.append({"input_ids": [t for r in members for t in r["input_ids"]],
                       # a conversation's first token is never predicted from the one before it
                       "labels": [IGNORE if j == 0 else t for r in members for j, t in enumerate(r["labels"])],
                       "segments": [k + 1 for k, r in enumerate(members) for _ in r["input_ids"]]})
    return packed


@dataclass
class SFTCollator:
    """Right-padded batches; packed rows carry segment numbers in `attention_mask` (0 = pad)."""

    pad_id: int

    def __call__(self, rows):
        ids = [r["input_ids"] for r in rows]
        packed = "segments" in rows[0]
        mask = pad([r["segments"] for r in rows], 0) if packed else attention(ids)
        return {"input_ids": pad(ids, self.pad_id), "attention_mask": mask,
                "labels": pad([r["labels"] for r in rows], IGNORE), "packed": packed}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class PairCollator:
    """Each pair's chosen and rejected in adjacent rows (one forward pass for the batch).

    The two share their prompt, which the reward model can then encode once per pair: each
    pair's common prefix is left-padded to one width `shared`, the rest right-padded after it
    (prompt-heavy pairs, e.g. a long conversation with two candidate last answers, cost nearly
    half). When that layout would not save a tenth of the columns of plain right padding (short
    or uneven prompts before long answers), the batch is right-padded and `shared` is 0.
    `share=False` always pads plainly (activation checkpointing runs whole rows anyway).
    Rows that carry their answers' token counts (`answer`: [chosen, rejected]) get `answer_mask`."""

    pad_id: int
    share: bool = True

    def __call__(self, rows):
        seqs = [s for r in rows for s in (r["chosen"], r["rejected"])]
        # Every row keeps at least its last token after the prefix: the score is read there.
        # A row's `max_shared` caps it further (DPO reads every answer token's predicting position).
        common = [k for row, c, r in zip(rows, seqs[::2], seqs[1::2])
                  for k in [min(_common_prefix(c, r), len(c) - 1, len(r) - 1, row.get("max_shared", len(c)))] * 2]
        shared, rest = max(common), max(len(s) - k for s, k in zip(seqs, common))
        # Columns computed: the prefix once per pair and the rest per row, against every row whole.
        # The split forward (two passes, the prefix's keys and values repeated) must save a tenth.
        if not self.share or min(common) < 1 or shared + 2 * rest > 0.9 * 2 * max(len(s) for s in seqs):
            shared, lead = 0, [0] * len(seqs)
        else:
            lead = [shared - k for k in common]
        width = max(n + len(s) for n, s in zip(lead, seqs))
        ids = [[self.pad_id] * n + s + [self.pad_id] * (width - n - len(s)) for n, s in zip(lead, seqs)]
        mask = [[0] * n + [1] * len(s) + [0] * (width - n - len(s)) for n, s in zip(lead, seqs)]
        margin = torch.tensor([r.get("margin") or 0.0 for r in rows], dtype=torch.float32)
        mask = torch.tensor(mask)
        batch = {"input_ids": torch.tensor(ids), "attention_mask": mask, "margin": margin, "shared": shared,
                 "encoded": int(mask.sum() - mask[1::2, :shared].sum())}  # tokens the forward runs
        if "answer" in rows[0]:
            batch["answer_mask"] = answer_mask(mask, [n for r in rows for n in r["answer"]])
        return batch


@dataclass
class PromptCollator:
    pad_id: int

    def __call__(self, rows):
        ids = [r["prompt_ids"] for r in rows]
        return {"input_ids": pad(ids, self.pad_id, "left"), "attention_mask": attention(ids, "left"),
                "rows": rows}


def stop_tokens(tokenizer, model=None) -> tuple[int, ...]:
    """Every token id that ends a turn (the one answer for training, evaluation, chat and serve):
    the tokenizer's EOS; ChatML's `<|im_end|>` when the vocabulary has it as a real token (chat
    templates end turns with it where EOS may be another id); and, given the model, the EOS ids
    its config and generation config declare (they may list several)."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        declared = getattr(source, "eos_token_id", None)
        ids.update([declared] if isinstance(declared, int) else declared or ())
    return tuple(sorted(int(i) for i in ids if i is not None))
