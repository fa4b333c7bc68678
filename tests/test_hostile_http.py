"""Hostile input (issue 9) to the web service's JSON endpoints, over real HTTP.

The stack is the one tests/test_web_api.py uses (`inferswarm up`: real
PostgreSQL, auth, a worker on a model server we control, the web process);
hypothesis sends random JSON bodies, near-valid bodies and non-JSON bytes to
the REST and /v1 endpoints, with and without credentials. Every reply is a
success or a typed JSON error; never a 500. Connections that send nothing, or
half a request head, are closed after the idle timeout while others are
served, and a stream longer than that timeout is not cut by it. A client that
stops reading a stream holds the model server to a bounded lead (credit flow
control from web through the gateway to the worker, TCP below), and gets the
whole answer when it reads again. And under rounds of all of that at once --
random RPC frames to the gateway, random HTTP bodies to web, random datagrams
to the gateway's DHT node, connections opened and dropped -- the processes'
memory stays where it was after the first rounds.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import MeshConfig, Secret
from shared.dht import service_topic
from shared.dht.interface import Provider
from shared.errors import MeshError
from shared.rpc import codec
from shared.runner import join_mesh
from web_support import MODEL, PASSWORD, web_stack

pytestmark = [pytest.mark.timeout(120), pytest.mark.stack]

IDLE_TIMEOUT = 1.5  # INFERSWARM_WEB_IDLE_TIMEOUT of this module's stack
LONG_ANSWER = 20_000  # tokens of ~1 KB; INFERSWARM_MAX_TOKENS of this module's stack allows them
PAD = "x" * 1000

ENDPOINTS = [
    ("POST", "/api/auth/register"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/auth/api-keys"),
    ("DELETE", "/api/auth/api-keys/999999"),  # not the fuzzer's own key: it must stay valid
    ("POST", "/api/inference"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
]
FIELDS = ["model", "messages", "prompt", "max_tokens", "stream", "stream_options", "temperature", "n",
          "username", "email", "password", "username_or_email", "name", "expires_in_days", "role", "content"]

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=30), st.sampled_from([MODEL, "user", "assistant", "system", ""])),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), children,
                                               max_size=5)),
    max_leaves=15,
)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bad"]),
                                           "content": st.one_of(st.text(max_size=20), json_values)}), max_size=3)
#: Near-valid bodies: the right field names with random (often right-typed) values.
shaped = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just(MODEL), json_values),
        "messages": st.one_of(messages, json_values),
        "prompt": st.one_of(st.text(max_size=30), json_values),
        "max_tokens": st.one_of(st.integers(-5, 8), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": st.one_of(st.just({"include_usage": True}), json_values),
        "username": st.one_of(st.text(max_size=12), json_values),
        "username_or_email": st.one_of(st.text(max_size=12), json_values),
        "email": st.one_of(st.just("x@example.com"), json_values),
        "password": st.one_of(st.text(max_size=12), json_values),
        "expires_in_days": st.one_of(st.integers(-3, 10**6), json_values),
    },
)
bodies = st.one_of(
    st.builds(lambda v: json.dumps(v).encode(), shaped),
    st.builds(lambda v: json.dumps(v).encode(), shaped),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.binary(max_size=80),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": NaN}', b'"\\ud800"', b"\xff\xfe", b"1e999999"]),
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Any]:
    with web_stack(tmp_path_factory.mktemp("hostile-http"), INFERSWARM_WEB_IDLE_TIMEOUT=str(IDLE_TIMEOUT),
                   INFERSWARM_MAX_TOKENS=str(LONG_ANSWER)) as running:
        yield running


def request(base: str, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as reply:
            return reply.status, reply.headers.get_content_type(), reply.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read(1 << 20)


@pytest.fixture(scope="module")
def credentials(stack) -> tuple[str, str]:
    """A session token and an API key of a fresh user."""
    body = json.dumps({"username": "fuzzer", "email": "fuzzer@example.com", "password": PASSWORD}).encode()
    status, _, text = request(stack.base_url, "POST", "/api/auth/register", body, {"Content-Type": "application/json"})
    assert status == 201, text
    body = json.dumps({"username_or_email": "fuzzer", "password": PASSWORD}).encode()
    status, _, text = request(stack.base_url, "POST", "/api/auth/login", body, {"Content-Type": "application/json"})
    assert status == 200, text
    token = json.loads(text)["token"]
    body = json.dumps({"name": "fuzz"}).encode()
    status, _, text = request(stack.base_url, "POST", "/api/auth/api-keys", body,
                              {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert status == 201, text
    return token, json.loads(text)["api_key"]


def check(status: int, content_type: str, payload: bytes) -> None:
    assert status != 500 and status < 600, (status, payload[:300])
    if status >= 400:
        assert content_type == "application/json", (status, content_type, payload[:300])
        error = json.loads(payload)["error"]
        assert error["message"], error
        # a string code; or, on /v1, OpenAI's null code for a bad parameter, body or method, with its type
        assert (isinstance(error["code"], str) and error["code"]) or (
            error["code"] is None and error.get("type") == "invalid_request_error"), error
        # past 4xx, only a typed "try again later" from the mesh is acceptable
        assert status < 500 or error["code"] in ("UNAVAILABLE", "TIMEOUT", "NO_PROVIDERS"), (status, error)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(ENDPOINTS), bodies,
       st.sampled_from(["api-key", "api-key", "token", "none", "bad-bearer", "bad-api-key"]),
       st.sampled_from(["application/json", "application/json", "text/plain"]))
def test_random_bodies_get_typed_errors_never_500(stack, credentials, endpoint, body, auth, content_type):
    method, path = endpoint
    token, api_key = credentials
    headers = {"Content-Type": content_type}
    if auth == "token":
        headers["Authorization"] = f"Bearer {token}"
    elif auth == "api-key":
        headers["Authorization"] = f"Bearer {api_key}"
        headers["X-API-Key"] = api_key
    elif auth == "bad-bearer":
        headers["Authorization"] = "Bearer " + "x" * 40
    elif auth == "bad-api-key":
        headers["Authorization"] = "Bearer isk_" + "0" * 40
    check(*request(stack.base_url, method, path, body, headers))


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_silent_and_half_sent_connections_are_closed_while_others_are_served(stack, credentials):
    port = int(stack.base_url.rsplit(":", 1)[1])
    opened = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    half = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    try:
        for sock in half:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len")
        # the others are served meanwhile, at once
        started = time.monotonic()
        status, _, body = request(stack.base_url, "GET", "/v1/models", None,
                                  {"Authorization": f"Bearer {credentials[1]}"})
        assert status == 200 and MODEL in body.decode()
        assert time.monotonic() - started < 2.0
        for sock in silent + half:  # recv waits until the server closes it
            assert closed_by_peer(sock)
        elapsed = time.monotonic() - opened
        assert IDLE_TIMEOUT - 0.1 <= elapsed <= IDLE_TIMEOUT + 5.0, elapsed
    finally:
        for sock in silent + half:
            sock.close()


def test_a_stream_longer_than_the_idle_timeout_is_not_cut(stack, credentials):
    stack.model.token_delay = 0.2  # the model's 14 words take ~2.8 s, past IDLE_TIMEOUT
    try:
        body = json.dumps({"model": MODEL, "stream": True,
                           "messages": [{"role": "user", "content": "a slow answer, please"}]}).encode()
        req = urllib.request.Request(f"{stack.base_url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {credentials[1]}"})
        started = time.monotonic()
        with urllib.request.urlopen(req, timeout=30) as reply:
            events = [line for line in reply.read().decode().splitlines() if line.startswith("data: ")]
        assert time.monotonic() - started > IDLE_TIMEOUT
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1] if json.loads(e[6:])["choices"])
        assert text.split() == "The quick brown fox jumps over the lazy dog near the quiet river bank".split()
    finally:
        stack.model.token_delay = 0.0


def dechunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's data."""
    data, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            return bytes(data)
        data += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2


