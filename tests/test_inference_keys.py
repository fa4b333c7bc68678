"""Upstream API key pools (services/inference/backends/keys.py) against the OpenAI and
Anthropic test servers (real HTTP on loopback, each key failing on command): a spent
key waits for its reset while the others serve, a refused key is disabled for good and
logged once, a failing key's breaker opens and a probe closes it, requests rotate,
usage and what the upstream says is left show in `keys_view()`, no key text ever
shows; the catalog's key sources; the reset headers' parsing; context overflow typed."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import format_datetime
from datetime import datetime, timezone
from typing import Any

import pytest
from anthropic_server import AnthropicServer
from openai_server import OpenAIServer
from structlog.testing import capture_logs
from waiting import wait_until

from shared.config import ConfigError, Secret
from shared.errors import InvalidParams, Unavailable
from shared.generation import GenerateRequest, Message
from services.inference.backends import api_keys, make_backend
from services.inference.backends.anthropic import AnthropicBackend
from services.inference.backends.base import Done
from services.inference.backends.embedding_http import OpenAIEmbedder
from services.inference.backends.http import HttpBackend
from services.inference.backends.keys import KeyPool, Lease, label_of, parse_duration, rate_figures, reset_delay
from services.inference.backends.openai import OpenAIBackend
from services.inference.catalog import ModelSpec, parse_models

K1, K2, K3 = "sk-pool-first-key-000000000001", "sk-pool-second-key-00000000002", "sk-pool-third-key-000000000003"
ALL_KEYS = (K1, K2, K3)
KINDS = ["openai", "anthropic"]


def request(text: str = "Say hello", max_tokens: int = 16) -> GenerateRequest:
    return GenerateRequest(messages=(Message("user", text),), prompt=None, max_tokens=max_tokens,
                           temperature=0.0, top_p=1.0)


@asynccontextmanager
async def upstream(kind: str, keys: dict[str, int | None], **options: Any
                   ) -> AsyncIterator[tuple[OpenAIServer | AnthropicServer, HttpBackend]]:
    """A test server accepting `keys` (each with its behaviour), and a started backend with them all."""
    server: OpenAIServer | AnthropicServer
    server = OpenAIServer(("gpt-4o-mini",)) if kind == "openai" else AnthropicServer(("claude-test-1",))
    async with server:
        server.keys = dict(keys)
        secrets = [Secret(k) for k in keys]
        backend: HttpBackend
        if isinstance(server, OpenAIServer):
            backend = OpenAIBackend(server.base_url, "gpt-4o-mini", api_keys=secrets, **options)
        else:
            backend = AnthropicBackend(server.url, "claude-test-1", api_keys=secrets, **options)
        await backend.start()
        try:
            yield server, backend
        finally:
            await backend.close()


async def generate(backend: HttpBackend, req: GenerateRequest | None = None) -> list[Any]:
    return [event async for event in backend.generate(req or request())]


def view_of(backend: HttpBackend, index: int) -> dict[str, Any]:
    view = backend.keys_view()
    assert view is not None
    return view[index]


def assert_hidden(*shown: Any) -> None:
    """No key's text in anything shown: views, descriptions, errors, log lines."""
    text = json.dumps(shown, default=str)
    for key in ALL_KEYS:
        assert key not in text


# -- a spent key (429) --------------------------------------------------------------


@pytest.mark.rpc
@pytest.mark.parametrize("kind", KINDS)
async def test_a_spent_key_waits_for_its_reset_while_the_others_serve(kind):
    async with upstream(kind, {K1: None, K2: 429, K3: None}) as (server, backend):
        server.reset_after = 0.5
        for _ in range(6):
            assert isinstance((await generate(backend))[-1], Done)  # every request served
        assert server.requests_by_key[K2] == 1  # refused once, then left alone until its reset
        assert server.requests_by_key[K1] + server.requests_by_key[K3] == 6
        spent = view_of(backend, 1)
        assert spent["state"] == "exhausted" and spent["until"] > time.time() and spent["last_status"] == 429
        assert spent["remaining_requests"] == 0 and spent["failures"] == 1
        assert spent["key"] == label_of(1, Secret(K2)) == "key-2 …0002"

        await wait_until(lambda: view_of(backend, 1)["state"] == "ok", 5.0, message="the reset never passed")
        for _ in range(3):  # the next turn of the rotation comes to it
            await generate(backend)
        assert server.requests_by_key[K2] == 2 and view_of(backend, 1)["last_status"] == 200
        assert_hidden(backend.keys_view(), backend.describe())


