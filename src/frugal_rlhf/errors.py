"""Errors the command line reports as one line (`frugal CMD: error: ...`) instead of a traceback.

A low-level module raises these; cli.main turns them into the message and `exit_code`.
"""
from __future__ import annotations


class FrugalError(Exception):
    """A failure with a complete, one-line explanation (the run itself went wrong)."""

    exit_code = 1


class UserError(FrugalError, ValueError):
    """Something the user asked for or gave cannot work (flags, paths, data, disk): exit 2."""

    exit_code = 2


class NonFiniteError(FrugalError):
    """Training produced non-finite numbers more often than the run allows."""


class PeerLost(FrugalError):
    """Another process of a multi-process run stopped or cannot be reached (a node died)."""


class Interrupted(FrugalError):
    """Ctrl-C (SIGINT): the run stopped after a step's checkpoint; exit 130 as a shell's would be."""

    exit_code = 130


class StageFailed(FrugalError):
    """A pipeline stage run in its own process stopped; it has said why, this carries its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code if exit_code > 0 else 1  # a signal's negative code: a failure all the same
