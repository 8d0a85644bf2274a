"""llama.cpp as a rollout engine: llama-cpp-python's low-level bindings, in this process.

The frozen base is written once per run as GGUF by our own writer (models/gguf_writer.py, in
`quant`: f16, q8_0, q4_0), and the actor's LoRA adapter as a llama.cpp LoRA adapter file at
every sync, swapped in on the loaded base (no copy of the base per step). A policy without an
adapter (full fine-tuning, a plain model to evaluate) is written whole at every sync.

Rows are decoded together: each row is one sequence of one llama.cpp context with its own KV
cells, a prompt's group copies share its prefill (the cells are copied, not recomputed), and a
step is one llama_decode over every running row. Tokens are picked by our own rule from the
engine's logits (rollout.decode_loop: the torch engine's loop, sampling rule and random stream).

Numbers: with f16 weights the KV cache is kept in f32, so the only rounding beside the weights'
is llama.cpp's of the matmul inputs to f16 (tests/test_llamacpp_engine.py bounds it); with
q8_0 or q4_0 the cache is f16 too, for speed. The trainer measures what the engine's log-probs
differ by and corrects the gradient for it (rl/losses.py: truncated importance sampling).
"""
from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from ..engine_choice import ROLLOUT_QUANTS as QUANTS
from ..errors import UserError
from ..models.export import export_gguf_base, export_gguf_lora
from ..models.quantize import quantize_base
from .engines import RolloutEngine
from .rollout import Rollout, decode_loop

log = logging.getLogger("frugal_rlhf")
# --rollout-quant base: the llama.cpp format nearest to how the base is stored (models/quantize.py)
BASE_QUANT = {"none": "f16", "int8": "q8_0", "nf4": "q4_0", "int4": "q4_0"}
CELLS = 256  # llama.cpp sizes KV caches in multiples of this


def llama_cpp():
    """The bindings, or a one-line error naming the extra that installs them."""
    try:
        import llama_cpp as lib
    except ImportError as e:
        raise UserError("--rollout-engine llamacpp needs llama-cpp-python: pip install -e .[llamacpp]") from e
    if not getattr(lib, "_frugal_logs", None):
        lib.llama_backend_init()
        lib._frugal_logs = lib.llama_log_callback(_log)  # kept referenced: llama.cpp calls it later
        lib.llama_log_set(lib._frugal_logs, None)
    return lib


def _log(level: int, text: bytes, _):
    """llama.cpp's log (every load and context, to stderr by default) into ours: its errors as
    warnings, the rest at debug level (-v)."""
    line = text.decode("utf-8", "replace").rstrip()
    if line:
        log.log(logging.WARNING if level == 4 else logging.DEBUG, "llama.cpp: %s", line)  # ggml: 4 = error


