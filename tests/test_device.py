import os

import pytest
import torch

from frugal_rlhf.device import compute_dtype, peak_memory_bytes, reset_run_peak


def test_frugal_dtype_forces_what_auto_resolves_to(monkeypatch):
    """FRUGAL_DTYPE decides "auto" on every machine (a CPU with or without fast bf16 alike); an
    explicit dtype still wins; a misspelt value is refused, naming the variable."""
    cpu = torch.device("cpu")
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setenv("FRUGAL_DTYPE", name)
        assert compute_dtype(cpu) == compute_dtype(cpu, "auto") == dtype
        assert compute_dtype(cpu, "fp16") == torch.float16
    monkeypatch.setenv("FRUGAL_DTYPE", "float32")
    with pytest.raises(ValueError, match="FRUGAL_DTYPE"):
        compute_dtype(cpu)
    monkeypatch.delenv("FRUGAL_DTYPE")
    assert compute_dtype(cpu) in (torch.bfloat16, torch.float32)  # the hardware's choice


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the peak RSS can be reset on Linux only")
def test_a_new_run_forgets_the_peaks_before_it():
    """The pipeline's stages share one process: each reports its own peak, not an earlier
    stage's."""
    cpu = torch.device("cpu")
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    before = peak_memory_bytes(cpu)
    del x  # a buffer this large is its own mapping: freeing it returns it to the OS
    reset_run_peak(cpu)
    assert peak_memory_bytes(cpu) <= before - 192 * 2**20
