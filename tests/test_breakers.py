"""Circuit breakers per model backend, from the user's side: a real DHT mesh, real
inference workers served by the runner over CurveZMQ, a real Ollama-protocol
server failing on command, and the real metrics service (its /health, its
Prometheus exposition), whose report the status page and `inferswarm status`
render.

A breaker opens after INFERSWARM_BREAKER_FAILURES backend failures in a row;
requests then fail fast (`reason: "breaker_open"`) without reaching the server,
and the worker withdraws the model's topic from the DHT. Once the server is
healed, the periodic probe closes the breaker and the model is announced
again. Upstream keys a backend reports are shown and counted the same way.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from shared.dht import model_topic, service_topic
from shared.errors import NoProviders, Unavailable
from shared.runner import MeshNode
from services.inference.backends.echo import EchoBackend
from services.inference.cache import ResponseCache
from services.inference.catalog import parse_models
from services.inference.config import InferenceConfig
from services.inference.health import ModelHealth
from services.inference.service import InferenceService, ServedModel
from services.inference.slots import SlotPool
from services.inference.worker import InferenceWorker
from services.web.views import make_environment
from inferswarm.commands import status_text
from metrics_support import Mesh, eventually, get_health, mesh, samples, scrape, value
from ollama_server import OllamaServer

pytestmark = pytest.mark.rpc

MODEL = "llama3"
TOPIC = model_topic(MODEL)
CHAT = [{"role": "user", "content": "Say hello."}]


async def generate(node: MeshNode, provider: Any, model: str = MODEL) -> list[dict[str, Any]]:
    stream = await node.mesh.connection(provider).stream(
        "inference.generate", {"model": model, "messages": CHAT, "max_tokens": 8}, timeout=10)
    return [chunk async for chunk in stream]


async def providers(node: MeshNode, topic: str) -> list[Any]:
    try:
        return await node.discovery.lookup(topic)
    except NoProviders:
        return []


def worker_entry(report: dict[str, Any], worker_id: str) -> dict[str, Any] | None:
    return next((i for i in report["instances"] if i["service"] == "inference"
                 and worker_id.startswith(i["instance"]) and i["status"] == "ok"), None)


def status_page(report: dict[str, Any]) -> str:
    """The web service's status page (services/web/templates/status.html) for this report."""
    return make_environment().get_template("status.html").render(
        user=None, csrf_field="csrf", csrf_token="", path="/status", report=report, error=None, now=time.time())


async def start_worker(net: Mesh, ollama: OllamaServer) -> InferenceWorker:
    catalog = f'{{"{MODEL}": {{"backend": "ollama", "url": "{ollama.url}", "model": "llama3:8b", "slots": 2}}}}'
    config = InferenceConfig(mesh=net.config("w1"), models_json=parse_models(catalog), probe_interval=0.3,
                             breaker_failures=5, breaker_cooldown=1.0)
    worker = InferenceWorker(config)
    await net.serve("inference", worker.build, "w1", topics=worker.topics, load=worker.load,
                    topic_load=worker.topic_load, hidden=worker.hidden)
    return worker


async def test_an_open_breaker_fails_fast_withdraws_the_model_and_the_healed_backend_brings_it_back(tmp_path):
    async with OllamaServer() as ollama, mesh(tmp_path) as net:
        app = await net.start_metrics()
        worker = await start_worker(net, ollama)
        assert worker.service is not None
        health = worker.service.served[MODEL].health
        worker_id = worker.service.worker_id
        client = net.seed
        (provider,) = await eventually(lambda: providers(client, TOPIC), timeout=10)
        assert (await generate(client, provider))[-1]["done"]

        # The backend fails: after 5 failures in a row (requests, and the prober's probes) the breaker opens.
        ollama.fail_status = 500
        backend_errors = 0
        while True:
            try:
                await generate(client, provider)
            except Unavailable as exc:
                if exc.data.get("reason") == "breaker_open":
                    refused = exc
                    break
                backend_errors += 1
            assert backend_errors <= 10, "the breaker never opened"
        assert backend_errors >= 1 and health.breaker.opened == 1
        assert health.breaker.view()["failures"] == 5  # it opened at the 5th failure in a row
        assert refused.data["retry_safe"] is True
        assert type(refused.data["retry_after"]) is int and refused.data["retry_after"] >= 1

        # While open: fail fast, the server sees nothing more.
        seen = ollama.calls
        for _ in range(3):
            with pytest.raises(Unavailable) as caught:
                await generate(client, provider)
            assert caught.value.data["reason"] == "breaker_open"
        assert ollama.calls == seen
        models = await client.mesh.connection(provider).call("inference.models")
        (entry,) = models["models"]
        assert entry["breaker"]["state"] in ("open", "half_open") and entry["breaker"]["opened"] == 1
        assert entry["keys"] is None  # the Ollama backend has no key pool
        status = await client.mesh.connection(provider).call("inference.model_status", {"model": MODEL})
        assert status["breaker"]["state"] in ("open", "half_open") and not status["healthy"]

        # The model's topic is withdrawn; the worker's own topic stays.
        await eventually(lambda: _without(client, TOPIC), timeout=5)
        assert [p.node_hex for p in await providers(client, service_topic("inference"))] == [worker_id]

        # The metrics service shows it: /health per worker, the Prometheus gauges.
        def breaker_shown() -> dict[str, Any] | None:
            entry = worker_entry(app.health.report(), worker_id)
            served = (entry or {}).get("served", {}).get(MODEL)
            return entry if served and served["breaker"]["state"] != "closed" else None

        await eventually(breaker_shown, timeout=5)
        code, report = await get_health(app.http.url)
        shown = worker_entry(report, worker_id)
        assert shown is not None and shown["served"][MODEL]["breaker"]["state"] in ("open", "half_open")
        parsed = samples(await scrape(app.http.url))
        not_closed = sum(value(parsed, "inferswarm_breaker_state", model=MODEL, state=s) or 0
                         for s in ("open", "half_open"))
        assert not_closed == 1 and value(parsed, "inferswarm_breaker_state", model=MODEL, state="closed") == 0
        # ... and so do the status page and `inferswarm status`.
        assert "breaker open" in status_page(report) or "breaker half-open" in status_page(report)
        text = status_text(report)
        assert "breaker" in text and MODEL in text.split("breaker", 1)[1]

        # Healed: the next probe (once half-open) closes the breaker, the model is announced again.
        ollama.heal()
        (back,) = await eventually(lambda: providers(client, TOPIC), timeout=20)
        assert back.node_hex == worker_id and health.breaker.state == "closed"
        assert (await generate(client, back))[-1]["done"]
        models = await client.mesh.connection(back).call("inference.models")
        assert models["models"][0]["breaker"]["state"] == "closed"

        def closed_counted() -> bool:
            parsed = samples(app.exposition.render().decode())
            return (value(parsed, "inferswarm_breaker_state", model=MODEL, state="closed") == 1
                    and value(parsed, "inferswarm_breaker_state", model=MODEL, state="open") == 0)

        await eventually(closed_counted, timeout=5)
        report = app.health.report()
        assert "Model backends" not in status_page(report)  # a closed breaker without keys: nothing to show
        assert "breaker" not in status_text(report)