class LlamaModel:
    """One loaded GGUF model, its context (re-made when a batch needs more room) and LoRA adapter."""

    def __init__(self, path: Path, kv_type: str):
        self.lib = lib = llama_cpp()
        params = lib.llama_model_default_params()
        # No "extra" buffer types (AMX, repacked layouts): on our AMX-capable CPU llama.cpp's AMX
        # matmul crashed (SIGILL/SIGSEGV in ggml_backend_amx_mul_mat) on any batch of more than one
        # token, in this engine and in llama-cpp-python's own Llama class alike.
        params.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.kv_type = {"f32": lib.GGML_TYPE_F32, "f16": lib.GGML_TYPE_F16}[kv_type]
        self.ctx, self.room, self.adapter = None, (0, 0), None

    def context(self, seqs: int, cells: int):
        """A context of `seqs` sequences of at least `cells` KV cells each, emptied."""
        lib = self.lib
        if seqs > self.room[0] or cells > self.room[1]:
            limit = lib.llama_max_parallel_sequences()
            if seqs > limit:
                raise ValueError(f"llama.cpp decodes at most {limit} rows together, {seqs} were asked for")
            if self.ctx:
                lib.llama_free(self.ctx)
            seqs, cells = max(seqs, self.room[0]), -(-max(cells, self.room[1]) // CELLS) * CELLS
            p = lib.llama_context_default_params()
            p.n_ctx = p.n_batch = seqs * cells
            p.n_seq_max, p.kv_unified = seqs, False  # a stream of cells per row: a row attends to its own only
            p.type_k = p.type_v = self.kv_type
            p.no_perf = True
            self.ctx = lib.llama_init_from_model(self.model, p)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not make a context of {seqs} x {cells} cells")
            self.room = (seqs, cells)
            if self.adapter:
                self._apply()
        threads = torch.get_num_threads()
        lib.llama_set_n_threads(self.ctx, threads, threads)
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        return self.ctx

    def set_adapter(self, path: Path | None):
        """Swap in the LoRA adapter at `path` (None: none); the previous one is freed."""
        lib, old = self.lib, self.adapter
        self.adapter = lib.llama_adapter_lora_init(self.model, str(path).encode()) if path else None
        if path and not self.adapter:
            raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
        if self.ctx:
            self._apply()
        if old:
            lib.llama_adapter_lora_free(old)

    def _apply(self):
        lib = self.lib
        if self.adapter:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            scales = (ctypes.c_float * 1)(1.0)
            rc = lib.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        else:
            rc = lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        if rc != 0:
            raise RuntimeError(f"llama.cpp refused the LoRA adapter (code {rc})")

    def free(self):
        lib = self.lib
        if self.ctx:
            lib.llama_free(self.ctx)
        if self.adapter:
            lib.llama_adapter_lora_free(self.adapter)
        if self.model:
            lib.llama_model_free(self.model)
        self.ctx = self.adapter = self.model = None


class LlamaBatch:
    """decode_loop's decode batch on a llama.cpp context: the rows are sequences (handle = seq id)."""

    def __init__(self, llm: LlamaModel, ctx, capacity: int):
        self.llm, self.ctx, self.lib = llm, ctx, llm.lib
        self.batch = self.lib.llama_batch_init(capacity, 0, 1)
        self.rows: list[int] = []
        self.position: dict[int, int] = {}

    def _decode(self, entries) -> torch.Tensor:
        """One llama_decode of (token, position, seq id, wants logits) entries; the logits asked for."""
        b = self.batch
        for i, (token, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc}) on {len(entries)} tokens")
        outputs = sum(e[3] for e in entries)
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(outputs, self.llm.n_vocab))
        return torch.from_numpy(logits.copy())

    def join(self, input_ids, attention_mask, rows, room, copies=1) -> torch.Tensor:
        """Prefill each prompt's real tokens once (positions from 0) into its first copy's
        sequence; its other copies get those cells. Next-token logits [k*copies, V]."""
        entries, groups = [], [rows[i:i + copies] for i in range(0, len(rows), copies)]
        for ids, mask, group in zip(input_ids.tolist(), attention_mask.tolist(), groups):
            real = [t for t, m in zip(ids, mask) if m]
            entries += [(t, p, group[0], p == len(real) - 1) for p, t in enumerate(real)]
            self.position.update((row, len(real)) for row in group)
        logits = self._decode(entries)
        memory = self.lib.llama_get_memory(self.ctx)
        for group in groups:
            for row in group[1:]:
                self.lib.llama_memory_seq_cp(memory, group[0], row, -1, -1)
        self.rows.extend(rows)
        return logits.repeat_interleave(copies, 0) if copies > 1 else logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        entries = [(t, self.position[row], row, True) for t, row in zip(tokens.tolist(), self.rows)]
        for row in self.rows:
            self.position[row] += 1
        return self._decode(entries)

    def leave(self, keep: list[bool]) -> None:
        memory = self.lib.llama_get_memory(self.ctx)
        for row, k in zip(self.rows, keep):
            if not k:
                self.lib.llama_memory_seq_rm(memory, row, -1, -1)  # its cells are free again
        self.rows = [row for row, k in zip(self.rows, keep) if k]

    def free(self):
        self.lib.llama_batch_free(self.batch)