@pytest.mark.rpc
@pytest.mark.parametrize("kind", KINDS)
async def test_every_key_spent_fails_fast_with_the_soonest_reset(kind):
    async with upstream(kind, {K1: 429, K2: 429}) as (server, backend):
        server.reset_after = 30.0
        with pytest.raises(Unavailable) as spent:
            await generate(backend)
        data = spent.value.data
        assert (data["retry_safe"], data["reason"], data["upstream_status"]) == (True, "upstream_keys_exhausted", 429)
        assert 25 <= data["retry_after"] <= 30 and type(data["retry_after"]) is int
        asked = sum(server.requests_by_key.values())
        assert asked == 2  # each key tried once
        with pytest.raises(Unavailable) as again:  # fast: the server is not asked again
            await generate(backend)
        assert again.value.data["reason"] == "upstream_keys_exhausted"
        assert sum(server.requests_by_key.values()) == asked
        with pytest.raises(Unavailable, match="rate limited"):
            await backend.probe()
        assert [v["state"] for v in backend.keys_view() or []] == ["exhausted", "exhausted"]
        assert_hidden(spent.value.to_wire(), again.value.to_wire(), backend.keys_view())


# -- a refused key (401 / 403) ---------------------------------------------------------


@pytest.mark.rpc
@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_key_is_disabled_for_good_and_logged_once(kind):
    async with upstream(kind, {K1: None, K2: 401, K3: None}) as (server, backend):
        with capture_logs() as logs:
            await backend.probe()  # the probe too rotates, and learns K2 is refused
            for _ in range(6):
                assert isinstance((await generate(backend))[-1], Done)
        assert server.requests_by_key[K2] == 1
        disabled = [line for line in logs if line["event"] == "upstream key disabled"]
        assert len(disabled) == 1
        line = disabled[0]
        assert line["log_level"] == "error" and line["status"] == 401 and line["upstream_key"] == "key-2 …0002"
        assert line["model"] in ("gpt-4o-mini", "claude-test-1")
        state = view_of(backend, 1)
        assert state["state"] == "disabled" and state["until"] is None and state["last_status"] == 401
        assert_hidden(logs, backend.keys_view(), backend.describe())


@pytest.mark.rpc
@pytest.mark.parametrize("kind", KINDS)
async def test_every_key_refused_is_unavailable_with_the_upstreams_word(kind):
    async with upstream(kind, {K1: 401, K2: 403}) as (server, backend):
        with pytest.raises(Unavailable) as refused:
            await generate(backend)
        data = refused.value.data
        assert data["reason"] == "upstream_keys_disabled" and data["retry_safe"] is True
        assert "answered 403" in refused.value.message
        with pytest.raises(Unavailable, match="disabled"):
            await generate(backend)
        assert dict(server.requests_by_key) == {K1: 1, K2: 1}
        assert [v["state"] for v in backend.keys_view() or []] == ["disabled", "disabled"]
        assert_hidden(refused.value.to_wire(), backend.keys_view())


# -- a failing key (5xx): its breaker -------------------------------------------------


@pytest.mark.rpc
@pytest.mark.parametrize("kind", KINDS)
async def test_a_failing_keys_breaker_opens_after_five_and_a_probe_closes_it(kind):
    async with upstream(kind, {K1: None, K2: 500}, key_cooldown=0.3) as (server, backend):
        for _ in range(8):
            assert isinstance((await generate(backend))[-1], Done)  # K2's 500 retried at once with K1
        assert server.requests_by_key[K2] == 5  # then its breaker is open: skipped
        failing = view_of(backend, 1)
        assert failing["state"] == "open" and failing["failures"] == 5 and failing["last_status"] == 500
        server.keys[K2] = None  # the upstream is fine again for that key

        async def probed_back() -> bool:
            await backend.probe()  # in half-open, one request probes the key
            return view_of(backend, 1)["state"] == "ok"

        await wait_until(probed_back, 5.0, interval=0.05, message="the breaker never closed")
        assert view_of(backend, 1)["last_status"] == 200


