"""The KL-coefficient controllers: the fixed one stays put, the adaptive one moves by the
hand-computed proportional rule, and both resume from their state."""
import pytest

from frugal_rlhf.rl.kl import AdaptiveKLController, FixedKLController


def close(a, b, tol):
    assert a == pytest.approx(b, abs=tol)


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(10.0, 1000)
    assert c.value == 0.05
    d = FixedKLController(1.0); d.load_state_dict(c.state_dict())
    assert d.value == 0.05


def test_adaptive_kl_controller_direction_clip_and_state():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)                                  # kl above target: error 0.5 -> 0.2
    close(c.value, 0.1 * (1 + 0.2 * 256 / 10000), 1e-12)
    up = c.value
    c.update(5.7, 256)                                  # below target: error -0.05
    close(c.value, up * (1 - 0.05 * 256 / 10000), 1e-12)
    assert c.value < up
    c.update(6.0, 256)                                  # on target: unchanged
    close(c.value, up * (1 - 0.05 * 256 / 10000), 1e-12)
    c2 = AdaptiveKLController(1.0, target=1.0, horizon=1)
    c2.load_state_dict(c.state_dict())
    assert c2.state_dict() == c.state_dict()
    c.update(0.0, 100); c2.update(0.0, 100)             # identical trajectories afterwards
    assert c2.value == c.value and c.value < up
