"""Embedding models on inference workers: the local MiniLM (the real int8 ONNX
model), models on the Ollama and OpenAI protocol servers in tests/ (real
HTTP), the catalog and parameter refusals, and `inference.embed` over a
real mesh (DHT, CurveZMQ RPC, the runner on loopback)."""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from ollama_server import OllamaServer, hash_vector
from openai_server import OpenAIServer
from waiting import wait_until

from shared.config import ConfigError, MeshConfig, Secret, load
from shared.dht import model_topic
from shared.embedding import MAX_INPUTS, build_embed_request
from shared.errors import InvalidParams, NotFound, Unavailable
from shared.generation import Limits
from shared.identity import MeshCredential
from shared.runner import join_mesh, serve
from services.inference.backends.echo import EchoBackend
from services.inference.backends.embedding import unpack_vector
from services.inference.backends.minilm import LocalEmbedder, default_tokenizer
from services.inference.cache import ResponseCache
from services.inference.catalog import parse_models
from services.inference.config import InferenceConfig
from services.inference.health import ModelHealth
from services.inference.service import InferenceService, ServedModel
from services.inference.slots import SlotPool
from services.inference.worker import InferenceWorker, open_service

GUITAR, GUITAR_TOO, MARKET = "A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."
LOCAL = {"minilm": {"backend": "local", "kind": "embedding", "n_threads": 1}, "echo": {"backend": "echo"}}


def cosine(a: bytes, b: bytes) -> float:
    x, y = unpack_vector(a), unpack_vector(b)
    return sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))


def norm(vector: bytes) -> float:
    return math.sqrt(sum(v * v for v in unpack_vector(vector)))


async def start_service(stack: AsyncExitStack, models: dict, **env: str):
    environ = {"INFERSWARM_MODELS": json.dumps(models), "INFERSWARM_PROBE_INTERVAL": "0.2", **env}
    return await open_service(stack, load(InferenceConfig, environ), worker_id="test-worker", environ=environ)


@pytest.fixture(scope="module")
def minilm():
    """The model, loaded once for the module: a sync fixture with its own
    short-lived loops (as conftest's pg_server), since the embedder's threads
    belong to no event loop."""
    embedder = LocalEmbedder(n_threads=1)
    asyncio.run(embedder.start())
    yield embedder
    asyncio.run(embedder.close())


@pytest.fixture
def local_service(minilm):
    """A service of that model and a chat model (`open_service`'s wiring is
    tested over the mesh below), with fresh slots and health."""
    served = {"minilm": ServedModel("minilm", minilm, SlotPool(1, 16), ModelHealth()),
              "echo": ServedModel("echo", EchoBackend(), SlotPool(64, 16), ModelHealth())}
    return InferenceService(served, ResponseCache(ttl=0, max_entries=1, max_bytes=1), worker_id="test-worker")


# -- the local MiniLM ------------------------------------------------------------


@pytest.mark.unit
async def test_minilm_paraphrases_are_closer_than_unrelated_sentences(minilm):
    a, b, c = (await minilm.embed([GUITAR, GUITAR_TOO, MARKET], None)).vectors
    paraphrase, unrelated = cosine(a, b), max(cosine(a, c), cosine(b, c))
    assert paraphrase > 0.6, paraphrase
    assert unrelated < 0.3 and paraphrase - unrelated > 0.4, (paraphrase, unrelated)


@pytest.mark.unit
async def test_minilm_vectors_are_384_unit_floats_and_count_tokens_without_padding(minilm):
    texts = ["Hello world", GUITAR, "x " * 1000]
    embedded = await minilm.embed(texts, None)
    assert minilm.dimensions == embedded.dimensions == 384 and minilm.info["dimensions"] == 384
    assert all(len(v) == 384 * 4 and abs(norm(v) - 1.0) < 1e-4 for v in embedded.vectors)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(default_tokenizer()))
    tokenizer.no_padding()
    short = [len(tokenizer.encode(t).ids) for t in texts[:2]]
    assert short[0] == 4  # [CLS] hello world [SEP]
    assert embedded.prompt_tokens == sum(short) + 256  # the long text is cut at the model's 256 tokens