# -- rotation, usage, what is left ------------------------------------------------------


@pytest.mark.rpc
@pytest.mark.parametrize("kind", KINDS)
async def test_rotation_spreads_requests_and_the_view_counts_usage_and_what_is_left(kind):
    async with upstream(kind, {K1: None, K2: None, K3: None}) as (server, backend):
        done = [(await generate(backend))[-1] for _ in range(9)]
        assert dict(server.requests_by_key) == {K1: 3, K2: 3, K3: 3}
        view = backend.keys_view()
        assert view is not None and [v["key"] for v in view] == ["key-1 …0001", "key-2 …0002", "key-3 …0003"]
        for entry in view:
            assert set(entry) == {"key", "state", "until", "requests", "failures", "prompt_tokens",
                                  "completion_tokens", "last_used", "remaining_requests", "remaining_tokens",
                                  "limit_requests", "limit_tokens", "last_status"}
            assert (entry["state"], entry["until"], entry["requests"], entry["failures"]) == ("ok", None, 3, 0)
            assert entry["prompt_tokens"] == 3 * done[0].prompt_tokens > 0
            assert entry["completion_tokens"] == 3 * done[0].completion_tokens > 0
            assert entry["last_used"] == pytest.approx(time.time(), abs=30)
            assert (entry["limit_requests"], entry["limit_tokens"]) == (500, 200_000)
            assert entry["remaining_requests"] == 497 and entry["remaining_tokens"] < 200_000
            assert entry["last_status"] == 200
        assert_hidden(view, backend.describe())


@pytest.mark.rpc
async def test_an_embedder_rotates_over_its_keys_and_counts_their_tokens():
    async with OpenAIServer(("text-embedding-3-small",)) as server:
        server.keys = {K1: None, K2: 429, K3: None}
        embedder = OpenAIEmbedder(server.base_url, "text-embedding-3-small", api_keys=[Secret(k) for k in ALL_KEYS])
        await embedder.start()
        try:
            for _ in range(4):
                assert len((await embedder.embed(["one two three"], None)).vectors) == 1
        finally:
            await embedder.close()
        view = embedder.keys_view()
        assert view is not None and [v["state"] for v in view] == ["ok", "exhausted", "ok"]
        assert view[0]["requests"] + view[2]["requests"] == 4 and view[0]["prompt_tokens"] > 0
        assert_hidden(view, embedder.describe())


@pytest.mark.unit
def test_a_backend_without_a_key_has_no_view_and_one_key_is_a_pool_of_one():
    assert OpenAIBackend("http://127.0.0.1:9/v1", "m").keys_view() is None
    assert AnthropicBackend("http://127.0.0.1:9", "m").keys_view() is None
    one = OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key=Secret(K1), api_keys=[Secret(K1)])
    assert [v["key"] for v in one.keys_view() or []] == ["key-1 …0001"]  # duplicates once


# -- the pool by its clock ------------------------------------------------------------------


def clocked_pool() -> tuple[KeyPool, list[float]]:
    """A pool of K1 and K2 on a clock the test moves (`now[0] += seconds`)."""
    now = [1_800_000_000.0]
    return KeyPool([Secret(K1), Secret(K2)], model="m", header=lambda k: {"x-api-key": k},
                   clock=lambda: now[0]), now


