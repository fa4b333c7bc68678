"""Every metric family of the platform, in one place, so reporters and the
metrics service agree on names, kinds, label sets and histogram buckets.

Cardinality is bounded by construction:

* label sets are fixed per family and never hold a user id, key id or prompt
  (those live in PostgreSQL);
* a label with a closed set of values (`tier`, `status`, `code`, `service`...)
  folds any other value into `"other"`;
* an open label (`model`, `method`, `route`) accepts only short names of a safe shape,
  anything else is `"other"`; the number of series per family is capped on
  both sides of the wire (`SERIES_CAP`), further series fold into the family's
  all-`"other"` series.

Families marked `pushed=False` are produced by the metrics service itself
(health probes, DHT records, the active-user count); a reporter may not push them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shared.errors import ERROR_CLASSES

__all__ = [
    "OTHER",
    "SERIES_CAP",
    "Kind",
    "Label",
    "Family",
    "FAMILIES",
    "family",
    "instance_id",
    "REQUESTS",
    "REQUEST_DURATION",
    "MODEL_REQUESTS",
    "MODEL_REQUEST_DURATION",
    "RATE_LIMIT_VIOLATIONS",
    "TOKENS",
    "TIME_TO_FIRST_TOKEN",
    "CACHE_HITS",
    "CACHE_MISSES",
    "RPC_ERRORS",
    "DHT_PEERS",
    "BUDGET_ALERTS",
    "FALLBACKS",
    "PROCESS_RESIDENT_MEMORY",
    "PROCESS_OPEN_FDS",
    "PROCESS_START_TIME",
    "PROCESS_CPU",
    "PYTHON_GC_COLLECTIONS",
    "BUILD_INFO",
    "GATEWAY_USAGE_UNSHIPPED",
    "GATEWAY_DISPATCH_WAITING",
    "GATEWAY_DISPATCH_IN_FLIGHT",
    "GATEWAY_WORKER_RETRIES",
    "GATEWAY_STREAMS_CUT",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_DURATION",
    "TIME_PER_OUTPUT_TOKEN",
    "TOKENS_PER_REQUEST",
    "QUEUE_WAIT",
    "ACTIVE_USERS",
    "SERVICE_UP",
    "SERVICE_ANNOUNCED",
    "SERVICE_PING",
    "SYSTEM_STATUS",
    "WORKERS",
    "WORKER_SLOTS",
    "WORKER_SLOTS_FREE",
    "WORKER_QUEUE_DEPTH",
    "BREAKER_STATE",
    "UPSTREAM_KEYS",
    "METRICS_BATCHES",
    "METRICS_SERIES",
    "METRICS_OVERFLOW",
    "METRICS_SOURCES",
]

#: The value every unknown or unsafe label value is folded into.
OTHER = "other"
#: Series per family, reporter side and service side (the service's is configurable).
SERIES_CAP = 500

#: The services of the platform, as `service` label values.
SERVICES = ("auth", "gateway", "inference", "metrics", "web", "cli", "dht")
#: `code` of a request: "OK", or the stable error code it ended with.
CODES = ("OK", *ERROR_CLASSES)


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class Label:
    """One label of a family: a closed set of values, or an open name of a safe shape."""

    name: str
    values: frozenset[str] | None = None  #: closed set; None = open, checked by `shape`
    shape: re.Pattern[str] | None = None

    def fold(self, value: Any) -> str:
        """The value itself when allowed, else `OTHER`."""
        if type(value) is not str:
            return OTHER
        if self.values is not None:
            return value if value in self.values else OTHER
        return value if self.shape is not None and self.shape.fullmatch(value) else OTHER


def closed(name: str, values: Iterable[str]) -> Label:
    return Label(name, values=frozenset((*values, OTHER)))


# Model names as backends spell them: "smollm2-135m-instruct", "qwen2.5:0.5b", "org/model".
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+\-]{0,79}")
_METHOD = re.compile(r"[a-z][a-z0-9_]{0,31}\.[a-z][a-z0-9_]{0,47}")
_INSTANCE = re.compile(r"[0-9a-f]{12}")

SERVICE = closed("service", SERVICES)
METHOD = Label("method", shape=_METHOD)
RESULT_CODE = closed("code", CODES)
CODE = closed("code", ERROR_CLASSES)
MODEL = Label("model", shape=_MODEL)
TIER = closed("tier", ("free", "pro", "enterprise", "unlimited"))
DIRECTION = closed("direction", ("in", "out"))
WINDOW = closed("time_window", ("1h", "24h"))
INSTANCE = Label("instance", shape=_INSTANCE)
FAMILY = Label("family", shape=re.compile(r"inferswarm_[a-z_]{1,64}"))
RESULT = closed("result", ("ok", "duplicate", "unknown", "retired", "invalid"))
HEALTH = closed("status", ("ok", "degraded", "down"))
#: A circuit breaker's state (shared/breaker.py), and an upstream API key's (backends' `keys_view`).
BREAKER = closed("state", ("closed", "open", "half_open"))
KEY_STATE = closed("state", ("ok", "exhausted", "disabled", "open"))
FALLBACK_CODE = closed("code", ("UNAVAILABLE", "NOT_FOUND", "TIMEOUT", "RATE_LIMITED", "INVALID_PARAMS"))
BUDGET_COUNTER = closed("counter", ("spend_per_day", "spend_per_month"))
#: A Python garbage collector generation (`gc.get_stats()`).
GENERATION = closed("generation", ("0", "1", "2"))
#: The package version ("0.1.0", "1.2.0rc1", "0.1.0+local") and the Python minor version ("3.11").
BUILD_VERSION = Label("version", shape=re.compile(r"[0-9][0-9A-Za-z.+\-]{0,31}"))
PYTHON_VERSION = Label("python", shape=re.compile(r"[0-9]\.[0-9]{1,2}"))
#: An HTTP request of the web service: its route's template (`/api/auth/api-keys/{key_id}`, never the
#: raw path: the router bounds the values), its method and its status class.
ROUTE = Label("route", shape=re.compile(r"/[A-Za-z0-9_.{}/\-]{0,127}"))
HTTP_METHOD = closed("method", ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
HTTP_CODE = closed("code", ("1xx", "2xx", "3xx", "4xx", "5xx"))
#: An alert's threshold: a whole percentage 1..100 (at most 100 series with the counter's 2).
THRESHOLD = closed("threshold", (str(p) for p in range(1, 101)))

#: Seconds, from a cache hit (milliseconds) up to a reply that streams for five minutes (a
#: request's longest allowed time), or waits that long for a slot.
LONG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Seconds to the first token, up to the same five minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Seconds per generated token: a millisecond (a fast GPU) up to a stalled stream.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Tokens of one request, 1 .. 32768 in powers of 2.
TOKEN_BUCKETS = tuple(float(2 ** n) for n in range(16))


@dataclass(frozen=True, slots=True)
class Family:
    """A metric family: name, kind, help, its fixed labels and (histograms) buckets."""

    name: str
    kind: Kind
    help: str
    labels: tuple[Label, ...]
    buckets: tuple[float, ...] = ()
    pushed: bool = True  #: False: produced by the metrics service, never pushed
    label_names: tuple[str, ...] = field(init=False)
    overflow: tuple[str, ...] = field(init=False)  #: the series that absorbs folded ones

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_names", tuple(label.name for label in self.labels))
        object.__setattr__(self, "overflow", (OTHER,) * len(self.labels))
        if (self.kind is Kind.HISTOGRAM) != bool(self.buckets):
            raise ValueError(f"{self.name}: buckets are for histograms, and histograms need them")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{self.name}: buckets must increase")

    def fold(self, values: Sequence[Any]) -> tuple[str, ...]:
        """Label values in declared order, each folded to what its label allows."""
        return tuple(label.fold(value) for label, value in zip(self.labels, values, strict=True))


def _family(name: str, kind: Kind, help: str, *labels: Label, buckets: tuple[float, ...] = (),
            pushed: bool = True) -> Family:
    return Family(name, kind, help, labels, buckets, pushed)


C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM

# -- pushed by every service through `MetricsReporter` -------------------------------
REQUESTS = _family("inferswarm_requests_total", C,
                   "RPC requests handled, by service, method and result code (OK or the stable error code).",
                   SERVICE, METHOD, RESULT_CODE)
REQUEST_DURATION = _family("inferswarm_request_duration_seconds", H,
                           "Seconds an RPC request was handled, by service and method (a stream: until its end).",
                           SERVICE, METHOD, buckets=LONG_BUCKETS)
MODEL_REQUESTS = _family("inferswarm_model_requests_total", C,
                         "Admitted inference requests by the model that served (or failed) them and result code; "
                         "pushed by gateways.", MODEL, RESULT_CODE)
MODEL_REQUEST_DURATION = _family("inferswarm_model_request_duration_seconds", H,
                                 "Seconds from a gateway's admission of an inference request to its end, by model; "
                                 "pushed by gateways.", MODEL, buckets=LONG_BUCKETS)
RATE_LIMIT_VIOLATIONS = _family("inferswarm_rate_limit_violations_total", C,
                                "Requests refused by a rate limit or budget, by tier.", TIER)
TOKENS = _family("inferswarm_tokens_total", C, "Tokens processed: in (prompt) and out (completion).",
                 MODEL, DIRECTION)
TIME_TO_FIRST_TOKEN = _family("inferswarm_time_to_first_token_seconds", H,
                              "Seconds from request to the first generated token.", MODEL,
                              buckets=TTFT_BUCKETS)
CACHE_HITS = _family("inferswarm_cache_hits_total", C, "Responses served from the cache.", MODEL)
CACHE_MISSES = _family("inferswarm_cache_misses_total", C, "Cache lookups that missed.", MODEL)
RPC_ERRORS = _family("inferswarm_rpc_errors_total", C, "RPC errors, by service and stable error code.",
                     SERVICE, CODE)
DHT_PEERS = _family("inferswarm_dht_peers", G, "Contacts in the DHT routing table of each node.",
                    SERVICE, INSTANCE)
BUDGET_ALERTS = _family("inferswarm_budget_alerts_total", C,
                        "Spending alerts fired (a budget's threshold reached in its period), by budget "
                        "counter and threshold; pushed by auth.", BUDGET_COUNTER, THRESHOLD)
FALLBACKS = _family("inferswarm_fallbacks_total", C,
                    "Requests moved on to the next model of their chain after this model failed before its "
                    "first token, by how it failed; pushed by gateways.", MODEL, FALLBACK_CODE)
HTTP_REQUESTS = _family("inferswarm_http_requests_total", C,
                        "HTTP requests answered by the web service, by route template, method and status class.",
                        ROUTE, HTTP_METHOD, HTTP_CODE)
HTTP_REQUEST_DURATION = _family("inferswarm_http_request_duration_seconds", H,
                                "Seconds from a web request's arrival to the end of its reply's handling "
                                "(a streamed reply: the whole stream).", ROUTE, HTTP_METHOD, buckets=LONG_BUCKETS)
TIME_PER_OUTPUT_TOKEN = _family("inferswarm_time_per_output_token_seconds", H,
                                "Decode seconds per token after the first, (total - ttft) / (tokens - 1), of "
                                "generations of 2 tokens or more; pushed by gateways.", MODEL, buckets=TPOT_BUCKETS)
TOKENS_PER_REQUEST = _family("inferswarm_tokens_per_request", H,
                             "Tokens of one successful request: in (prompt) and out (completion); pushed by gateways.",
                             MODEL, DIRECTION, buckets=TOKEN_BUCKETS)
QUEUE_WAIT = _family("inferswarm_queue_wait_seconds", H,
                     "Seconds a generation waited for a worker's slot (its `queue_ms`); pushed by gateways.",
                     MODEL, buckets=LONG_BUCKETS)

# -- pushed for every process by `MetricsReporter` (shared/metrics/process.py) -----------
PROCESS_RESIDENT_MEMORY = _family("inferswarm_process_resident_memory_bytes", G,
                                  "Resident memory of the process, in bytes.", SERVICE, INSTANCE)
PROCESS_OPEN_FDS = _family("inferswarm_process_open_fds", G, "Open file descriptors of the process.",
                           SERVICE, INSTANCE)
PROCESS_START_TIME = _family("inferswarm_process_start_time_seconds", G,
                             "Start time of the process, in seconds since the epoch.", SERVICE, INSTANCE)
PROCESS_CPU = _family("inferswarm_process_cpu_seconds_total", C, "CPU time (user and system) of the process.",
                      SERVICE, INSTANCE)
PYTHON_GC_COLLECTIONS = _family("inferswarm_python_gc_collections_total", C,
                                "Collections of the Python garbage collector, by generation.",
                                SERVICE, INSTANCE, GENERATION)
BUILD_INFO = _family("inferswarm_build_info", G, "1 per process: its package and Python versions.",
                     SERVICE, INSTANCE, BUILD_VERSION, PYTHON_VERSION)

# -- pushed by gateways (services/gateway/gauges.py) --------------------------------------
GATEWAY_USAGE_UNSHIPPED = _family("inferswarm_gateway_usage_unshipped", G,
                                  "Usage records journaled by the gateway, not yet shipped to auth.",
                                  SERVICE, INSTANCE)
GATEWAY_DISPATCH_WAITING = _family("inferswarm_gateway_dispatch_waiting", G,
                                   "Requests waiting for one of the gateway's slots toward workers.",
                                   SERVICE, INSTANCE)
GATEWAY_DISPATCH_IN_FLIGHT = _family("inferswarm_gateway_dispatch_in_flight", G,
                                     "Requests holding one of the gateway's slots toward workers.",
                                     SERVICE, INSTANCE)
GATEWAY_WORKER_RETRIES = _family("inferswarm_gateway_worker_retries_total", C,
                                 "Workers replaced by the gateway before a request's first chunk.",
                                 SERVICE, INSTANCE)
GATEWAY_STREAMS_CUT = _family("inferswarm_gateway_streams_cut_total", C,
                              "Streams cut after some text was relayed.", SERVICE, INSTANCE)

# -- produced by the metrics service ---------------------------------------------------
ACTIVE_USERS = _family("inferswarm_active_users", G, "Distinct users with a request in the window.",
                       WINDOW, pushed=False)
SERVICE_UP = _family("inferswarm_service_up", G, "1 when the instance answers rpc.ping, else 0.",
                     SERVICE, INSTANCE, pushed=False)
SERVICE_ANNOUNCED = _family("inferswarm_service_announced", G,
                            "1 while the instance has a live DHT record, else 0.", SERVICE, INSTANCE,
                            pushed=False)
SERVICE_PING = _family("inferswarm_service_ping_seconds", G, "Latency of the last rpc.ping.",
                       SERVICE, INSTANCE, pushed=False)
SYSTEM_STATUS = _family("inferswarm_system_status", G,
                        "1 for the current rollup of the whole system, 0 for the others.", HEALTH,
                        pushed=False)
WORKERS = _family("inferswarm_workers", G, "Reachable inference workers announcing the model.", MODEL,
                  pushed=False)
WORKER_SLOTS = _family("inferswarm_worker_slots", G, "Generation slots of reachable workers.", MODEL,
                       pushed=False)
WORKER_SLOTS_FREE = _family("inferswarm_worker_slots_free", G, "Free generation slots of reachable workers.",
                            MODEL, pushed=False)
WORKER_QUEUE_DEPTH = _family("inferswarm_worker_queue_depth", G, "Requests queued for a slot.", MODEL,
                             pushed=False)
BREAKER_STATE = _family("inferswarm_breaker_state", G,
                        "Reachable inference workers per model whose circuit breaker over the model's backend is "
                        "in that state (open or half_open: the worker has withdrawn the model).", MODEL, BREAKER,
                        pushed=False)
UPSTREAM_KEYS = _family("inferswarm_upstream_keys", G,
                        "Upstream API keys of a model's backend, summed over reachable workers, by key state.",
                        MODEL, KEY_STATE, pushed=False)
METRICS_BATCHES = _family("inferswarm_metrics_batches_total", C, "Batches received by the metrics service.",
                          RESULT, pushed=False)
METRICS_SERIES = _family("inferswarm_metrics_series", G, "Series held per family.", FAMILY, pushed=False)
METRICS_OVERFLOW = _family("inferswarm_metrics_series_overflow_total", C,
                           "Samples folded into the all-'other' series (or dropped, for gauges) "
                           "because a family reached its series cap.", FAMILY, pushed=False)
METRICS_SOURCES = _family("inferswarm_metrics_sources", G, "Reporting processes heard from recently.",
                          pushed=False)

FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        REQUESTS, REQUEST_DURATION, MODEL_REQUESTS, MODEL_REQUEST_DURATION, RATE_LIMIT_VIOLATIONS, TOKENS, TIME_TO_FIRST_TOKEN, CACHE_HITS,
        CACHE_MISSES, RPC_ERRORS, DHT_PEERS, BUDGET_ALERTS, FALLBACKS, HTTP_REQUESTS, HTTP_REQUEST_DURATION,
        TIME_PER_OUTPUT_TOKEN, TOKENS_PER_REQUEST, QUEUE_WAIT,
        PROCESS_RESIDENT_MEMORY, PROCESS_OPEN_FDS, PROCESS_START_TIME, PROCESS_CPU, PYTHON_GC_COLLECTIONS,
        BUILD_INFO, GATEWAY_USAGE_UNSHIPPED, GATEWAY_DISPATCH_WAITING, GATEWAY_DISPATCH_IN_FLIGHT,
        GATEWAY_WORKER_RETRIES, GATEWAY_STREAMS_CUT, ACTIVE_USERS, SERVICE_UP, SERVICE_ANNOUNCED, SERVICE_PING,
        SYSTEM_STATUS, WORKERS, WORKER_SLOTS, WORKER_SLOTS_FREE, WORKER_QUEUE_DEPTH, BREAKER_STATE,
        UPSTREAM_KEYS, METRICS_BATCHES,
        METRICS_SERIES, METRICS_OVERFLOW, METRICS_SOURCES,
    )
}


def family(name: str | Family) -> Family:
    """The declared family of that name; `KeyError` names the unknown one."""
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown metric family {name!r}: declare it in shared/metrics/families.py") from None


def instance_id(node_key: bytes) -> str:
    """The `instance` label of a node: the first 12 hex digits of its public key."""
    return node_key.hex()[:12]