@pytest.mark.unit
async def test_minilm_embeds_a_batch_of_100_in_order(minilm):
    texts = [f"Sentence {i}: " + "the quick brown fox jumps " * (i % 7 + 1) for i in range(100)]
    batch = await minilm.embed(texts, None)
    assert len(batch.vectors) == 100
    for index in (0, 37, 99):  # alone, each text gets (nearly: int8 activations) its vector in the batch
        (alone,) = (await minilm.embed([texts[index]], None)).vectors
        assert cosine(alone, batch.vectors[index]) > 0.99
    assert cosine(batch.vectors[0], batch.vectors[1]) < 0.99  # not one vector for all


@pytest.mark.unit
async def test_minilm_takes_no_dimensions_but_its_own(minilm):
    with pytest.raises(InvalidParams) as refused:
        await minilm.embed([GUITAR], 128)
    assert refused.value.data["param"] == "dimensions" and "384" in refused.value.message
    assert (await minilm.embed([GUITAR], 384)).dimensions == 384


@pytest.mark.unit
async def test_a_cancelled_call_stops_after_its_batch_and_frees_the_slot(local_service):
    pool = local_service.served["minilm"].pool
    texts = [f"Text number {i} " + "with quite a few words in it " * 20 for i in range(400)]  # ~240k characters
    call = asyncio.create_task(local_service.embed("minilm", texts))
    await wait_until(lambda: pool.in_use == 1, 5.0)
    call.cancel()
    await wait_until(lambda: pool.in_use == 0, 3.0, message="the slot was not freed after the batch in flight")
    assert call.cancelled()
    assert (await local_service.embed("minilm", [GUITAR]))["dimensions"] == 384  # the model still works


# -- the catalog and the contract ------------------------------------------------


@pytest.mark.unit
def test_catalog_embedding_entries():
    local, remote = parse_models(json.dumps({
        "minilm": {"backend": "local", "kind": "embedding", "tokenizer": "~/tok.json", "n_threads": 2},
        "nomic": {"backend": "ollama", "kind": "embedding", "model": "nomic-embed-text"},
    }))
    assert (local.kind, local.path, local.n_threads) == ("embedding", None, 2)
    assert local.tokenizer is not None and local.tokenizer.name == "tok.json" and "~" not in str(local.tokenizer)
    assert (remote.kind, remote.upstream) == ("embedding", "nomic-embed-text")
    (chat,) = parse_models('{"smollm2": {"backend": "local"}}')
    assert chat.kind == "chat"


@pytest.mark.unit
def test_the_readme_catalog_example_parses():
    readme = (Path(__file__).resolve().parent.parent / "services" / "inference" / "README.md").read_text()
    example = readme.split("```json", 1)[1].split("```", 1)[0]
    kinds = {spec.name: (spec.backend, spec.kind) for spec in parse_models(example)}
    assert kinds["minilm"] == ("local", "embedding") and kinds["nomic"] == ("ollama", "embedding")
    assert kinds["te3-small"] == ("openai", "embedding") and kinds["smollm2"] == ("local", "chat")


@pytest.mark.unit
@pytest.mark.parametrize("entry, problem", [
    ({"backend": "echo", "kind": "embedding"}, "kind must be one of 'chat' for backend 'echo'"),
    ({"backend": "local", "kind": "vectors"}, "kind must be one of 'chat', 'embedding'"),
    ({"backend": "local", "kind": "embedding", "n_ctx": 512}, "unknown setting(s) n_ctx for a embedding"),
    ({"backend": "local", "tokenizer": "tok.json"}, "unknown setting(s) tokenizer for a chat"),
    ({"backend": "local", "kind": "embedding", "tokenizer": ""}, "tokenizer must be a file path"),
])
def test_catalog_refuses_bad_embedding_entries(entry, problem):
    with pytest.raises(ValueError) as refused:
        parse_models(json.dumps({"m": entry}))
    assert problem in str(refused.value)


@pytest.mark.unit
async def test_a_missing_model_file_stops_the_start():
    with pytest.raises(ConfigError):
        await LocalEmbedder(path=default_tokenizer().with_name("nope.onnx")).start()