@pytest.mark.unit
async def test_a_spent_key_is_ok_again_by_the_clock_alone():
    pool, now = clocked_pool()

    async def refused(lease: Lease) -> str:
        lease.observe(429, {"retry-after": "10" if lease.key.index == 0 else "4"})
        raise Unavailable("answered 429", {"retry_safe": True, "upstream_status": 429})

    async def served(lease: Lease) -> str:
        lease.observe(200, {})
        return lease.key.label

    with pytest.raises(Unavailable) as spent:
        await pool.call(refused)
    assert spent.value.data == {"retry_safe": True, "retry_after": 4, "reason": "upstream_keys_exhausted",
                                "upstream_status": 429}
    assert [(v["state"], v["until"]) for v in pool.view()] == [("exhausted", now[0] + 10), ("exhausted", now[0] + 4)]
    now[0] += 4
    assert [v["state"] for v in pool.view()] == ["exhausted", "ok"]
    assert await pool.call(served) == "key-2 …0002"
    now[0] += 6
    assert [v["state"] for v in pool.view()] == ["ok", "ok"]
    assert {await pool.call(served) for _ in range(2)} == {"key-1 …0001", "key-2 …0002"}


@pytest.mark.unit
async def test_a_keys_breaker_opens_at_five_and_lets_one_probe_through_after_its_cooldown():
    pool, now = clocked_pool()
    failing = pool.keys[0]
    for _ in range(5):
        lease = pool.lease({1})  # K1 only
        assert lease is not None and lease.key is failing
        lease.observe(503, {})
    assert pool.view()[0]["state"] == "open" and pool.view()[0]["until"] == now[0] + 5
    assert pool.lease({1}) is None  # open: skipped
    now[0] += 5
    probe = pool.lease({1})
    assert probe is not None and pool.lease({1}) is None  # half-open: one probe at a time
    probe.observe(200, {})
    assert pool.view()[0]["state"] == "ok" and pool.lease({1}) is not None


@pytest.mark.unit
async def test_an_upstream_that_echoes_a_key_has_it_replaced_by_the_label():
    pool, _ = clocked_pool()

    async def echoing(lease: Lease) -> str:
        lease.observe(401 if lease.key.index == 0 else 400, {})
        raise InvalidParams(f"bad request with key {lease.key.secret.reveal()}", {"param": "model"})

    with pytest.raises(InvalidParams) as refused:  # K1 refused (401), then K2's own 400
        await pool.call(echoing)
    assert refused.value.message == "bad request with key key-2 …0002"
    assert refused.value.__suppress_context__ and refused.value.data == {"param": "model"}


# -- context overflow --------------------------------------------------------------------


@pytest.mark.rpc
@pytest.mark.parametrize("kind", KINDS)
async def test_a_prompt_over_the_context_window_is_typed(kind):
    async with upstream(kind, {K1: None}) as (server, backend):
        server.context_window = 40
        with pytest.raises(InvalidParams) as over:
            await generate(backend, request("word " * 60, max_tokens=8))
        assert over.value.data == {"param": "messages", "reason": "context_length_exceeded"}
        with pytest.raises(InvalidParams) as with_output:  # fits alone, not with max_tokens
            await generate(backend, request("Say hello", max_tokens=39))
        assert with_output.value.data["reason"] == "context_length_exceeded"
        assert view_of(backend, 0)["state"] == "ok"  # the request's fault, not the key's
        assert isinstance((await generate(backend, request("Say hello", max_tokens=4)))[-1], Done)


# -- the catalog's key sources --------------------------------------------------------------


def _spec(**keys: Any) -> ModelSpec:
    return ModelSpec(name="pool", backend="openai", slots=1, upstream="m", url="http://x/v1", **keys)


