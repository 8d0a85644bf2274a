"""Every decision about devices and dtypes lives here, so CUDA and CPU share one code path.

Rule: compute in bf16 where the hardware runs it fast, keep trained parameters in fp32
(master weights), fall back to fp32 everywhere else.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import time

import torch

from .libc import libc

# torch's bf16 matmuls on a CPU run through oneDNN, which keeps each matmul shape's compiled
# primitive in two caches of 1024 entries (ideep's LRU_CACHE_CAPACITY, oneDNN's own). Training
# meets a new shape with every sequence length, and each kept primitive holds its buffers: the
# reward model's defaults on HH-length pairs grew ~90 MiB a step (peak RSS 4.04 GiB after 10 steps,
# in-use heap growing while live tensors stayed flat) and peaked at 2.66 GiB with 64 entries each,
# steps as fast. One step's working set is a few dozen shapes. Both are read at the first bf16
# matmul, so setting them at import is in time; a user's own setting wins.
MATMUL_CACHE_ENTRIES = 64
for _var in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
    os.environ.setdefault(_var, str(MATMUL_CACHE_ENTRIES))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls run faster than fp32 ones on this CPU: the flags say whether the
    hardware can (AVX512-BF16 / AMX; without them bf16 is emulated), a measurement whether
    torch's kernels do. Where torch's bf16 GEMM is not oneDNN's, a prefill-sized bf16 matmul
    runs ~7x slower than fp32 (reproduced here with oneDNN off: 8 prompts of 256 tokens of the
    embedded default, 9 s in fp32 against 56-70 s in bf16), which `dtype: auto` then picked."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        logging.getLogger("frugal_rlhf").info("dtype auto: fp32 (this CPU has no bf16 instructions)")
        return False
    bf16, fp32 = _matmul_seconds(torch.bfloat16), _matmul_seconds(torch.float32)
    fast = bf16_pays(bf16, fp32)
    # Said once per process, so a user sees which dtype a run computed in, and why.
    logging.getLogger("frugal_rlhf").info("dtype auto: %s (a prefill-sized matmul took %.1f ms in bf16, %.1f ms in "
                                          "fp32)", "bf16" if fast else "fp32", bf16 * 1e3, fp32 * 1e3)
    return fast


def bf16_pays(bf16: float, fp32: float) -> bool:
    """bf16 when its matmul takes at most 90% of fp32's (a decode step is mostly matmuls)."""
    return bf16 <= 0.9 * fp32


def _matmul_seconds(dtype: torch.dtype, rows: int = 512, inner: int = 576, cols: int = 1536) -> float:
    """The best of a few runs of a prefill-sized matmul (SmolLM2-135M's MLP shape) in `dtype`,
    on this thread count: ~0.1 s once per process."""
    x, w = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    x @ w  # warm-up: kernel selection, packing
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - t0)
    return best


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(device: torch.device | None = None, override: str | None = None) -> torch.dtype:
    """The dtype for frozen weights and activations: "auto" picks bf16 when it is fast, unless
    the environment variable FRUGAL_DTYPE (bf16|fp16|fp32) says which: one switch that makes a
    whole run, or the test suite, compute in the same dtype on every machine."""
    if not override or override == "auto":
        override = os.environ.get("FRUGAL_DTYPE") or "auto"
    if override != "auto":
        if override not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {override!r} (check FRUGAL_DTYPE)")
        return DTYPES[override]
    device = device or default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def compile_decode(device: torch.device) -> dict | None:
    """torch.compile options for the generation engine's decode step, or None for eager.

    Off unless FRUGAL_COMPILE=1: on CPU (inductor) it has not been shown faster than eager
    here (compare with `FRUGAL_COMPILE=0|1 frugal bench generate`), and it costs a compile
    per new batch shape. On CUDA, "reduce-overhead" replays the step as a CUDA graph."""
    if os.environ.get("FRUGAL_COMPILE", "0") not in ("0", "1"):
        raise ValueError(f"FRUGAL_COMPILE must be 0 or 1; got {os.environ['FRUGAL_COMPILE']!r}")
    if os.environ.get("FRUGAL_COMPILE") != "1":
        return None
    return {"dynamic": True, **({"mode": "reduce-overhead"} if device.type == "cuda" else {})}


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for a forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fused_int8_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether x @ (int8 codes * row scales)^T runs as one kernel without a dense weight
    (torch's weight-only int8 kernel for CPU): generation, with a few tokens per forward, then
    skips dequantizing every layer on every token (models/quantize.py)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and \
        hasattr(torch, "_weight_int8pack_mm")


# The lean heap (opt-in: FRUGAL_LEAN_HEAP=1, and chosen by a memory plan that checkpoints).
# glibc's mallopt threshold: allocations of at least this many bytes are mapped on their own
# and unmapped when freed. Its default moves up to the largest block freed (to 32 MiB), after
# which every tensor below that size comes from the heap, whose freed pages stay resident in
# fragments. Held at 1 MiB, and with the heap trimmed at every phase end, memory is traded for
# time (measured, `frugal bench rm --model default --dtype fp32`: peak RSS 10.22 -> 6.04 GiB
# and tokens/s 239 -> 138, each large tensor's pages faulted in afresh; the phase-end trims
# alone cost GRPO ~9% of its speed).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
_lean = False


def use_lean_heap():
    """Hold glibc's mmap threshold (unless MALLOC_MMAP_THRESHOLD_ sets it) and trim the heap at
    every phase end (reset_phase_peak); a no-op without glibc."""
    global _lean
    lib = libc()
    if lib is None:
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _lean = True


def release_free_memory():
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Building a large model piece by piece leaves freed temporaries between the pieces kept:
    without this, a quantized dummy model's peak RSS was 2.5x its size (measured on 'm')."""
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)


_run_peak = 0  # the process's peak before the last reset_phase_peak()


def _current_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # VmHWM can be reset (reset_phase_peak); ru_maxrss cannot
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this process so far: max allocated on CUDA, peak RSS on CPU."""
    return max(_run_peak, _current_peak(device or default_device()))


def reset_run_peak(device: torch.device | None = None):
    """Start a new run in this process (the pipeline's next stage): forget earlier peaks, so
    that each stage reports its own."""
    global _run_peak
    reset_phase_peak(device)
    _run_peak = 0


def reset_phase_peak(device: torch.device | None = None) -> int:
    """End a phase: return its peak (since the previous reset) and start the next one.
    peak_memory_bytes() still covers the whole run. With the lean heap, the heap's free pages
    go back to the OS first: what one phase freed is not resident when the next one starts,
    so a long run's peak does not creep up step by step with the heap's fragments."""
    global _run_peak
    device = device or default_device()
    peak = _current_peak(device)
    _run_peak = max(_run_peak, peak)
    if _lean:
        release_free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    return peak


if os.environ.get("FRUGAL_LEAN_HEAP") == "1":
    use_lean_heap()
