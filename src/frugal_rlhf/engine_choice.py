"""Which rollout engines there are, and whether each can run here: the one-line hint naming
the extra to install when one cannot. Without torch (generation/ imports it): the pipeline's
own process, which stays light beside its stages, checks the engine before its first stage.
The engines themselves: generation/engines.py."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import UserError

# name -> "module:class" under frugal_rlhf.generation (imported when chosen: the extras are optional)
ENGINES = {"torch": "engines:TorchEngine", "llamacpp": "llamacpp:LlamaCppEngine", "vllm": "vllm_engine:VLLMEngine"}
# name -> (the package it imports, the extra that installs it); vLLM is no package of this
# environment but a server in its own (vllm_python() finds that environment)
EXTRAS = {"llamacpp": ("llama_cpp", "llamacpp")}
CHOICES = (*ENGINES, "auto")
# --rollout-quant: an engine's own copy of the weights (llama.cpp's formats; base: nearest --quantize-base)
ROLLOUT_QUANTS = ("f16", "q8_0", "q4_0", "base")


VLLM_INSTALL = ("run `make vllm-env` (its own virtualenv, .venv-vllm), set FRUGAL_VLLM_PYTHON to a python with "
                "vLLM, or FRUGAL_ROLLOUT_SERVER to the URL of a running server")


def vllm_python() -> str | None:
    """The python of vLLM's own environment: FRUGAL_VLLM_PYTHON, else .venv-vllm here or in the
    source checkout, else this one if it has vLLM; None when there is none."""
    if os.environ.get("FRUGAL_VLLM_PYTHON"):
        return os.environ["FRUGAL_VLLM_PYTHON"]
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / ".venv-vllm" / "bin" / "python").exists():
            return str(root / ".venv-vllm" / "bin" / "python")
    return sys.executable if importlib.util.find_spec("vllm") else None


def missing(name: str) -> str | None:
    """Why engine `name` cannot run here, as a one-line install hint; None when it can."""
    if name == "vllm":
        if os.environ.get("FRUGAL_ROLLOUT_SERVER") or vllm_python() is not None:
            return None
        return f"--rollout-engine vllm needs vLLM in its own environment: {VLLM_INSTALL}"
    if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
        package, extra = EXTRAS[name]
        return f"--rollout-engine {name} needs the {package} package: pip install -e .[{extra}]"
    return None


def installed(name: str) -> bool:
    return missing(name) is None


def check_engine(name: str) -> None:
    """A known engine (or auto) whose extra is installed, else a one-line error naming the extra."""
    if name not in CHOICES:
        raise UserError(f"--rollout-engine: expected one of {', '.join(CHOICES)}, got {name!r}")
    problem = missing(name)
    if problem:
        raise UserError(problem)
