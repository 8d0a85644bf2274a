"""Ctrl-C during training: the step running finishes, its checkpoint is written, the run stops.

A KeyboardInterrupt raised wherever the signal happens to land (inside a collective, halfway
through an optimizer step) would leave ranks waiting for each other and the step half-applied.
So during the loop SIGINT only sets a flag, which the loop reads between steps; a second
Ctrl-C restores Python's own handling and stops at once. (torchrun starts its workers in their
own session and passes them one SIGINT when it gets one: each rank sees the first press.)
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("frugal_rlhf")


class StopRequest:
    """A context in which SIGINT asks the loop to stop (`asked`) instead of raising."""

    def __init__(self):
        self.asked = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame):
        self.asked = True
        signal.signal(signal.SIGINT, self.previous)
        log.warning("Ctrl-C: stopping after this step and its checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
