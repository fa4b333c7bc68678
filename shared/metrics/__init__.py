"""Metrics for every service: declared families, an in-process registry, and a
reporter that pushes cumulative values to every metrics service over the mesh.

    from shared.metrics import REQUESTS, Metrics, MetricsReporter

    metrics = Metrics()
    await stack.enter_async_context(MetricsReporter.for_node(node, metrics, service="gateway"))
    metrics.counter(REQUESTS).inc(service="gateway", method="gateway.infer", code="OK")

`families` names every family (the metrics service and its clients agree
through it), `registry` records, `batch` is the wire format of
`metrics.record`, `reporter` pushes, `process` samples the process's own figures. See services/metrics/README.md.
"""

from shared.metrics.batch import MAX_ENTRIES, Batch, Source, parse_batch
from shared.metrics.families import (
    ACTIVE_USERS,
    BUDGET_ALERTS,
    BUILD_INFO,
    FALLBACKS,
    CACHE_HITS,
    CACHE_MISSES,
    DHT_PEERS,
    FAMILIES,
    HTTP_REQUEST_DURATION,
    HTTP_REQUESTS,
    OTHER,
    PROCESS_CPU,
    PROCESS_OPEN_FDS,
    PROCESS_RESIDENT_MEMORY,
    PROCESS_START_TIME,
    PYTHON_GC_COLLECTIONS,
    QUEUE_WAIT,
    RATE_LIMIT_VIOLATIONS,
    MODEL_REQUEST_DURATION,
    MODEL_REQUESTS,
    REQUEST_DURATION,
    REQUESTS,
    RPC_ERRORS,
    SERIES_CAP,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    TOKENS_PER_REQUEST,
    Family,
    Kind,
    Label,
    family,
    instance_id,
)
from shared.metrics.process import ProcessSampler
from shared.metrics.registry import Counter, Gauge, Histogram, Metrics
from shared.metrics.reporter import Directory, MeshDirectory, MetricsReporter, OneDestination, Sender

__all__ = [
    "ACTIVE_USERS",
    "BUDGET_ALERTS",
    "BUILD_INFO",
    "FALLBACKS",
    "Batch",
    "CACHE_HITS",
    "CACHE_MISSES",
    "Counter",
    "DHT_PEERS",
    "Directory",
    "FAMILIES",
    "Family",
    "Gauge",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_DURATION",
    "Histogram",
    "Kind",
    "Label",
    "MAX_ENTRIES",
    "Metrics",
    "MeshDirectory",
    "MetricsReporter",
    "OneDestination",
    "OTHER",
    "PROCESS_CPU",
    "PROCESS_OPEN_FDS",
    "PROCESS_RESIDENT_MEMORY",
    "PROCESS_START_TIME",
    "PYTHON_GC_COLLECTIONS",
    "ProcessSampler",
    "QUEUE_WAIT",
    "RATE_LIMIT_VIOLATIONS",
    "MODEL_REQUESTS",
    "MODEL_REQUEST_DURATION",
    "REQUESTS",
    "REQUEST_DURATION",
    "RPC_ERRORS",
    "SERIES_CAP",
    "Sender",
    "Source",
    "TIME_PER_OUTPUT_TOKEN",
    "TIME_TO_FIRST_TOKEN",
    "TOKENS",
    "TOKENS_PER_REQUEST",
    "family",
    "instance_id",
    "parse_batch",
]