class LlamaCppEngine(RolloutEngine):
    """Rollouts sampled by llama.cpp from its own copy of the policy (see the module docstring)."""

    name = "llamacpp"
    matches_trainer = False

    def __init__(self, autocast=None, tokenizer=None, quant: str = "f16"):
        if quant not in QUANTS:
            raise UserError(f"--rollout-quant {quant!r}: choose one of {', '.join(QUANTS)}")
        llama_cpp()  # a missing extra fails now, not at the first rollout
        self.tokenizer, self.quant = tokenizer, quant
        self.dir = Path(tempfile.mkdtemp(prefix="frugal-llamacpp-"))  # the GGUF files, removed on close
        self.state: dict = {"llm": None}
        self.base_of = self.synced = None  # the SharedLM whose base is loaded; the policy last synced
        self.syncs = 0
        self._finalizer = weakref.finalize(self, _release, self.state, self.dir)

    def sync(self, policy) -> None:
        lm = policy.lm
        lora = policy.adapter is not None and lm.is_peft
        self.dir.mkdir(exist_ok=True)
        if not lora or self.base_of is not lm:  # a plain model changes at every sync: written whole
            quant = BASE_QUANT[quantize_base(lm.hf_model())] if self.quant == "base" else self.quant
            tokenizer = self.tokenizer or getattr(policy, "tokenizer", None)
            path = export_gguf_base(lm, tokenizer, self.dir / f"base-{quant}.gguf", quant)
            self._load(path, "f32" if quant == "f16" else "f16")
            self.base_of = lm if lora else None
        if lora:
            path = export_gguf_lora(policy, self.dir / f"adapter-{self.syncs % 2}.gguf")
            self.state["llm"].set_adapter(path)
        self.synced, self.syncs = policy, self.syncs + 1

    def _load(self, path: Path, kv_type: str):
        if self.state["llm"] is not None:
            self.state["llm"].free()
        self.state["llm"] = LlamaModel(path, kv_type)
        log.info("rollout engine llamacpp: loaded %s (%.0f MiB)", path.name, path.stat().st_size / 2**20)

    @torch.no_grad()
    def generate(self, policy, input_ids, attention_mask, config, generator=None, group=1) -> Rollout:
        if policy is not self.synced:
            self.sync(policy)
        llm = self.state["llm"]
        ctx = llm.context(input_ids.shape[0], input_ids.shape[1] + config.max_new_tokens)
        batches = []

        def new_batch(slots):
            batches.append(LlamaBatch(llm, ctx, max(slots, input_ids.numel())))
            return batches[-1]

        try:
            out = decode_loop(new_batch, input_ids.cpu(), attention_mask.cpu(), config, generator, group=group)
        finally:
            for b in batches:
                b.free()
        device = input_ids.device
        return Rollout(out.sequences.to(device), out.attention_mask.to(device), out.action_mask.to(device),
                       out.prompt_length, out.logprobs.to(device))

    @torch.no_grad()
    def decode_only(self, policy, input_ids, attention_mask, steps: int) -> None:
        """llama.cpp's decoding alone, for the benchmark's anchor: the prefill of every row, then
        `steps - 1` decode steps with each row fed its last prompt token, nothing sampled."""
        if policy is not self.synced:
            self.sync(policy)
        llm = self.state["llm"]
        ctx = llm.context(input_ids.shape[0], input_ids.shape[1] + steps)
        batch = LlamaBatch(llm, ctx, input_ids.numel())
        try:
            batch.join(input_ids.cpu(), attention_mask.cpu(), list(range(input_ids.shape[0])), steps)
            for _ in range(steps - 1):
                batch.step(input_ids[:, -1].cpu())
        finally:
            batch.free()

    def close(self) -> None:
        """Free the llama.cpp model and remove the files; a later `generate` makes them again."""
        _release(self.state, self.dir)
        self.base_of = self.synced = None


def _release(state: dict, folder: Path):
    if state["llm"] is not None:
        state["llm"].free()
        state["llm"] = None
    shutil.rmtree(folder, ignore_errors=True)
