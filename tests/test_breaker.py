"""The circuit breaker (shared/breaker.py): its three states on a clock the test moves."""

from __future__ import annotations

import pytest

from shared.breaker import CLOSED, HALF_OPEN, OPEN, Breaker

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row_only():
    changes: list[str] = []
    breaker = Breaker(threshold=5, cooldown=2.0, clock=Clock(), on_change=changes.append)
    for _ in range(4):
        breaker.failed()
    breaker.succeeded()  # the run is broken: counting starts again
    for _ in range(4):
        breaker.failed()
        assert breaker.state == CLOSED and breaker.allow()
    breaker.failed()
    assert breaker.state == OPEN and not breaker.allow()
    assert changes == [OPEN] and breaker.opened == 1


def test_half_open_lets_one_probe_through_and_its_success_closes():
    clock = Clock()
    changes: list[str] = []
    breaker = Breaker(threshold=1, cooldown=2.0, clock=clock, on_change=changes.append)
    breaker.failed()
    assert breaker.retry_after() == 2.0
    clock.now += 1.999
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 0.001
    assert breaker.state == HALF_OPEN
    assert breaker.allow() is True  # the probe
    assert breaker.allow() is False  # only one at a time
    breaker.succeeded()
    assert breaker.state == CLOSED and breaker.allow() and breaker.failures == 0
    assert changes == [OPEN, CLOSED]


def test_a_failed_probe_opens_it_again_for_twice_as_long_up_to_the_cap():
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=2.0, max_cooldown=5.0, clock=clock)
    breaker.failed()
    waits = []
    for _ in range(3):
        clock.now += breaker.retry_after()
        assert breaker.allow()
        breaker.failed()
        waits.append(breaker.retry_after())
    assert waits == [4.0, 5.0, 5.0]
    assert breaker.opened == 4


def test_a_probe_never_reported_frees_the_way_after_the_cooldown():
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=2.0, clock=clock)
    breaker.failed()
    clock.now += 2.0
    assert breaker.allow()
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_failures_while_open_do_not_extend_it_and_the_view_says_the_state():
    clock = Clock()
    breaker = Breaker(threshold=2, cooldown=3.0, clock=clock)
    breaker.failed()
    breaker.failed()
    clock.now += 1.0
    breaker.failed()  # a call already out when it opened
    assert breaker.view() == {"state": "open", "failures": 2, "retry_after": 2.0, "opened": 1}


@pytest.mark.parametrize("options", [{"threshold": 0}, {"cooldown": 0}, {"cooldown": 5, "max_cooldown": 1}])
def test_nonsense_settings_are_refused(options):
    with pytest.raises(ValueError):
        Breaker(**options)
