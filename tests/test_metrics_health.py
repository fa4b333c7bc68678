"""Health on a real mesh: a killed process is unreachable within seconds and its
record gone within its TTL; the rollup; worker capacity from DHT records;
active users from a real auth service; `python -m services.metrics`."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from shared.dht import model_topic, service_topic
from shared.rpc import method
from services.auth.app import open_auth
from auth_support import cheap_config
from metrics_support import TTL, Child, eventually, get_health, mesh, samples, scrape, value
import pytest


def instance(report: dict, name: str) -> dict | None:
    return next((i for i in report["instances"] if i["instance"] == name), None)


@pytest.mark.rpc
async def test_a_killed_service_is_unreachable_within_seconds_and_gone_within_its_ttl(tmp_path):
    async with mesh(tmp_path) as net:
        app = await net.start_metrics()
        # The victim: a real `python -m services.metrics` process, with its own HTTP port.
        victim = Child(["-m", "services.metrics"], net.env("victim", INFERSWARM_METRICS_PORT="0"))
        async with victim:
            ready = victim.ready
            assert ready["ready"] == "metrics" and ready["http"].startswith("http://127.0.0.1:")
            status, own = await get_health(ready["http"])  # its own view: no auth, gateway, inference
            assert status == 503 and own["status"] == "down" and own["services"]["auth"]["required"]

            def victim_entry() -> dict | None:
                report = app.health.report()
                return next((i for i in report["instances"]
                             if i["endpoint"] == ready["endpoint"] and i["status"] == "ok"), None)

            name = (await eventually(victim_entry, timeout=5))["instance"]
            assert app.health.report()["status"] == "ok"
            await victim.kill()
            killed = time.monotonic()
            await eventually(lambda: not instance(app.health.report(), name)["reachable"], timeout=3)
            unreachable_after = time.monotonic() - killed
            report = app.health.report()
            assert instance(report, name)["status"] == "unreachable" and instance(report, name)["error"]
            assert report["services"]["metrics"]["status"] == "degraded"
            assert report["status"] == "degraded"  # the one required service still has a live instance
            parsed = samples(await scrape(app.http.url))
            assert value(parsed, "inferswarm_service_up", service="metrics", instance=name) == 0
            assert value(parsed, "inferswarm_system_status", status="degraded") == 1

            # Gone: its record expires TTL after its last refresh (+ the 1 s lookup cache).
            await eventually(lambda: not instance(app.health.report(), name)["announced"], timeout=TTL + 2)
            gone_after = time.monotonic() - killed
            assert instance(app.health.report(), name)["status"] == "gone"
            status, report = await get_health(app.http.url)
            assert status == 200 and instance(report, name)["announced"] is False
            print(f"unreachable after {unreachable_after:.2f}s, record gone after {gone_after:.2f}s")


@pytest.mark.rpc
async def test_health_over_rpc_and_a_required_service_missing_is_down(tmp_path):
    async with mesh(tmp_path) as net:
        app = await net.start_metrics(required=("metrics", "gateway"))
        await eventually(lambda: app.health.report()["services"]["metrics"]["ok"] == 1, timeout=5)
        report = await net.seed.mesh("metrics").call("metrics.health", idempotent=True)
        assert report["status"] == "down"
        assert report["services"]["gateway"] == {"status": "absent", "required": True, "instances": 0, "ok": 0}
        status, body = await get_health(app.http.url)
        assert status == 503 and body["status"] == "down"
        assert value(samples(await scrape(app.http.url)), "inferswarm_system_status", status="down") == 1


class Worker:
    """A stand-in inference worker, announced by the real runner as the real one is:
    scalar load on its records, per-model figures on each model's topic."""

    name = "inference"

    def __init__(self, in_use: int, queued: int) -> None:
        self.in_use, self.queued = in_use, queued

    @method(idempotent=True)
    async def models(self) -> dict:
        return {"worker": "w", "models": [{"name": "smollm2"}]}

    def load(self) -> dict:
        return {"models": 1, "free_slots": 2 - self.in_use, "queued": self.queued, "healthy": True}

    def topic_load(self, topic: str) -> dict:
        if topic != model_topic("smollm2"):
            return {}
        return {"free_slots": 2 - self.in_use, "slots": 2, "queued": self.queued, "queue_limit": 8}


@pytest.mark.rpc
async def test_worker_capacity_comes_from_the_workers_records(tmp_path):
    async with mesh(tmp_path) as net:
        app = await net.start_metrics()
        for n, (in_use, queued) in enumerate([(1, 3), (2, 0)]):
            worker = Worker(in_use, queued)

            async def build(stack: AsyncExitStack, node: object, worker: Worker = worker) -> list[object]:
                return [worker]

            await net.serve("inference", build, f"worker{n}", load=worker.load, topic_load=worker.topic_load,
                            topics=[model_topic("smollm2"), service_topic("inference")])

        def capacity() -> dict | None:
            report = app.health.report()
            return report if report["models"].get("smollm2", {}).get("workers") == 2 else None

        report = await eventually(capacity, timeout=8)
        assert report["models"]["smollm2"] == {"workers": 2, "slots": 4, "slots_free": 1, "queue_depth": 3}
        assert report["services"]["inference"]["ok"] == 2
        assert all(i["models"] == ["smollm2"] for i in report["instances"] if i["service"] == "inference")
        parsed = samples(await scrape(app.http.url))
        assert value(parsed, "inferswarm_workers", model="smollm2") == 2
        assert value(parsed, "inferswarm_worker_slots", model="smollm2") == 4
        assert value(parsed, "inferswarm_worker_slots_free", model="smollm2") == 1
        assert value(parsed, "inferswarm_worker_queue_depth", model="smollm2") == 3


@pytest.mark.db
async def test_active_users_come_from_auth_periodically(tmp_path, pg_dsn):
    async with mesh(tmp_path) as net:
        services = []

        async def build(stack: AsyncExitStack, node: object) -> list[object]:
            services.append(await open_auth(stack, cheap_config(tmp_path / "auth"), pg_dsn))
            return services

        await net.serve("auth", build, "auth")
        app = await net.start_metrics()
        auth = services[0]
        now = time.time()
        for n, ago in enumerate((10, 7200)):
            user = await auth.register(f"user{n}", f"user{n}@example.com", "correct horse battery staple")
            await auth.record_usage([{"request_id": f"r{n}", "user_id": user["id"], "model": "smollm2",
                                      "status": "ok", "at": now - ago}])

        def active() -> bool:
            parsed = samples(app.exposition.render().decode())
            return (value(parsed, "inferswarm_active_users", time_window="1h") == 1
                    and value(parsed, "inferswarm_active_users", time_window="24h") == 2)

        await eventually(active, timeout=5)  # refreshed every 0.5 s here, never per scrape
        assert app.active_users.error is None and app.active_users.fetched_at is not None
