"""Spike detectors and the apply / skip / stop decisions (no process group)."""

from __future__ import annotations

import math

import pytest

from megatron_ext.config.errors import ConfigError, ProblemCollector
from megatron_ext.config.loader import from_dict
from megatron_ext.monitoring.config import MonitoringConfig
from megatron_ext.monitoring.stability import SpikeDetector, StabilityGuard


def _feed(detector: SpikeDetector, values: list[float]) -> list[str]:
    return [detector.check(v) for v in values]


def test_zscore_detector():
    detector = SpikeDetector(window=50, threshold=6.0, min_steps=10, method="zscore")
    noisy = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(30)]
    assert not any(_feed(detector, noisy))
    assert "std above" in detector.check(2.5)
    assert detector.check(2.01) == ""


def test_no_detection_before_min_steps_and_window_adapts():
    detector = SpikeDetector(window=5, threshold=2.0, min_steps=5, method="ratio")
    assert not any(_feed(detector, [1.0, 1.0, 1.0, 1.0, 10.0]))  # only 4 values before the 10
    assert detector.check(10.0)  # mean of [1,1,1,1,10] = 2.8; 10 > 2 x 2.8
    # A lasting shift leaves the window full of the new level and stops being a spike.
    results = _feed(detector, [10.0] * 6)
    assert results[-1] == ""


def test_ratio_detector_ignores_nonfinite():
    detector = SpikeDetector(window=10, threshold=3.0, min_steps=3, method="ratio")
    _feed(detector, [1.0, 1.0, 1.0])
    assert detector.check(math.nan) == ""
    assert len(detector.values) == 3
    assert "3.50x" in detector.check(3.5)


def _guard(**overrides) -> StabilityGuard:
    values = dict(
        spike_window=10,
        spike_min_steps=3,
        spike_method="ratio",
        loss_spike_threshold=2.0,
        grad_norm_spike_threshold=5.0,
    )
    values.update(overrides)
    return StabilityGuard(MonitoringConfig(**values))


@pytest.mark.parametrize("action,expected", [("log", "apply"), ("skip", "skip"), ("stop", "stop")])
def test_loss_spike_actions(action, expected):
    guard = _guard(on_spike=action)
    for _ in range(5):
        assert guard.decide(3.0, 1.0, agree=False).action == "apply"
    decision = guard.decide(9.0, 1.0, agree=False)
    assert decision.action == expected and "loss spike" in decision.reason
    assert guard.num_spikes == 1


def test_grad_norm_spike_and_nonfinite():
    guard = _guard(on_spike="skip", on_nonfinite="stop")
    for _ in range(4):
        guard.decide(3.0, 1.0, agree=False)
    assert guard.decide(3.0, 6.0, agree=False).reason.startswith("grad_norm spike")
    decision = guard.decide(3.0, math.inf, agree=False)
    assert decision.action == "stop" and "non-finite grad_norm is inf" in decision.reason
    assert guard.decide(math.nan, None, agree=False).action == "stop"


def test_consecutive_skips_escalate_but_overflows_do_not():
    guard = _guard(on_nonfinite="skip", max_consecutive_skips=3)
    for _ in range(5):
        decision = guard.decide(3.0, None, found_inf=True, agree=False)
        assert decision.action == "skip" and "loss-scale overflow" in decision.reason
    assert guard.decide(math.nan, 1.0, agree=False).action == "skip"
    assert guard.decide(math.nan, 1.0, agree=False).action == "skip"
    third = guard.decide(math.nan, 1.0, agree=False)
    assert third.action == "stop" and "3 updates skipped in a row" in third.reason
    guard = _guard(max_consecutive_skips=3)
    guard.decide(math.nan, 1.0, agree=False)
    guard.decide(3.0, 1.0, agree=False)  # an applied update resets the count
    assert guard.consecutive_skips == 0


def test_config_validation_collects_every_problem():
    cfg = MonitoringConfig(
        log_interval=0,
        activation_stats_interval=-1,
        spike_window=1,
        spike_min_steps=5,
        spike_method="ratio",
        loss_spike_threshold=0.5,
        peak_flops_per_gpu=-1.0,
    )
    problems = ProblemCollector()
    cfg.validate(problems)
    fields = {p.field for p in problems.problems}
    assert fields == {
        "monitoring.log_interval",
        "monitoring.activation_stats_interval",
        "monitoring.spike_window",
        "monitoring.spike_min_steps",
        "monitoring.loss_spike_threshold",
        "monitoring.peak_flops_per_gpu",
    }
    problems = ProblemCollector()
    MonitoringConfig().validate(problems)
    assert problems.problems == []
    with pytest.raises(ConfigError):
        from_dict(MonitoringConfig, {"on_nonfinite": "log"})


def test_a_restored_guard_decides_as_the_uninterrupted_one():
    """A checkpoint holds the guard's windows and counters (JSON): after a resume a spike is
    caught at once and skips in a row keep counting, as without the restart."""
    import json

    values = [(3.0, 1.0), (3.1, 1.1), (2.9, 0.9), (math.nan, 1.0), (3.0, 1.0), (math.nan, 1.0)]
    after = [(math.nan, 1.0), (9.0, 1.0), (3.0, 6.0), (3.0, 1.0)]
    uninterrupted = _guard(on_spike="skip", on_nonfinite="skip", max_consecutive_skips=2)
    stopped = _guard(on_spike="skip", on_nonfinite="skip", max_consecutive_skips=2)
    for loss, norm in values:
        uninterrupted.decide(loss, norm, agree=False)
        stopped.decide(loss, norm, agree=False)
    resumed = _guard(on_spike="skip", on_nonfinite="skip", max_consecutive_skips=2)
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    fresh = _guard(on_spike="skip", on_nonfinite="skip", max_consecutive_skips=2)
    expected = [uninterrupted.decide(loss, norm, agree=False) for loss, norm in after]
    assert [resumed.decide(loss, norm, agree=False) for loss, norm in after] == expected
    assert expected[0].action == "stop"  # the skip before the checkpoint counts
    assert "loss spike" in expected[1].reason and "grad_norm spike" in expected[2].reason
    # Without the state the run would not have stopped nor caught the loss spike.
    assert [fresh.decide(loss, norm, agree=False).action for loss, norm in after] != [
        d.action for d in expected
    ]
    assert resumed.state_dict() == uninterrupted.state_dict()