@pytest.mark.unit
def test_key_sources_combine_deduplicated_in_order(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# the team's keys\n\n{K3}\n  {K1}  \n# {K2} retired\n")
    spec = _spec(api_key_env="ONE", api_keys_env="MANY", api_keys_file=keys_file)
    found = api_keys(spec, {"ONE": K1, "MANY": f"{K2}, {K1}\n{K3}\t"})
    assert [k.reveal() for k in found] == [K1, K2, K3]
    backend = make_backend(spec, threads=1, environ={"ONE": K1, "MANY": f"{K2},{K3}"})
    assert [v["key"] for v in backend.keys_view() or []] == ["key-1 …0001", "key-2 …0002", "key-3 …0003"]
    assert_hidden(backend.describe(), backend.keys_view(), repr(found))
    (parsed,) = parse_models(json.dumps({"m": {"backend": "anthropic", "api_keys_env": "MANY",
                                               "api_keys_file": str(keys_file)}}))
    assert (parsed.api_keys_env, parsed.api_keys_file) == ("MANY", keys_file)
    (embedding,) = parse_models('{"e": {"backend": "openai", "kind": "embedding", "url": "http://x/v1", '
                                '"api_keys_env": "MANY"}}')
    assert embedding.api_keys_env == "MANY"


@pytest.mark.unit
def test_a_bad_key_source_fails_the_start_naming_the_entry_never_a_key(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    cases = [(_spec(api_keys_env="MANY"), {}, "api_keys_env MANY"),
             (_spec(api_keys_env="MANY"), {"MANY": " ,\n "}, "api_keys_env MANY"),
             (_spec(api_keys_file=tmp_path / "missing.txt"), {}, "missing.txt cannot be read"),
             (_spec(api_keys_file=empty), {}, "empty.txt holds no key"),
             (_spec(api_key_env="ONE", api_keys_env="MANY"), {"MANY": K2}, "api_key_env ONE is not set")]
    for spec, environ, problem in cases:
        with pytest.raises(ConfigError) as bad:
            api_keys(spec, environ)
        assert problem in str(bad.value) and "model 'pool'" in str(bad.value)
        assert_hidden(str(bad.value))
    with pytest.raises(ValueError, match="api_keys_env must name an environment variable"):
        parse_models('{"m": {"backend": "openai", "url": "http://x/v1", "api_keys_env": "1BAD"}}')
    with pytest.raises(ValueError, match="unknown setting"):
        parse_models('{"m": {"backend": "ollama", "api_keys_env": "MANY"}}')


# -- what the headers say ---------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("1m30.5s", 90.5), ("20ms", 0.02), ("1h2m3s", 3723.0), ("0", 0.0),
    ("", None), ("soon", None), ("5", None), ("1s later", None),
])
def test_go_durations_as_openai_sends_them(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.unit
def test_the_reset_of_a_429_from_each_apis_headers():
    now = 1_800_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 42, tz=timezone.utc), usegmt=True)
    rfc = datetime.fromtimestamp(now + 7.5, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    later = datetime.fromtimestamp(now + 20, tz=timezone.utc).isoformat()
    assert reset_delay({"Retry-After": "12"}, now) == 12
    assert reset_delay({"retry-after": date}, now) == pytest.approx(42)
    assert reset_delay({"retry-after-ms": "250", "retry-after": "1"}, now) == 0.25
    assert reset_delay({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, now) == 360
    assert reset_delay({"anthropic-ratelimit-requests-reset": rfc,
                        "anthropic-ratelimit-output-tokens-reset": later}, now) == pytest.approx(20)
    assert reset_delay({}, now) == 1.0  # none given
    assert reset_delay({"retry-after": "whenever"}, now) == 1.0
    assert reset_delay({"retry-after": "86400"}, now) == 3600  # capped at an hour
    assert reset_delay({"retry-after": "-5"}, now) == 0


@pytest.mark.unit
def test_rate_figures_and_labels():
    assert rate_figures({"x-ratelimit-remaining-requests": "499", "x-ratelimit-limit-tokens": "30000",
                         "x-ratelimit-remaining-tokens": "n/a"}) == {"remaining_requests": 499, "limit_tokens": 30000}
    assert rate_figures({"anthropic-ratelimit-requests-remaining": "49", "anthropic-ratelimit-tokens-limit": "8000",
                         "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-tokens-remaining": "7000"}) \
        == {"remaining_requests": 49, "limit_requests": 50, "remaining_tokens": 7000, "limit_tokens": 8000}
    assert label_of(0, Secret("sk-proj-abcdefghijklmnop")) == "key-1 …mnop"
    assert label_of(4, Secret("short-key")) == "key-5"  # a short key shows nothing of itself
