"""Inference workers on a real mesh: DHT nodes, CurveZMQ RPC and the runner on
loopback. Two workers announcing the same model are both found with their
per-model load; a stream works end to end; a cancel from the caller frees the
worker's slot; load changes are re-announced; `python -m services.inference`
starts a worker that answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from shared.config import MeshConfig, Secret, load  # noqa: E402
from shared.dht import model_topic, service_topic  # noqa: E402
from shared.errors import InvalidParams  # noqa: E402
from shared.identity import MeshCredential  # noqa: E402
from shared.runner import join_mesh, serve  # noqa: E402
from services.inference.config import InferenceConfig  # noqa: E402
from services.inference.worker import InferenceWorker  # noqa: E402

pytestmark = pytest.mark.rpc

ROOT = Path(__file__).resolve().parent.parent
MODELS = '{"smollm2": {"backend": "local", "slots": 1, "queue": 4, "n_threads": 1}}'
TOPIC = model_topic("smollm2")
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
LONG = [{"role": "user", "content": "Write a very long story about a lighthouse keeper and the sea."}]


def worker_env(data_dir: Path, secret: str, seed: str) -> dict[str, str]:
    return {
        "INFERSWARM_DATA_DIR": str(data_dir), "INFERSWARM_MESH_SECRET": secret, "INFERSWARM_BOOTSTRAP": seed,
        "INFERSWARM_RECORD_TTL": "3", "INFERSWARM_MODELS": MODELS, "INFERSWARM_LOG_LEVEL": "warning",
    }


async def eventually(check, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


@pytest.fixture
async def mesh(tmp_path):
    """A client node and two workers serving "smollm2"."""
    secret = MeshCredential.new_secret().hex()
    async with AsyncExitStack() as stack:
        client = await join_mesh(stack, "client", MeshConfig(
            data_dir=tmp_path / "client", mesh_secret=Secret(secret), record_ttl=3.0))
        workers, tasks, stop = [], [], asyncio.Event()
        for name in ("w1", "w2"):
            config = load(InferenceConfig, worker_env(tmp_path / name, secret, client.discovery.address))
            worker = InferenceWorker(config)
            ready: list[dict] = []
            tasks.append(asyncio.create_task(serve(
                "inference", worker.build, config.mesh, topics=worker.topics, load=worker.load,
                topic_load=worker.topic_load, ready=ready.append, stop=stop)))
            workers.append((worker, ready))
        for _worker, ready in workers:
            for _ in range(200):
                if ready or any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.05)
            assert ready, [t.exception() for t in tasks if t.done()]
        try:
            yield client, [w for w, _ in workers]
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 20)


async def test_two_workers_of_one_model_are_both_found_with_their_load(mesh):
    client, workers = mesh
    providers = await eventually(lambda: _providers(client, TOPIC, 2))
    ids = {w.service.worker_id for w in workers}
    assert {p.node_hex for p in providers} == ids
    for provider in providers:
        load = provider.load
        assert (load["free_slots"], load["slots"], load["queued"], load["queue_limit"]) == (1, 1, 0, 4)
        assert load["healthy"] is True and "tokens_per_s" in load and "in_flight" in load
    services = await client.discovery.lookup(service_topic("inference"))
    assert {p.node_hex for p in services} == ids
    assert all(p.load["models"] == 1 for p in services)


async def _providers(client, topic: str, count: int):
    try:
        found = await client.discovery.lookup(topic)
    except Exception:
        return None
    return found if len(found) >= count else None


async def test_a_stream_over_rpc_end_to_end(mesh):
    client, workers = mesh
    await eventually(lambda: _providers(client, TOPIC, 2))
    params = {"model": "smollm2", "messages": CHAT, "max_tokens": 24, "temperature": 0.0, "seed": 3}
    stream = await client.mesh.topic(TOPIC).stream("inference.generate", params, timeout=30)
    chunks = [chunk async for chunk in stream]
    final = chunks[-1]
    assert final["done"] and final["usage"]["completion_tokens"] > 0
    assert all(set(c) == {"text"} for c in chunks[1:-1]) and len(chunks) > 3
    assert chunks[0]["prompt_tokens"] == final["usage"]["prompt_tokens"]  # the local model's count, early
    assert final["worker"]["id"] in {w.service.worker_id for w in workers}
    assert final["worker"]["load"]["free_slots"] == 1
    # The same request, not streamed, on a given worker: the same text.
    provider = next(p for p in await client.discovery.lookup(TOPIC) if p.node_hex == final["worker"]["id"])
    connection = client.mesh.connection(provider)
    whole = [c async for c in await connection.stream("inference.generate", {**params, "stream": False})]
    assert whole[0]["text"] == "".join(c["text"] for c in chunks[:-1])
    models = await connection.call("inference.models")
    assert models["models"][0]["name"] == "smollm2" and models["models"][0]["backend"] == "local"
    status = await connection.call("inference.model_status", {"model": "smollm2"})
    assert status["healthy"] and status["requests"] >= 1
    # The gateway's request id rides along for the worker's log lines; a malformed one is refused.
    sent = [c async for c in await connection.stream("inference.generate", {**params, "request_id": "gw-0a1b"})]
    assert sent[-1]["done"]
    for bad in ("gw 0a1b", "x" * 65, "gw-\u00e9", "../etc"):
        with pytest.raises(InvalidParams) as refused:
            [c async for c in await connection.stream("inference.generate", {**params, "request_id": bad})]
        assert refused.value.data["param"] == "request_id"


async def test_a_cancel_from_the_caller_frees_the_slot_and_load_is_reannounced(mesh):
    client, workers = mesh
    providers = await eventually(lambda: _providers(client, TOPIC, 2))
    provider = providers[0]
    worker = next(w for w in workers if w.service.worker_id == provider.node_hex)
    pool = worker.service.served["smollm2"].pool
    params = {"model": "smollm2", "messages": LONG, "max_tokens": 400, "temperature": 0.8}
    stream = await client.mesh.connection(provider).stream("inference.generate", params, timeout=60)
    for _ in range(3):
        await anext(stream)
    assert pool.in_use == 1

    async def busy_announced():
        found = await client.discovery.lookup(TOPIC)
        return any(p.node_hex == provider.node_hex and p.load["free_slots"] == 0 for p in found)

    await eventually(busy_announced, timeout=6)
    started = time.monotonic()
    await stream.aclose()  # sends CANCEL
    while pool.in_use and time.monotonic() - started < 2:
        await asyncio.sleep(0.002)
    freed = time.monotonic() - started
    assert pool.in_use == 0 and freed < 0.2, f"slot freed after {freed * 1000:.0f} ms"


async def test_python_m_services_inference_starts_a_worker(tmp_path):
    secret = MeshCredential.new_secret().hex()
    async with AsyncExitStack() as stack:
        client = await join_mesh(stack, "client", MeshConfig(data_dir=tmp_path / "c", mesh_secret=Secret(secret)))
        env = {**os.environ, **worker_env(tmp_path / "w", secret, client.discovery.address)}
        proc = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            ready = json.loads(line)
            assert ready["ready"] == "inference"
            stream = await client.mesh.topic(TOPIC).stream(
                "inference.generate", {"model": "smollm2", "prompt": "The sea is", "max_tokens": 5}, timeout=30)
            chunks = [c async for c in stream]
            assert chunks[-1]["usage"]["completion_tokens"] == 5
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0


def test_a_bad_catalog_stops_the_worker_at_start_with_the_problem(tmp_path):
    env = {**os.environ, "INFERSWARM_DATA_DIR": str(tmp_path), "INFERSWARM_MODELS": '{"m": {"backend": "vllm"}}'}
    done = subprocess.run([sys.executable, "-m", "services.inference"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "INFERSWARM_MODELS: model 'm': backend must be one of" in done.stderr
