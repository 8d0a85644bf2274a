"""The C library under this process, where there is one (glibc's heap knobs, Linux's prctl).
Without torch: the pipeline's own process, which stays light beside its stages, uses it too."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import signal


@functools.lru_cache(maxsize=None)
def libc():
    """glibc, or None where there is none with malloc_trim (macOS, musl)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent():
    """Linux: this process gets SIGTERM when its parent dies, however it dies (a pipeline killed
    by a scheduler with SIGKILL had left its stage's process training on as an orphan)."""
    lib = libc()
    if lib is not None and hasattr(lib, "prctl"):
        lib.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