async def _without(node: MeshNode, topic: str) -> bool:
    return not await providers(node, topic)


# -- upstream keys ---------------------------------------------------------------------------------

KEYS = [
    {"key": "key-1 …abcd", "state": "ok", "until": None, "requests": 12, "failures": 0, "prompt_tokens": 340,
     "completion_tokens": 120, "last_used": 1_800_000_000.0, "remaining_requests": 988,
     "remaining_tokens": 99_000, "limit_requests": 1000, "limit_tokens": 100_000, "last_status": 200},
    {"key": "key-2 …c3f9", "state": "disabled", "until": None, "requests": 3, "failures": 3, "prompt_tokens": 0,
     "completion_tokens": 0, "last_used": 1_800_000_000.0, "remaining_requests": None,
     "remaining_tokens": None, "limit_requests": None, "limit_tokens": None, "last_status": 401},
    {"key": "key-3 …9e01", "state": "exhausted", "until": 1_800_000_060.0, "requests": 50, "failures": 1,
     "prompt_tokens": 900, "completion_tokens": 400, "last_used": 1_800_000_000.0, "remaining_requests": 0,
     "remaining_tokens": 0, "limit_requests": 50, "limit_tokens": 5000, "last_status": 429},
]


class KeyedEcho(EchoBackend):
    """The echo backend, reporting a pool of upstream keys as the OpenAI and Anthropic backends do."""

    def keys_view(self) -> list[dict[str, Any]] | None:
        return [dict(k) for k in KEYS]


async def test_upstream_keys_are_shown_and_counted(tmp_path):
    async with mesh(tmp_path) as net:
        app = await net.start_metrics()
        services: list[InferenceService] = []

        async def build(stack: AsyncExitStack, node: MeshNode) -> list[object]:
            backend = KeyedEcho()
            await backend.start()
            served = {"gpt": ServedModel("gpt", backend, SlotPool(4, 8), ModelHealth(name="gpt"))}
            services.append(InferenceService(served, ResponseCache(ttl=0, max_entries=1, max_bytes=1), worker_id=node.identity.public_key.hex()))
            return services

        topics = [model_topic("gpt"), service_topic("inference")]
        await net.serve("inference", build, "keyed", topics=topics, load=lambda: services[0].load(),
                        topic_load=lambda t: services[0].topic_load(t), hidden=lambda: services[0].withdrawn_topics())
        (provider,) = await eventually(lambda: providers(net.seed, model_topic("gpt")), timeout=10)
        models = await net.seed.mesh.connection(provider).call("inference.models")
        assert models["models"][0]["keys"] == KEYS and models["models"][0]["breaker"]["state"] == "closed"
        status = await net.seed.mesh.connection(provider).call("inference.model_status", {"model": "gpt"})
        assert status["keys"] == KEYS

        def keys_shown() -> dict[str, Any] | None:
            entry = worker_entry(app.health.report(), provider.node_hex)
            return entry if (entry or {}).get("served", {}).get("gpt", {}).get("keys") else None

        await eventually(keys_shown, timeout=5)
        code, report = await get_health(app.http.url)
        assert worker_entry(report, provider.node_hex)["served"]["gpt"]["keys"] == KEYS
        parsed = samples(await scrape(app.http.url))
        counts = {s: value(parsed, "inferswarm_upstream_keys", model="gpt", state=s)
                  for s in ("ok", "exhausted", "disabled", "open")}
        assert counts == {"ok": 1, "exhausted": 1, "disabled": 1, "open": 0}
        assert value(parsed, "inferswarm_breaker_state", model="gpt", state="closed") == 1
        page = status_page(report)
        assert "key-2 …c3f9" in page and "disabled" in page and "988 req left" in page
        assert "breaker open" not in page and "breaker half-open" not in page
        text = status_text(report)
        lines = [line for line in text.splitlines() if "key-1" in line]
        assert len(lines) == 1 and "ok" in lines[0] and "12" in lines[0] and "988 requests" in lines[0]
        assert any("key-2" in line and "disabled" in line for line in text.splitlines())