@pytest.mark.parametrize("n", [1, 2])  # with n choices, every choice's stream is held
def test_a_reader_that_stops_holds_the_model_to_a_bounded_lead_then_gets_everything(stack, credentials, n):
    reply = stack.model.reply
    stack.model.reply = " ".join(f"w{i}{PAD}" for i in range(LONG_ANSWER))  # ~20 MB
    port = int(stack.base_url.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connect: the window stays small
    received = bytearray()
    try:
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        before = stack.model.pieces_sent  # of the earlier tests
        body = json.dumps({"model": MODEL, "stream": True, "max_tokens": LONG_ANSWER, "n": n,
                           "messages": [{"role": "user", "content": "everything, slowly read"}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {credentials[1]}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        # Stop reading. The model server is paused once the buffers on the way
        # are full: the kernel's socket buffers (a few MB per TCP hop on
        # loopback) and the streams' 64-chunk credit windows, nothing more.
        paused_at = stack.model.pieces_sent
        deadline = time.monotonic() + 20
        while True:
            time.sleep(1.0)
            if stack.model.pieces_sent == paused_at:
                break
            paused_at = stack.model.pieces_sent
            assert time.monotonic() < deadline, "the model server kept generating for a reader that stopped"
        # Loopback's buffers grow with the kernel's autotuning (tcp_rmem's maximum
        # is 32 MB on some machines): about half the answer was seen held there.
        assert paused_at - before < n * LONG_ANSWER * 3 // 4, paused_at - before
        # Read again: the rest arrives, every token once, and the stream ends.
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(1 << 16)
            assert data, "the stream was cut"
            received += data
    finally:
        sock.close()
        stack.model.reply = reply
    events = [json.loads(event[6:]) for event in dechunked(bytes(received).split(b"\r\n\r\n", 1)[1]).split(b"\n\n")
              if event.startswith(b"data: {")]
    for index in range(n):
        words = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                        if e["choices"] and e["choices"][0]["index"] == index).split()
        assert words == [f"w{i}{PAD}" for i in range(LONG_ANSWER)]


async def _lookup_gateway(stack, data_dir) -> Provider:
    config = MeshConfig(data_dir=data_dir, bootstrap=(stack.bootstrap,), mesh_secret=Secret(stack.mesh_secret))
    async with AsyncExitStack() as resources:
        node = await join_mesh(resources, "memory-probe", config)
        for _ in range(50):
            try:
                return (await node.discovery.lookup(service_topic("gateway")))[0]
            except MeshError:  # not announced yet
                await asyncio.sleep(0.2)
    raise AssertionError("no gateway announced")


def _hostile_frames(rng: random.Random, api_key: str) -> list[bytes]:
    """Garbage, near-valid envelopes, refused calls: what an outsider may send the gateway."""
    frames = []
    for i in range(1500):
        kind = i % 6
        if kind == 0:
            frames.append(rng.randbytes(rng.randrange(1, 400)))
        elif kind == 1:
            frames.append(msgpack.packb([1, rng.randrange(0, 9), rng.randrange(0, 2**40), "x" * rng.randrange(0, 40)]))
        elif kind == 2:  # a valid request with a wrong key: UNAUTHENTICATED
            frames.append(codec.encode_request(rng.randrange(2**40), "gateway.infer",
                                               {"api_key": "isk_" + rng.randbytes(32).hex()[:43], "prompt": "hi"},
                                               5000, rng.randbytes(8).hex()))
        elif kind == 3:  # an internal method from an outsider: FORBIDDEN
            frames.append(codec.encode_request(rng.randrange(2**40), "rpc.ping", {}, 5000, "t"))
        elif kind == 4:  # wrong parameters: INVALID_PARAMS
            frames.append(codec.encode_request(rng.randrange(2**40), "gateway.infer",
                                               {"api_key": api_key, "prompt": 7, "bogus": [1, 2]}, 5000, "t"))
        else:  # an unknown method, a cancel and a credit for nothing
            frames.append(codec.encode_request(rng.randrange(2**40), f"nope.{i}", {}, 5000, "t"))
            frames.append(codec.encode_cancel(rng.randrange(2**40)))
            frames.append(codec.encode_credit(rng.randrange(2**40), 5))
    return frames


def _flood(stack, gateway: Provider, dht_port: int, api_key: str, rng: random.Random) -> None:
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()  # an outsider: public methods only
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = gateway.curve_key, public, secret
        sock.linger = 0
        sock.connect(gateway.endpoint)
        for frame in _hostile_frames(rng, api_key):
            sock.send(frame)
            while sock.poll(0):  # keep our queue drained: replies are not the server's to hold
                codec.decode(sock.recv())
        deadline = time.monotonic() + 10
        while sock.poll(500) and time.monotonic() < deadline:
            sock.recv()
        sock.close(linger=0)
    finally:
        context.term()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(1000):
            udp.sendto(bytes([rng.randrange(3)]) + rng.randbytes(rng.randrange(20, 300)), ("127.0.0.1", dht_port))
    for i in range(150):
        body = rng.choice([b"", b"{", b"[]", b'{"model": 1}', rng.randbytes(200),
                           json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}],
                                       "max_tokens": -1}).encode()])
        check(*request(stack.base_url, "POST", rng.choice(["/v1/chat/completions", "/api/auth/login",
                                                           "/api/inference"]), body,
                       {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}))
    port = int(stack.base_url.rsplit(":", 1)[1])
    for sock in [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]:
        sock.close()


