"""The inference worker's parts that need no model: the catalog and its config
errors, request validation, slots with their priority queue, the response cache."""

from __future__ import annotations

import asyncio
import json

import pytest

from shared.config import ConfigError, load
from shared.errors import InvalidParams, Timeout, Unavailable
from shared.generation import Limits, build_request, priority_of
from services.inference.backends import make_backend
from services.inference.backends.base import GenerateRequest, Message
from services.inference.cache import CachedResponse, ResponseCache, cache_key
from services.inference import catalog
from services.inference.catalog import DEFAULT_MODELS, ModelSpec
from services.inference.config import InferenceConfig
from services.inference.health import ModelHealth
from services.inference.slots import SlotPool
from waiting import wait_until

pytestmark = pytest.mark.unit

# -- the catalog ---------------------------------------------------------------


def test_nothing_configured_serves_the_local_model_as_smollm2():
    config = load(InferenceConfig, {})
    assert config.models == DEFAULT_MODELS
    assert config.models[0].name == "smollm2" and config.models[0].backend == "local"


def test_catalog_from_json_with_defaults():
    models = {
        "smollm2": {"backend": "local", "slots": 1, "n_threads": 1},
        "llama3": {"backend": "ollama", "url": "http://10.0.0.9:11434/", "model": "llama3:8b", "slots": 4},
        "gpt-4o-mini": {"backend": "openai", "url": "https://api.example.com/v1", "api_key_env": "OPENAI_API_KEY"},
    }
    config = load(InferenceConfig, {"INFERSWARM_MODELS": json.dumps(models)})
    local, ollama, openai = config.models
    assert (local.slots, local.n_threads, local.n_ctx, local.queue) == (1, 1, 2048, 16)
    assert (ollama.url, ollama.upstream, ollama.slots) == ("http://10.0.0.9:11434", "llama3:8b", 4)
    assert (openai.upstream, openai.api_key_env, openai.slots) == ("gpt-4o-mini", "OPENAI_API_KEY", 4)


def test_a_local_chat_model_is_batched_only_when_asked():
    models = {"plain": {"backend": "local"}, "batched": {"backend": "local", "slots": 4, "batch": True}}
    plain, batched = load(InferenceConfig, {"INFERSWARM_MODELS": json.dumps(models)}).models
    assert (plain.batch, batched.batch, batched.slots) == (False, True, 4)
    assert type(make_backend(plain, threads=1)).__name__ == "LocalBackend"
    backend = make_backend(batched, threads=1)
    assert type(backend).__name__ == "BatchedBackend" and backend.slots == 4


