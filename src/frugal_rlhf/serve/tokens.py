"""Text-side helpers shared by the server and the terminal chat: streaming detokenization,
stop strings, and the context length (the stop token ids are data.tokenize.stop_tokens)."""
from __future__ import annotations

DEFAULT_CONTEXT = 2048  # for models whose config states no limit (e.g. ALiBi models like BLOOM)


class IncrementalDecoder:
    """Turn a growing list of token ids into text pieces, one call per token.

    Decoding token by token breaks multi-byte characters (a byte-level token can be half
    of a UTF-8 sequence) and drops the leading spaces that sentencepiece tokenizers attach
    to the *previous* context. So we decode a small window that starts a few tokens back
    and emit only what grew; while the window ends in U+FFFD (an unfinished character) we
    hold the text back. `flush()` releases whatever is held when generation ends, so the
    concatenated pieces equal the decode of all ids.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the decoder, already emitted
        self.read_offset = 0  # tokens before this were emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return now[len(before):]


class StopMatcher:
    """Cut a text stream at the first stop string.

    Text that could be the start of a stop string is held back until the next piece
    decides it, so a stop string never leaks out half-printed. Any occurrence of a stop
    string therefore lies inside `held + piece`, which is all we need to search.
    """

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Return the text that is safe to emit now; sets `stopped` when a stop string hit."""
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = min(len(text), max((len(s) - 1 for s in self.stops), default=0))
        for n in range(longest, 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """Generation ended without a stop string: the held text was real output."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def context_length(model, tokenizer) -> int:
    """Positions the model can attend over (prompt + completion)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (1e30); ignore it.
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else DEFAULT_CONTEXT


def max_token_bytes(tokenizer) -> int:
    """UTF-8 bytes of the longest vocabulary entry (added tokens included).

    No token stands for more input bytes than its own spelling has (byte-level symbols
    spell one byte with one or two, sentencepiece's "▁" one byte with three), so a text of
    more than context * this many bytes has more tokens than the context for sure, and can
    be refused without tokenizing it (a 3.9 MB prompt took 7.5 s to tokenize).
    """
    return max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())