@pytest.mark.unit
@pytest.mark.parametrize("params, param, fragment", [
    ({"input": []}, "input", "non-empty list"),
    ({"input": "one string"}, "input", "non-empty list"),
    ({"input": ["ok", ""]}, "input", "[1] must be a non-empty string"),
    ({"input": ["ok", 3]}, "input", "[1] must be a non-empty string"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, "input", "too many texts: 2049"),
    ({"input": ["x" * 101]}, "input", "[0] too long"),
    ({"input": ["x" * 100] * 9}, "input", "too long: 900 characters in all, at most 800"),
    ({"input": ["x"], "dimensions": 0}, "dimensions", "from 1 to"),
    ({"input": ["x"], "dimensions": True}, "dimensions", "from 1 to"),
])
def test_the_contract_refuses_out_of_bounds_requests(params, param, fragment):
    with pytest.raises(InvalidParams) as refused:
        build_embed_request(Limits(max_prompt_chars=100), **params)
    assert refused.value.data == {"param": param} and fragment in refused.value.message


# -- through the service ---------------------------------------------------------


@pytest.mark.unit
async def test_embed_through_the_service_and_capabilities(local_service):
    answer = await local_service.embed("minilm", [GUITAR, GUITAR_TOO], priority="pro", tenant="alice")
    assert set(answer) == {"model", "vectors", "dimensions", "usage", "worker"}
    assert answer["model"] == "minilm" and answer["dimensions"] == 384
    assert [len(v) for v in answer["vectors"]] == [384 * 4] * 2 and cosine(*answer["vectors"]) > 0.6
    usage = answer["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0
    load = answer["worker"]["load"]
    assert answer["worker"]["id"] == "test-worker" and load["free_slots"] == 1
    assert load["capabilities"] == "embeddings"  # a record's load holds scalars only
    rows = {m["name"]: m for m in (await local_service.models())["models"]}
    assert rows["minilm"]["capabilities"] == ["embeddings"] and rows["echo"]["capabilities"] == ["chat"]
    assert rows["minilm"]["backend"] == "local" and rows["minilm"]["dimensions"] == 384
    assert local_service.topic_load(model_topic("minilm"))["capabilities"] == "embeddings"
    assert local_service.topic_load(model_topic("echo"))["capabilities"] == "chat"
    status = await local_service.model_status("minilm")
    assert status["requests"] == 1 and status["healthy"] and status["capabilities"] == ["embeddings"]


@pytest.mark.unit
@pytest.mark.parametrize("params, param", [
    ({"model": "minilm", "input": []}, "input"),
    ({"model": "minilm", "input": ["ok"] * 2049}, "input"),
    ({"model": "minilm", "input": ["fine", ""]}, "input"),
    ({"model": "minilm", "input": ["x" * 40_000]}, "input"),
    ({"model": "minilm", "input": ["ok"], "dimensions": 256}, "dimensions"),
    ({"model": "minilm", "input": ["ok"], "priority": "platinum"}, "priority"),
    ({"model": "minilm", "input": ["ok"], "tenant": "t" * 129}, "tenant"),
])
async def test_embed_refusals_name_the_parameter(local_service, params, param):
    with pytest.raises(InvalidParams) as refused:
        await local_service.embed(**params)
    assert refused.value.data["param"] == param
    assert local_service.served["minilm"].pool.in_use == 0 and local_service.served["minilm"].health.healthy


@pytest.mark.unit
async def test_a_chat_model_does_not_embed_and_an_embedding_model_does_not_generate(local_service):
    with pytest.raises(InvalidParams) as chat:
        await local_service.embed("echo", ["hello"])
    assert chat.value.data["param"] == "model" and chat.value.data["reason"] == "unsupported"
    assert "chat model" in chat.value.message and "inference.generate" in chat.value.message
    with pytest.raises(InvalidParams) as embedding:
        [c async for c in local_service.generate(model="minilm", prompt="hello")]
    assert embedding.value.data["param"] == "model" and embedding.value.data["reason"] == "unsupported"
    assert "embedding model" in embedding.value.message and "inference.embed" in embedding.value.message
    with pytest.raises(NotFound):
        await local_service.embed("nope", ["hello"])


# -- models on HTTP servers ------------------------------------------------------


@pytest.fixture
async def ollama():
    async with OllamaServer(("llama3:8b", "all-minilm:latest")) as server:
        yield server


@pytest.fixture
async def openai():
    async with OpenAIServer(("gpt-4o-mini", "text-embedding-3-small", "text-embedding-ada-002"),
                            api_key="sk-test-key") as server:
        yield server


@pytest.fixture
async def remote(ollama, openai):
    models = {
        "llama3": {"backend": "ollama", "url": ollama.url, "model": "llama3:8b"},
        "all-minilm": {"backend": "ollama", "kind": "embedding", "url": ollama.url, "slots": 1, "queue": 1},
        "small": {"backend": "openai", "kind": "embedding", "url": openai.base_url,
                  "model": "text-embedding-3-small", "api_key_env": "TEST_OPENAI_KEY"},
        "ada": {"backend": "openai", "kind": "embedding", "url": openai.base_url,
                "model": "text-embedding-ada-002", "api_key_env": "TEST_OPENAI_KEY"},
        "gone": {"backend": "openai", "kind": "embedding", "url": openai.base_url, "model": "no-such-model",
                 "api_key_env": "TEST_OPENAI_KEY"},
    }
    async with AsyncExitStack() as stack:
        yield await start_service(stack, models, TEST_OPENAI_KEY="sk-test-key")


def assert_hash_vectors(vectors: list[bytes], texts: list[str], native: int, size: int) -> None:
    for vector, text in zip(vectors, texts, strict=True):
        expected = hash_vector(text, native)[:size]
        scale = math.sqrt(sum(v * v for v in expected))
        assert len(vector) == 4 * size
        assert all(abs(got - want / scale) < 1e-6 for got, want in zip(unpack_vector(vector), expected))


@pytest.mark.rpc
async def test_ollama_embed(remote, ollama):
    texts = ["first text", "a second, longer text"]
    answer = await remote.embed("all-minilm", texts)
    assert answer["dimensions"] == 384
    assert_hash_vectors(answer["vectors"], texts, 384, 384)
    assert answer["usage"]["prompt_tokens"] == 2 + 2 + 4 + 2  # the server's prompt_eval_count
    path, body = ollama.requests[-1]
    assert path == "/api/embed" and body == {"model": "all-minilm", "input": texts, "truncate": True}
    shorter = await remote.embed("all-minilm", texts, dimensions=64)
    assert shorter["dimensions"] == 64 and ollama.requests[-1][1]["dimensions"] == 64
    assert_hash_vectors(shorter["vectors"], texts, 384, 64)
    rows = {m["name"]: m for m in (await remote.models())["models"]}
    assert rows["all-minilm"]["capabilities"] == ["embeddings"] and rows["llama3"]["capabilities"] == ["chat", "tools", "json"]
    assert rows["all-minilm"]["details"]["family"] == "llama"  # /api/show, through the chat backend's probe


@pytest.mark.rpc
async def test_openai_embeddings(remote, openai):
    texts = ["alpha", "beta gamma", "delta"]
    answer = await remote.embed("small", texts)
    assert answer["dimensions"] == 1536 and answer["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert_hash_vectors(answer["vectors"], texts, 1536, 1536)
    path, body = openai.requests[-1]
    assert path == "/v1/embeddings"
    assert body == {"model": "text-embedding-3-small", "input": texts, "encoding_format": "float"}
    shorter = await remote.embed("small", texts, dimensions=256)
    assert shorter["dimensions"] == 256 and openai.requests[-1][1]["dimensions"] == 256
    assert_hash_vectors(shorter["vectors"], texts, 1536, 256)
    openai.reverse_data = True  # the items come back in the order of their `index`, not of the list
    assert (await remote.embed("small", texts))["vectors"] == answer["vectors"]
    with pytest.raises(InvalidParams, match="does not support specifying dimensions"):
        await remote.embed("ada", texts, dimensions=256)  # the server's 400
    assert remote.served["ada"].health.healthy  # a refused request is not a failing backend


@pytest.mark.rpc
async def test_upstream_failures_are_typed_and_flip_health(remote, ollama, openai):
    with pytest.raises(NotFound, match="does not exist"):
        await remote.embed("gone", ["x"])
    assert not remote.served["gone"].health.healthy
    ollama.fail_status = 500
    with pytest.raises(Unavailable, match="answered 500"):
        await remote.embed("all-minilm", ["x"])
    status = await remote.model_status("all-minilm")
    assert not status["healthy"] and status["last_error"]["code"] == "UNAVAILABLE"
    ollama.heal()
    await remote.embed("all-minilm", ["x"])
    assert remote.served["all-minilm"].health.healthy


@pytest.mark.rpc
async def test_embed_takes_a_slot_and_waits_in_the_queue(remote, ollama):
    ollama.prefill_delay = 0.5  # the server takes its time: the one slot stays busy
    pool = remote.served["all-minilm"].pool
    first = asyncio.create_task(remote.embed("all-minilm", ["one"]))
    await wait_until(lambda: pool.in_use == 1, 5.0)
    second = asyncio.create_task(remote.embed("all-minilm", ["two"], priority="enterprise"))
    await wait_until(lambda: pool.queued == 1, 5.0)
    with pytest.raises(Unavailable) as full:
        await remote.embed("all-minilm", ["three"])
    assert full.value.data["reason"] == "queue_full"
    assert (await first)["dimensions"] == (await second)["dimensions"] == 384
    assert pool.in_use == 0 and pool.queued == 0


# -- over the mesh ---------------------------------------------------------------


@pytest.mark.rpc
async def test_inference_embed_over_rpc(tmp_path):
    secret = MeshCredential.new_secret().hex()
    async with AsyncExitStack() as stack:
        client = await join_mesh(stack, "client", MeshConfig(
            data_dir=tmp_path / "client", mesh_secret=Secret(secret), record_ttl=3.0))
        config = load(InferenceConfig, {
            "INFERSWARM_DATA_DIR": str(tmp_path / "w"), "INFERSWARM_MESH_SECRET": secret,
            "INFERSWARM_BOOTSTRAP": client.discovery.address, "INFERSWARM_RECORD_TTL": "3",
            "INFERSWARM_MODELS": json.dumps(LOCAL), "INFERSWARM_LOG_LEVEL": "warning",
        })
        worker, ready, stop = InferenceWorker(config), [], asyncio.Event()
        task = asyncio.create_task(serve("inference", worker.build, config.mesh, topics=worker.topics,
                                         load=worker.load, topic_load=worker.topic_load, ready=ready.append,
                                         stop=stop))
        try:
            await wait_until(lambda: ready or task.done(), 20.0)
            assert ready, task.exception() if task.done() else "not ready"
            topic = model_topic("minilm")

            async def announced():
                try:
                    return await client.discovery.lookup(topic)
                except Exception:
                    return None

            (provider,) = await wait_until(announced, 10.0)
            assert provider.load["capabilities"] == "embeddings"
            answer = await client.mesh.topic(topic).call(
                "inference.embed", {"model": "minilm", "input": [GUITAR, GUITAR_TOO, MARKET]}, timeout=30)
            assert answer["model"] == "minilm" and answer["dimensions"] == 384
            assert all(type(v) is bytes and len(v) == 384 * 4 for v in answer["vectors"])
            a, b, c = answer["vectors"]
            assert cosine(a, b) > 0.6 > cosine(a, c)
            assert answer["worker"]["id"] == worker.service.worker_id
            with pytest.raises(InvalidParams) as refused:
                stream = await client.mesh.topic(topic).stream(
                    "inference.generate", {"model": "minilm", "prompt": "hi"}, timeout=30)
                [chunk async for chunk in stream]
            assert refused.value.data["reason"] == "unsupported"
            with pytest.raises(InvalidParams) as empty:
                await client.mesh.topic(topic).call("inference.embed", {"model": "minilm", "input": []}, timeout=30)
            assert empty.value.data["param"] == "input"
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