def _rss_mb(pids: dict[str, int]) -> dict[str, float]:
    return {name: psutil.Process(pid).memory_info().rss / 2**20 for name, pid in pids.items()}


def test_memory_stays_bounded_under_rounds_of_hostile_traffic(stack, credentials, tmp_path):
    gateway = asyncio.run(_lookup_gateway(stack, tmp_path))
    pids = {c["name"]: c["pid"] for c in stack.ready["children"] if c["name"] in ("gateway", "web", "auth")}
    dht_port = next(c.laddr.port for c in psutil.Process(pids["gateway"]).net_connections("udp"))
    rng = random.Random(9)
    for _ in range(2):  # warm-up: pools, caches, the allocator's arenas
        _flood(stack, gateway, dht_port, credentials[1], rng)
    before = _rss_mb(pids)
    for _ in range(4):
        _flood(stack, gateway, dht_port, credentials[1], rng)
    after = _rss_mb(pids)
    growth = {name: round((after[name] - before[name]) / before[name], 3) for name in pids}
    print(f"[memory] MiB before {before}, after {after}: growth {growth}")
    assert all(g < 0.10 for g in growth.values()), growth
    # and everything still works
    status, _, body = request(stack.base_url, "GET", "/v1/models", None, {"Authorization": f"Bearer {credentials[1]}"})
    assert status == 200 and MODEL in body.decode()