def test_catalog_from_a_toml_file(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[llama3]\nbackend = "ollama"\nmodel = "llama3:8b"\nslots = 2\nqueue = 3\n')
    (spec,) = load(InferenceConfig, {"INFERSWARM_MODELS_FILE": str(path)}).models
    assert spec == ModelSpec(name="llama3", backend="ollama", slots=2, queue=3, upstream="llama3:8b",
                             url="http://127.0.0.1:11434")


@pytest.mark.parametrize(
    "models, problem",
    [
        ("{not json", "INFERSWARM_MODELS: not valid JSON"),
        ("{}", "non-empty object"),
        ('{"m": {"backend": "vllm"}}', "backend must be one of"),
        ('{"m": {"backend": "ollama", "slot": 2}}', "unknown setting(s) slot"),
        ('{"m": {"backend": "ollama", "slots": 0}}', "slots must be an integer >= 1"),
        ('{"m": {"backend": "openai", "url": "ftp://x"}}', "url must be an http(s) URL"),
        ('{"m": {"backend": "openai", "url": "http://x/v1", "api_key_env": "1BAD"}}', "api_key_env"),
        ('{"bad name": {"backend": "local"}}', "model 'bad name'"),
        ('{"m": {"backend": "local", "n_threads": "2"}}', "n_threads must be an integer"),
        ('{"m": {"backend": "local", "batch": "yes"}}', "batch must be true or false"),
        ('{"m": {"backend": "local", "kind": "embedding", "batch": true}}', "unknown setting(s) batch"),
        ('{"m": {"backend": "ollama", "batch": true}}', "unknown setting(s) batch"),
    ],
)
def test_bad_catalog_fails_at_start_naming_the_problem(models, problem):
    with pytest.raises(ConfigError) as refused:
        load(InferenceConfig, {"INFERSWARM_MODELS": models})
    assert problem in str(refused.value)


def test_catalog_file_problems_and_both_sources(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(InferenceConfig, {"INFERSWARM_MODELS_FILE": str(tmp_path / "missing.json")})
    bad = tmp_path / "models.toml"
    bad.write_text("[m\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(InferenceConfig, {"INFERSWARM_MODELS_FILE": str(bad)})
    good = tmp_path / "models.json"
    good.write_text('{"m": {"backend": "local"}}')
    with pytest.raises(ConfigError, match="not both"):
        load(InferenceConfig, {"INFERSWARM_MODELS_FILE": str(good), "INFERSWARM_MODELS": good.read_text()})


def test_an_unset_api_key_variable_fails_at_start_and_a_set_one_stays_secret():
    spec = ModelSpec(name="m", backend="openai", slots=1, upstream="m", url="http://x/v1", api_key_env="TEST_KEY")
    with pytest.raises(ConfigError, match="TEST_KEY is not set"):
        make_backend(spec, threads=1, environ={})
    backend = make_backend(spec, threads=1, environ={"TEST_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(backend.describe())


def test_echo_catalog_entry_and_its_bounds():
    (spec,) = load(InferenceConfig, {"INFERSWARM_MODELS": '{"echo": {"backend": "echo", "delay": 0.01}}'}).models
    assert (spec.backend, spec.slots, spec.queue, spec.delay) == ("echo", 64, 16, 0.01)
    for bad in ('{"e": {"backend": "echo", "delay": -1}}', '{"e": {"backend": "echo", "url": "http://x"}}'):
        with pytest.raises(ConfigError):
            load(InferenceConfig, {"INFERSWARM_MODELS": bad})


async def _echo(request: GenerateRequest, *, delay: float = 0.0) -> tuple[str, object]:
    backend = make_backend(ModelSpec(name="e", backend="echo", slots=1, delay=delay), threads=1)
    events = [event async for event in backend.generate(request)]
    return "".join(e for e in events if isinstance(e, str)), events[-1]


async def test_echo_returns_the_last_message_word_by_word_and_counts_words():
    chat = (Message("system", "be brief"), Message("user", "one two three four"))
    text, done = await _echo(GenerateRequest(chat, None, max_tokens=3, temperature=0.7, top_p=1.0))
    assert text == "one two three"
    assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("length", 6, 3)
    text, done = await _echo(GenerateRequest(None, "alpha beta gamma", max_tokens=9, temperature=0, top_p=1,
                                             stop=("ta g",)))
    assert text == "alpha be" and (done.finish_reason, done.completion_tokens) == ("stop", 2)


async def test_echo_delay_paces_the_words():
    loop = asyncio.get_running_loop()
    started = loop.time()
    text, done = await _echo(GenerateRequest(None, "a b c d e", max_tokens=9, temperature=0, top_p=1), delay=0.02)
    assert text == "a b c d e" and done.finish_reason == "stop"
    assert loop.time() - started >= 0.08


# -- validation ----------------------------------------------------------------

LIMITS = Limits(max_tokens=100, max_prompt_chars=50, max_messages=3)
OK = dict(max_tokens=10, temperature=0.0, top_p=1.0, stop=None, seed=None)


def test_a_valid_chat_request():
    request = build_request(LIMITS, {"messages": [{"role": "user", "content": "hi"}], **OK, "stop": "###", "seed": 7})
    assert request.messages == (Message("user", "hi"),) and request.stop == ("###",)
    assert request.deterministic


@pytest.mark.parametrize(
    "change, param",
    [
        (dict(messages=None, prompt=None), "messages"),
        (dict(prompt="x"), "messages"),  # both
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "robot", "content": "x"}]), "messages"),
        (dict(messages=[{"role": "user", "content": 3}]), "messages"),
        (dict(messages=[{"role": "user"}]), "messages"),
        (dict(messages=[{"role": "user", "content": "x", "extra": 1}]), "messages"),
        (dict(messages=[{"role": "user", "content": "x"}] * 4), "messages"),
        (dict(messages=[{"role": "user", "content": "x" * 51}]), "messages"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=101), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_requests_name_the_parameter(change, param):
    args = {"messages": [{"role": "user", "content": "hi"}], "prompt": None, **OK, **change}
    with pytest.raises(InvalidParams) as refused:
        build_request(LIMITS, args)
    assert refused.value.data["param"] == param


def test_prompt_bounds():
    with pytest.raises(InvalidParams, match="too long"):
        build_request(LIMITS, {"prompt": "x" * 51, **OK})
    with pytest.raises(InvalidParams, match="empty"):
        build_request(LIMITS, {"prompt": "", **OK})


def test_priority_from_tier_names_or_numbers():
    assert priority_of("free") < priority_of("pro") < priority_of("enterprise") < priority_of("unlimited")
    assert priority_of(5) == 5
    with pytest.raises(InvalidParams):
        priority_of("gold")


# -- slots ---------------------------------------------------------------------


async def _hold(pool: SlotPool, priority: int, order: list[str], label: str, release: asyncio.Event) -> None:
    async with pool.acquire(priority, timeout=5):
        order.append(label)
        await release.wait()


async def test_queue_is_served_by_priority_then_arrival():
    pool = SlotPool(1, 10)
    order: list[str] = []
    gate = asyncio.Event()
    first = asyncio.create_task(_hold(pool, 0, order, "first", gate))
    await asyncio.sleep(0)
    waiters = []
    for label, priority in [("free-1", 0), ("pro-1", 1), ("enterprise", 2), ("free-2", 0), ("pro-2", 1)]:
        waiters.append(asyncio.create_task(_hold(pool, priority, order, label, gate)))
        await asyncio.sleep(0)
    assert pool.state() == {"slots": 1, "in_use": 1, "queued": 5, "limit": 10}
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, *waiters), 5)
    assert order == ["first", "enterprise", "pro-1", "pro-2", "free-1", "free-2"]
    assert pool.state() == {"slots": 1, "in_use": 0, "queued": 0, "limit": 10}


async def test_full_queue_refuses_with_its_state():
    pool = SlotPool(1, 1)
    gate = asyncio.Event()
    holders = [asyncio.create_task(_hold(pool, 0, [], str(i), gate)) for i in range(2)]
    await wait_until(lambda: pool.queued == 1, 5, message="the second holder never queued")
    with pytest.raises(Unavailable) as refused:
        async with pool.acquire(2):
            pass
    assert refused.value.data == {"slots": 1, "in_use": 1, "queued": 1, "limit": 1, "retry_safe": True,
                                   "reason": "queue_full"}
    gate.set()
    await asyncio.gather(*holders)


async def test_cancelled_and_timed_out_waiters_leave_the_queue():
    changes = []
    pool = SlotPool(1, 5, on_change=lambda: changes.append(pool.state()))
    gate = asyncio.Event()
    holder = asyncio.create_task(_hold(pool, 0, [], "h", gate))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(_hold(pool, 0, [], "w", gate))
    await wait_until(lambda: pool.queued == 1, 5, message="the waiter never queued")
    waiter.cancel()
    await asyncio.sleep(0)
    assert pool.queued == 0
    with pytest.raises(Timeout) as late:
        async with pool.acquire(0, timeout=0.05):
            pass
    assert late.value.data["queued"] == 0 and pool.queued == 0
    gate.set()
    await holder
    assert pool.in_use == 0 and changes  # every change was reported


async def test_a_slot_granted_to_a_waiter_that_just_gave_up_moves_on():
    pool = SlotPool(1, 5)
    gate, order = asyncio.Event(), []
    holder = asyncio.create_task(_hold(pool, 0, order, "h", gate))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(_hold(pool, 1, order, "quitter", gate))
    patient = asyncio.create_task(_hold(pool, 0, order, "patient", gate))
    await wait_until(lambda: pool.queued == 2, 5, message="the two waiters never queued")
    gate.set()
    await asyncio.sleep(0)  # holder released: the slot is handed to the quitter...
    quitter.cancel()  # ...which is cancelled before it could run
    await asyncio.wait_for(asyncio.gather(holder, patient, return_exceptions=True), 2)
    assert "patient" in order and pool.in_use == 0 and pool.queued == 0


# -- the cache -----------------------------------------------------------------


def _request(**change) -> GenerateRequest:
    base = dict(messages=None, prompt="hello", max_tokens=8, temperature=0.0, top_p=1.0, stop=(), seed=None)
    return GenerateRequest(**{**base, **change})


def test_cache_key_covers_every_input():
    base = cache_key("m", _request())
    variants = [cache_key("other", _request())] + [
        cache_key("m", _request(**change)) for change in (
            dict(prompt="hello!"), dict(max_tokens=9), dict(temperature=0.5, seed=1), dict(top_p=0.9),
            dict(stop=("x",)), dict(seed=3), dict(prompt=None, messages=(Message("user", "hello"),)),
        )
    ]
    assert base == cache_key("m", _request()) and len({base, *variants}) == len(variants) + 1
    assert _request(seed=3, temperature=0.9).deterministic and not _request(temperature=0.5).deterministic


def test_cache_ttl_bounds_and_counts():
    now = [0.0]
    cache = ResponseCache(ttl=10, max_entries=2, max_bytes=10_000, clock=lambda: now[0])
    response = CachedResponse("text", "stop", 3, 1)
    cache.put("a", response)
    assert cache.get("m", "a") == response and cache.get("m", "b") is None
    now[0] = 11
    assert cache.get("m", "a") is None
    assert cache.counts("m") == {"hits": 1, "misses": 2} and len(cache) == 0
    for key in "abc":
        cache.put(key, response)
    assert len(cache) == 2 and cache.get("m", "a") is None  # the oldest went first
    small = ResponseCache(ttl=10, max_entries=100, max_bytes=200)
    for key in "abcd":
        small.put(key, CachedResponse("x" * 50, "stop", 1, 1))
    assert small.bytes <= 200 and len(small) == 1
    small.put("huge", CachedResponse("x" * 500, "stop", 1, 1))
    assert small.get("m", "huge") is None
    disabled = ResponseCache(ttl=0, max_entries=10, max_bytes=1000)
    disabled.put("a", response)
    assert not disabled.enabled and len(disabled) == 0


def test_an_answer_s_own_ttl_overrides_the_cache_s():
    """The operator's `cache_ttl` (passed per request) wins over INFERSWARM_CACHE_TTL, both ways."""
    now = [0.0]
    response = CachedResponse("text", "stop", 3, 1)
    off = ResponseCache(ttl=0, max_entries=10, max_bytes=1000, clock=lambda: now[0])
    assert off.enabled_for(60) and not off.enabled_for(None)
    off.put("a", response, 60)
    now[0] = 59
    assert off.get("m", "a") == response
    now[0] = 61
    assert off.get("m", "a") is None
    on = ResponseCache(ttl=300, max_entries=10, max_bytes=1000, clock=lambda: now[0])
    assert not on.enabled_for(0)
    on.put("b", response, 0)
    assert len(on) == 0


def test_cache_key_is_per_tenant():
    assert cache_key("m", _request(), "user:1") != cache_key("m", _request(), "user:2")
    assert cache_key("m", _request(), "user:1") == cache_key("m", _request(), "user:1")


def test_the_prompt_estimate_counts_pre_tokens_a_lower_bound_of_any_bpe():
    from services.inference.backends.base import estimate_tokens

    def prompt(text: str) -> GenerateRequest:
        return GenerateRequest(None, text, 8, 0.0, 1.0)

    assert estimate_tokens(prompt("count these five plain words")) == 5
    # Words with their space, runs of digits, runs of symbols: " 1234", ",", "!?" are one each.
    assert estimate_tokens(prompt("Hello, world 1234 !?")) == 5
    assert estimate_tokens(prompt("")) == 1  # a prompt always costs something
    chat = GenerateRequest((Message("system", "be brief"), Message("user", "hi there")), None, 8, 0.0, 1.0)
    assert estimate_tokens(chat) == 4  # the contents; no chat-template tokens


def test_catalog_anthropic_entries():
    (spec,) = catalog.parse_models('{"claude": {"backend": "anthropic", "model": "claude-x", "api_key_env": "K"}}')
    assert (spec.url, spec.upstream, spec.api_key_env, spec.kind) == ("https://api.anthropic.com", "claude-x", "K",
                                                                      "chat")
    with pytest.raises(ValueError, match="kind must be one of 'chat' for backend 'anthropic'"):
        catalog.parse_models('{"c": {"backend": "anthropic", "kind": "embedding"}}')


# -- the circuit breaker of a model ------------------------------------------------


def test_breaker_settings_come_from_the_environment():
    config = load(InferenceConfig, {})
    assert (config.breaker_failures, config.breaker_cooldown) == (5, 5.0)
    config = load(InferenceConfig, {"INFERSWARM_BREAKER_FAILURES": "3", "INFERSWARM_BREAKER_COOLDOWN": "0.5"})
    assert (config.breaker_failures, config.breaker_cooldown) == (3, 0.5)
    with pytest.raises(ConfigError, match="INFERSWARM_BREAKER_FAILURES"):
        load(InferenceConfig, {"INFERSWARM_BREAKER_FAILURES": "0"})


def test_an_open_breaker_refuses_with_whole_seconds_to_wait_then_lets_one_probe_through():
    now = [100.0]
    changes: list[bool] = []
    health = ModelHealth(name="m", threshold=2, cooldown=2.5, clock=lambda: now[0],
                         on_change=lambda: changes.append(health.withdrawn))
    assert health.breaker.max_cooldown == 30.0  # 12 x the cooldown
    failure = Unavailable("down")
    health.failed(failure)
    health.admit()  # one failure: unhealthy, but the breaker is still closed
    assert not health.healthy and not health.withdrawn
    health.failed(failure)
    assert health.withdrawn
    with pytest.raises(Unavailable) as refused:
        health.admit()
    assert refused.value.data == {"retry_safe": True, "retry_after": 3, "reason": "breaker_open"}
    now[0] += 2.4
    with pytest.raises(Unavailable) as refused:
        health.admit()
    assert refused.value.data["retry_after"] == 1  # at least 1
    now[0] += 0.1
    health.admit()  # half-open: the probe
    with pytest.raises(Unavailable):
        health.admit()  # only one
    assert health.withdrawn
    health.succeeded()
    assert not health.withdrawn and health.healthy
    health.admit()
    assert changes[-1] is False and True in changes


@pytest.mark.unit
def test_keys_resting_until_their_reset_do_not_open_the_models_breaker():
    from shared.errors import Unavailable
    from services.inference.health import KEYS_RESTING, ModelHealth

    health = ModelHealth(name="m", threshold=2)
    for _ in range(5):  # probes while every key waits for its reset: the pool fails fast on its own
        health.failed(Unavailable("keys resting", {"reason": KEYS_RESTING, "retry_after": 1}))
    assert not health.healthy and health.breaker.state == "closed"
    health.failed(Unavailable("down"))
    health.failed(Unavailable("down"))
    assert health.breaker.state == "open"
