"""The metrics client in one process: declared families, folding, series caps,
the batch wire format and its validation, and the cost of recording."""

from __future__ import annotations

import math
import time

import pytest

from shared.errors import InvalidParams
from shared.metrics import (
    DHT_PEERS,
    FAMILIES,
    OTHER,
    REQUEST_DURATION,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    Batch,
    Metrics,
    Source,
    parse_batch,
)
from shared.metrics.families import ACTIVE_USERS, Kind

pytestmark = pytest.mark.unit

SOURCE = Source("gateway", "0123456789ab", "f00d")


def test_families_have_fixed_safe_labels():
    forbidden = {"user", "user_id", "key", "key_id", "api_key", "prompt", "email"}
    for fam in FAMILIES.values():
        # inferswarm_ for the platform's own; inferswarm_ for the product's (inferswarm_budget_alerts_total)
        assert fam.name.startswith(("inferswarm_", "inferswarm_")), fam.name
        assert not forbidden & set(fam.label_names), fam.name
        assert (fam.kind is Kind.COUNTER) == fam.name.endswith("_total"), fam.name
    assert REQUESTS.label_names == ("service", "method", "code")
    assert REQUEST_DURATION.label_names == ("service", "method")


def test_unknown_and_unsafe_label_values_fold_into_other():
    metrics = Metrics()
    requests = metrics.counter("inferswarm_requests_total", labels=("service", "method", "code"))
    requests.inc(service="gateway", method="gateway.infer", code="OK")
    requests.inc(service="gateway", method="gateway.infer", code="user 42 said hi")  # not a code
    requests.inc(service="mallory", method="DROP TABLE", code="RATE_LIMITED")
    requests.inc(service="gateway", method="gateway.infer")  # a label missing
    requests.inc(2, service="auth", method="auth.login", code=17)  # not a string
    batch = metrics.drain()
    assert batch.counters == {
        (REQUESTS.name, ("gateway", "gateway.infer", "OK")): 1.0,
        (REQUESTS.name, ("gateway", "gateway.infer", OTHER)): 2.0,
        (REQUESTS.name, (OTHER, OTHER, "RATE_LIMITED")): 1.0,
        (REQUESTS.name, ("auth", "auth.login", OTHER)): 2.0,
    }


def test_recording_never_raises_on_the_request_path():
    metrics = Metrics()
    metrics.counter(REQUESTS).inc(-1, service="gateway", method="a.b", code="OK")  # ignored
    metrics.counter(REQUESTS).inc(math.nan, service="gateway", method="a.b", code="OK")
    metrics.histogram(REQUEST_DURATION).observe(math.inf, service="gateway", method="a.b")
    metrics.counter(REQUESTS).inc(service=["unhashable"], method={}, code=None, extra=1)
    assert metrics.drain().counters == {(REQUESTS.name, (OTHER, OTHER, OTHER)): 1.0}


def test_wiring_mistakes_raise_at_once():
    metrics = Metrics()
    with pytest.raises(KeyError, match="declare it"):
        metrics.counter("inferswarm_made_up_total")
    with pytest.raises(ValueError, match="labels"):
        metrics.counter(REQUESTS, labels=("service", "user_id"))
    with pytest.raises(TypeError):
        metrics.gauge(REQUESTS)
    with pytest.raises(ValueError, match="metrics service"):
        metrics.gauge(ACTIVE_USERS)


def test_histograms_use_le_buckets_and_sum():
    metrics = Metrics()
    duration = metrics.histogram(REQUEST_DURATION)
    for value in (0.005, 0.006, 0.3, 500.0):
        duration.observe(value, service="inference", method="inference.generate")
    cells = metrics.drain().histograms[(REQUEST_DURATION.name, ("inference", "inference.generate"))]
    assert len(cells) == len(REQUEST_DURATION.buckets) + 2
    assert cells[0] == 1 and cells[1] == 1  # 0.005 is in le=0.005, 0.006 in le=0.01
    assert cells[REQUEST_DURATION.buckets.index(0.5)] == 1 and cells[-2] == 1  # 500 s: over the last
    assert cells[-1] == pytest.approx(500.311)


def test_drain_takes_deltas_once_and_gauges_every_time():
    metrics = Metrics()
    metrics.counter(TOKENS).inc(5, model="smollm2", direction="in")
    metrics.gauge(DHT_PEERS).set(3, service="gateway", instance="0123456789ab")
    first, second = metrics.drain(), metrics.drain()
    assert first.counters and not second.counters
    assert first.gauges == second.gauges == {(DHT_PEERS.name, ("gateway", "0123456789ab")): 3.0}


def test_a_flood_of_label_values_stays_within_the_series_cap():
    metrics = Metrics(series_cap=20)
    tokens = metrics.counter(TOKENS)
    for i in range(5000):
        tokens.inc(model=f"model-{i}", direction="out")
    batch = metrics.drain()
    assert len(batch.counters) == 20
    assert batch.counters[(TOKENS.name, (OTHER, OTHER))] == 5000 - 19  # nothing lost, only folded
    assert batch.folded == {TOKENS.name: 5000 - 19}


