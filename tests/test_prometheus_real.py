"""A real Prometheus (Debian's) scraping two metrics services of one mesh.

The whole stack runs (`inferswarm up`), a second metrics service joins it as
an operator would start one (`python -m services.metrics` on the mesh), and
Prometheus scrapes both, with the deploy's rules loaded. After a short load
through `/v1` (the official openai SDK), Prometheus's own query API must show
the same `gateway.infer` totals from both services, and the per-model
histograms on both.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from stack import free_tcp_port
from waiting import wait_until_sync
from web_support import MODEL, new_key, web_stack

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus"
REQUESTS = 24  #: the load: bounded in count, 4 at a time


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("prometheus-real")) as running:
        yield running


def _start_metrics(stack, root: Path, port: int) -> subprocess.Popen:
    """A second metrics service, on the mesh of `stack`, with its own node name and port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_") and k != "DATABASE_URL"}
    env.update({"INFERSWARM_DATA_DIR": str(stack.data_dir), "INFERSWARM_NODE_NAME": "metrics-2",
                "INFERSWARM_BOOTSTRAP": stack.bootstrap, "INFERSWARM_METRICS_PORT": str(port),
                "INFERSWARM_LOG_LEVEL": "warning"})
    stderr = open(root / "metrics-2.stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "services.metrics"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line, f"the second metrics service exited: {(root / 'metrics-2.stderr').read_text()[-2000:]}"
    assert json.loads(line)["ready"] == "metrics"
    return proc


def _start_prometheus(root: Path, targets: dict[str, str], port: int) -> subprocess.Popen:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: install Debian's `prometheus` package"
    rule_files = sorted(str(p) for p in RULES.glob("*.yml") if p.name not in ("prometheus.yml",)
                        and not p.name.endswith("_test.yml"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": [
            {"job_name": job, "honor_labels": True, "metrics_path": "/metrics",
             "static_configs": [{"targets": [target]}]} for job, target in targets.items()],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(root / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:  # not listening yet, or 503 while it loads
        return False


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as reply:
        answer = json.loads(reply.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _by_job(port: int, promql: str) -> dict[str, float]:
    return {row["metric"]["job"]: float(row["value"][1]) for row in _query(port, promql)}


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_prometheus_sees_the_same_totals_on_two_metrics_services(stack, tmp_path):
    second_port, prometheus_port = free_tcp_port(), free_tcp_port()
    metrics_2 = _start_metrics(stack, tmp_path, second_port)
    prometheus = None
    try:
        first = urllib.parse.urlsplit(stack.ready["metrics"]).netloc
        prometheus = _start_prometheus(tmp_path, {"metrics-a": first, "metrics-b": f"127.0.0.1:{second_port}"},
                                       prometheus_port)
        wait_until_sync(lambda: _ready(prometheus_port), 60, interval=0.2, message="Prometheus never started")
        wait_until_sync(lambda: _by_job(prometheus_port, "up") == {"metrics-a": 1.0, "metrics-b": 1.0}, 60,
                        interval=0.5, message="Prometheus never scraped both metrics services")
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/api/v1/rules",
                                                  timeout=5).read())["data"]["groups"]
        assert rules and all(group["rules"] for group in rules)  # the deploy's rules load in a real Prometheus

        api_key = new_key(stack, "prometheus-pia")

        async def load(count: int) -> int:
            sdk = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0)
            gate = asyncio.Semaphore(4)

            async def one(i: int) -> int:
                async with gate:
                    stream = i % 2 == 1
                    reply = await sdk.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=6,
                        stream=stream)
                    if stream:
                        return int(bool([chunk async for chunk in reply]))
                    return int(bool(reply.choices[0].message.content))

            return sum(await asyncio.gather(*(one(i) for i in range(count))))

        assert asyncio.run(load(REQUESTS)) == REQUESTS
        infer = 'sum by (job) (inferswarm_requests_total{service="gateway",method="gateway.infer",code="OK"})'

        def same_totals() -> dict[str, float] | None:
            totals = _by_job(prometheus_port, infer)
            if set(totals) == {"metrics-a", "metrics-b"} and len(set(totals.values())) == 1 \
                    and totals["metrics-a"] >= REQUESTS:
                return totals
            return None

        totals = wait_until_sync(same_totals, 60, interval=0.5,
                                 message="the two metrics services never showed the same gateway.infer totals")
        assert totals["metrics-a"] == REQUESTS  # nothing else called gateway.infer on this stack
        for family in ("inferswarm_time_to_first_token_seconds_count", "inferswarm_model_request_duration_seconds_count",
                       "inferswarm_tokens_per_request_count"):
            wanted = f'sum by (job) ({family}{{model="{MODEL}"}})'
            counts = wait_until_sync(lambda w=wanted: (c := _by_job(prometheus_port, w)) and len(c) == 2 and c, 30,
                                     interval=0.5, message=f"{family} missing on a metrics service")
            assert counts["metrics-a"] == counts["metrics-b"] > 0, (family, counts)
        median = ("histogram_quantile(0.5, sum by (le, job) (rate("
                  f'inferswarm_model_request_duration_seconds_bucket{{model="{MODEL}"}}[1m])))')
        # rate() needs growth Prometheus saw: a second wave, once the series exist on both.
        assert asyncio.run(load(REQUESTS // 3)) == REQUESTS // 3

        def finite() -> dict[str, float] | None:
            found = _by_job(prometheus_port, median)
            return found if len(found) == 2 and all(v == v for v in found.values()) else None  # NaN: no growth yet

        medians = wait_until_sync(finite, 30, interval=0.5, message="no median request duration from a metrics service")
        assert all(0 < seconds < 5 for seconds in medians.values()), medians  # a 6-token reply of the test server
    finally:
        if prometheus is not None:
            _stop(prometheus)
        _stop(metrics_2)