def test_wire_round_trip_of_a_full_and_a_partial_snapshot():
    metrics = Metrics()
    metrics.counter(TOKENS).inc(model="smollm2", direction="in")
    metrics.histogram(TIME_TO_FIRST_TOKEN).observe(0.2, model="smollm2")
    generation, batch = metrics.snapshot()
    source, seq, parsed = parse_batch(batch.to_wire(SOURCE, 7))
    assert (source, seq, parsed.full) == (SOURCE, 7, True)
    assert parsed.counters == {(TOKENS.name, ("smollm2", "in")): 1.0}
    assert sum(parsed.histograms[(TIME_TO_FIRST_TOKEN.name, ("smollm2",))][:-1]) == 1
    metrics.counter(TOKENS).inc(2, model="smollm2", direction="in")
    _, partial = metrics.snapshot(generation)
    _, _, parsed = parse_batch(partial.to_wire(SOURCE, 8))
    assert parsed.full is False and not parsed.histograms  # unchanged since: left out
    assert parsed.counters == {(TOKENS.name, ("smollm2", "in")): 3.0}  # the total, not +2


def test_snapshots_carry_totals_since_start_and_only_what_changed_since_a_generation():
    metrics = Metrics()
    tokens = metrics.counter(TOKENS)
    tokens.inc(5, model="a", direction="in")
    tokens.inc(1, model="b", direction="in")
    metrics.gauge(DHT_PEERS).set(3, service="gateway", instance="0123456789ab")
    first, full = metrics.snapshot()
    tokens.inc(2, model="a", direction="in")
    second, partial = metrics.snapshot(first)
    assert full.full and not partial.full
    assert full.counters == {(TOKENS.name, ("a", "in")): 5.0, (TOKENS.name, ("b", "in")): 1.0}
    assert partial.counters == {(TOKENS.name, ("a", "in")): 7.0}
    assert partial.gauges == full.gauges == {(DHT_PEERS.name, ("gateway", "0123456789ab")): 3.0}
    assert metrics.snapshot(second)[1].counters == {}  # nothing changed since
    assert metrics.snapshot(first)[1].counters == partial.counters  # one destination may lag behind
    assert metrics.snapshot()[1].counters[(TOKENS.name, ("a", "in"))] == 7.0  # full: everything again
    assert metrics.drain().counters == {(TOKENS.name, ("a", "in")): 7.0, (TOKENS.name, ("b", "in")): 1.0}


@pytest.mark.parametrize("change, message", [
    (lambda w: w.update(v=1), "v=2"),  # deltas: no longer understood
    (lambda w: w.update(seq=-1), "seq"),
    (lambda w: w.update(full=1), "full"),
    (lambda w: w.pop("full"), "full"),
    (lambda w: w.update(source={"service": "x"}), "source"),
    (lambda w: w.update(counters=[["inferswarm_nope_total", [], 1]]), "not a pushed counter"),
    (lambda w: w.update(counters=[["inferswarm_active_users", ["1h"], 1]]), "not a pushed counter"),
    (lambda w: w.update(gauges=[["inferswarm_active_users", ["1h"], 1]]), "not a pushed gauge"),
    (lambda w: w.update(counters=[[REQUESTS.name, ["gateway"], 1]]), "takes labels"),
    (lambda w: w.update(counters=[[REQUESTS.name, ["a", "b.c", "OK"], -1]]), "finite number >= 0"),
    (lambda w: w.update(counters=[[REQUESTS.name, ["a", "b.c", "OK"], "1"]]), "finite number >= 0"),
    (lambda w: w.update(gauges=[[DHT_PEERS.name, ["a", "b"], float("nan")]]), "finite"),
    (lambda w: w.update(histograms=[[REQUEST_DURATION.name, ["a", "m"], [1, 2], 0.5]]), "bucket counts"),
    (lambda w: w.update(histograms=[[REQUEST_DURATION.name, ["a", "m"], [0] * (len(REQUEST_DURATION.buckets) + 1), -0.5]]), "finite number >= 0"),
    (lambda w: w.update(histograms=[[REQUEST_DURATION.name, ["a", "m"], [-1] * (len(REQUEST_DURATION.buckets) + 1), 0.5]]), "bucket counts"),
    (lambda w: w.update(counters=[[REQUESTS.name, ["a", "b.c", "OK"], 1]] * 30), "at most"),
])
def test_invalid_batches_are_refused_whole(change, message):
    wire = Batch().to_wire(SOURCE, 1)
    change(wire)
    with pytest.raises(InvalidParams, match=message):
        parse_batch(wire, max_entries=20)


def test_service_side_parsing_folds_again():
    wire = Batch().to_wire(SOURCE, 1)
    wire["counters"] = [[REQUESTS.name, ["gateway", "gateway.infer", "user@example.com"], 1]]
    _, _, parsed = parse_batch(wire)
    assert list(parsed.counters) == [(REQUESTS.name, ("gateway", "gateway.infer", OTHER))]


def test_recording_is_cheap():
    metrics = Metrics()
    requests = metrics.counter(REQUESTS)
    started = time.perf_counter()
    for _ in range(20_000):
        requests.inc(service="gateway", method="gateway.infer", code="OK")
    per_call = (time.perf_counter() - started) / 20_000
    assert per_call < 20e-6, f"{per_call * 1e6:.1f} us per inc"
