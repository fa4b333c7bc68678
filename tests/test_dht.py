"""Real DHT nodes on 127.0.0.1 UDP, with every timing shrunk.

Covers: multi-provider topics, updates, expiry of a dead provider, immediate
withdrawal, forged records and garbage datagrams, recovery after a node dies
(bmuller/kademlia#98), empty lookups, restart from the neighbours file, late
and restarting seeds, the Announcer, and `python -m shared.dht`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kademlia.node import Node
from structlog.testing import capture_logs

from shared.dht import Announcer, DHTConfig, KademliaDiscovery, Provider, sign_record, topic_key
from shared.dht.record import RECORD_CONTEXT, wall_ms
from shared.errors import NoProviders, Unavailable
from shared.identity import MeshCredential, NodeIdentity, curve_key_of
from waiting import wait_until

pytestmark = pytest.mark.timeout(30)

TOPIC = "inferswarm/auth/v1"
FAST = DHTConfig(
    ttl=1.5,
    max_ttl=10.0,
    clock_skew=1.0,
    rpc_timeout=0.3,
    ping_interval=0.5,
    dead_ttl=3.0,
    cache_ttl=0.2,
    backoff_initial=0.1,
    backoff_max=0.4,
    save_interval=0.5,
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def secret() -> bytes:
    return MeshCredential.new_secret()


@pytest.fixture
def mesh(secret: bytes) -> MeshCredential:
    return MeshCredential(secret)


@asynccontextmanager
async def cluster(mesh: MeshCredential, count: int, *, chain: bool = False) -> AsyncIterator[list[KademliaDiscovery]]:
    """`count` nodes, each seeded with the first one (star) or the previous one (chain)."""
    async with AsyncExitStack() as stack:
        nodes: list[KademliaDiscovery] = []
        for _ in range(count):
            seeds = [nodes[-1 if chain else 0].address] if nodes else []
            node = KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh, seeds=seeds, config=FAST)
            nodes.append(await stack.enter_async_context(node))
        yield nodes


def endpoint(index: int) -> str:
    return f"tcp://127.0.0.1:{5000 + index}"


async def announce(node: KademliaDiscovery, index: int, topic: str = TOPIC, **kwargs: Any) -> None:
    await node.announce(topic, service="auth", endpoint=endpoint(index), version="1.0", **kwargs)


async def endpoints(node: KademliaDiscovery, topic: str = TOPIC) -> set[str]:
    try:
        return {provider.endpoint for provider in await node.lookup(topic)}
    except NoProviders:
        return set()


async def eventually(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> float:
    """Poll `check` until it is true; returns the seconds it took."""
    start = time.monotonic()
    for _ in range(int(timeout / interval) + 1):
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        await asyncio.sleep(interval)
    raise AssertionError(f"not true within {timeout} s: {check}")


def contact_ids(node: KademliaDiscovery) -> set[bytes]:
    return {contact.id for contact in node.server.protocol.contacts()}


# -- topics with many providers ----------------------------------------------------


@pytest.mark.rpc
async def test_every_node_sees_all_providers_and_their_updates(mesh):
    async with cluster(mesh, 5, chain=True) as nodes:
        for i in range(3):
            await announce(nodes[i], i, load={"queue": i})
        keys = sorted(node.identity.public_key for node in nodes[:3])
        for node in nodes:
            providers = await node.lookup(TOPIC)
            assert [p.node_key for p in providers] == keys  # sorted by node key
            assert {p.endpoint for p in providers} == {endpoint(i) for i in range(3)}
            assert all(p.curve_key == curve_key_of(p.node_key) for p in providers)

        before = {p.node_key: p for p in await nodes[4].lookup(TOPIC)}
        await announce(nodes[0], 0, load={"queue": 9})

        async def everyone_sees_the_update() -> bool:
            for node in nodes:
                providers = {p.node_key: p for p in await node.lookup(TOPIC)}
                if providers[nodes[0].identity.public_key].load != {"queue": 9}:
                    return False
            return True

        await wait_until(everyone_sees_the_update, FAST.cache_ttl + 3, message="the new load never reached everyone")
        for node in nodes:
            providers = {p.node_key: p for p in await node.lookup(TOPIC)}
            updated = providers[nodes[0].identity.public_key]
            assert len(providers) == 3 and updated.load == {"queue": 9}
            assert updated.seq > before[nodes[0].identity.public_key].seq
        # storing nodes keep one record per announcing node
        assert all(node.server.storage.live_count(topic_key(TOPIC)) <= 3 for node in nodes)


@pytest.mark.rpc
async def test_a_lone_first_node_serves_its_own_records(mesh):
    async with cluster(mesh, 1) as (node,):
        await announce(node, 0)
        assert await endpoints(node) == {endpoint(0)}


@pytest.mark.rpc
async def test_empty_lookup_raises_and_is_not_cached(mesh):
    async with cluster(mesh, 2) as nodes:
        topic = "inferswarm/nobody/v1"
        with pytest.raises(NoProviders) as caught:
            await nodes[1].lookup(topic)
        assert topic in str(caught.value) and caught.value.data == {"topic": topic}
        assert isinstance(caught.value, Unavailable)
        await announce(nodes[0], 0, topic)
        assert await endpoints(nodes[1], topic) == {endpoint(0)}  # no cached emptiness


@pytest.mark.rpc
async def test_a_lookup_past_its_freshness_answers_at_once_and_refreshes_behind(mesh):
    async with cluster(mesh, 3) as nodes:
        await announce(nodes[1], 1, ttl=8.0)
        assert await endpoints(nodes[2]) == {endpoint(1)}
        await announce(nodes[0], 0, ttl=8.0)  # a new provider: only a crawl can tell
        await wait_until(lambda: nodes[2]._cache.get(TOPIC) is None, 2, message="the cached lookup never aged")
        # The stale answer: had the caller waited on a crawl, it would name both providers.
        assert await endpoints(nodes[2]) == {endpoint(1)}
        assert len(nodes[2]._refreshing) == 1  # the crawl runs behind it, once for any number of callers
        assert await endpoints(nodes[2]) in ({endpoint(1)}, {endpoint(0), endpoint(1)})
        assert len(nodes[2]._refreshing) <= 1
        await eventually(lambda: _both(nodes[2]), timeout=2.0)  # the refresh's answer replaced it


async def _both(node: KademliaDiscovery) -> bool:
    return await endpoints(node) == {endpoint(0), endpoint(1)}


# -- expiry and withdrawal ------------------------------------------------------------


@pytest.mark.rpc
async def test_a_provider_that_dies_disappears_within_its_ttl(mesh):
    async with cluster(mesh, 4) as nodes:
        await announce(nodes[2], 2, ttl=1.0)
        await announce(nodes[3], 3, ttl=8.0)
        assert await endpoints(nodes[0]) == {endpoint(2), endpoint(3)}
        await nodes[2].close()  # dies: no withdrawal, no tombstone
        took = await eventually(lambda: _only(nodes[0], endpoint(3)), timeout=3.0)
        assert took <= 1.0 + FAST.cache_ttl + 0.5


async def _only(node: KademliaDiscovery, expected: str) -> bool:
    return await endpoints(node) == {expected}


@pytest.mark.rpc
async def test_withdrawal_is_immediate_and_blocks_replays(mesh):
    async with cluster(mesh, 4) as nodes:
        await announce(nodes[1], 1, ttl=8.0)
        assert await endpoints(nodes[3]) == {endpoint(1)}
        key = topic_key(TOPIC)
        (old_blob,) = nodes[0].server.storage.get(key)
        await nodes[1].withdraw(TOPIC)
        assert await endpoints(nodes[1]) == set()  # its own cache was dropped

        async def gone() -> bool:
            return await endpoints(nodes[3]) == set()

        # once the other node's lookup cache (0.2 s) expires; far sooner than the record's 8 s
        await wait_until(gone, FAST.cache_ttl + 2, message="the withdrawn provider is still found")
        # replaying the older record to a storing node is refused
        storing = Node(nodes[0].identity.node_id, "127.0.0.1", nodes[0].port)
        answered, accepted = await nodes[2].server.protocol.call_store(storing, key, old_blob)
        assert answered and not accepted
        assert await endpoints(nodes[2]) == set()


# -- hostile input ---------------------------------------------------------------------


class RawPeer(asyncio.DatagramProtocol):
    """A bare UDP socket that keeps the responses it receives."""

    def __init__(self) -> None:
        self.responses: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x01":
            self.responses.put_nowait(data)


async def raw_request(transport, peer: RawPeer, addr, method: str, args: list) -> Any:
    msg_id = os.urandom(20)
    transport.sendto(b"\x00" + msg_id + msgpack.packb([method, args]), addr)
    for _ in range(10):  # skip stale replies, boundedly
        data = await asyncio.wait_for(peer.responses.get(), 2.0)
        if data[1:21] == msg_id:
            return msgpack.unpackb(data[21:])
    raise AssertionError("no reply")


def forged_records(victim: NodeIdentity, mesh: MeshCredential) -> list[bytes]:
    outsider = NodeIdentity.generate()
    other_mesh = MeshCredential(MeshCredential.new_secret())
    fields = dict(topic=TOPIC, service="auth", endpoint="tcp://10.6.6.6:1", version="1.0", ttl=5)
    non_member = sign_record(outsider, other_mesh.certify(outsider.public_key), **fields)
    # claims the victim's node key and (public) member cert, signed by the outsider
    body = {
        "t": TOPIC, "s": "auth", "e": "tcp://10.6.6.6:1", "k": victim.public_key,
        "c": mesh.certify(victim.public_key), "v": "1.0", "l": {}, "q": wall_ms() + 500, "d": 5,
    }
    body_bytes = msgpack.packb(body)
    impostor = msgpack.packb([body_bytes, outsider.sign(RECORD_CONTEXT + body_bytes)])
    return [non_member, impostor]


def garbage_datagrams() -> list[bytes]:
    some_id = os.urandom(20)

    def request(payload: bytes) -> bytes:
        return b"\x00" + os.urandom(20) + payload

    shapes: list[Any] = [
        "not a list", ["ping"], ["ping", "x"], ["ping", [1]], ["ping", [b"short"]], ["nope", []],
        [1, []], [None, None], {"a": 1}, ["store", [some_id, some_id, 123]],
        ["find_value", [some_id, b"short"]], ["find_node", [some_id] * 3], ["__init__", []],
        ["rpc_ping", [some_id]], ["datagram_received", [b"x", ["1.2.3.4", 1]]],
    ]
    return [
        *(os.urandom(size) for size in (1, 20, 21, 22, 100, 5000)),  # (asyncio never sends b"")
        *(request(msgpack.packb(shape)) for shape in shapes),
        request(msgpack.packb(["store", [some_id, some_id, b"x" * 60000]])),  # huge
        request(b"\x91" * 5000 + b"\xc0"),  # nested too deep
        request(b"\x92\xa2\xff\xfe\x90"),  # invalid UTF-8
        request(msgpack.packb({1: 2})),  # non-string map key
        request(msgpack.packb(msgpack.ExtType(1, b"x"))),
        request(b"\xc1"),  # never-used msgpack byte
        b"\x01" + os.urandom(20) + msgpack.packb(True),  # reply to nothing
        b"\x07" + os.urandom(40),  # unknown kind
    ]


DROPPED = ("dht.datagram_dropped", "dht.request_malformed", "dht.unknown_method",
           "dht.bad_arguments", "dht.unexpected_response")


@pytest.mark.rpc
async def test_forged_records_and_garbage_do_not_get_through(mesh):
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        async with cluster(mesh, 3) as nodes:
            await announce(nodes[2], 2)
            transport, peer = await loop.create_datagram_endpoint(RawPeer, local_addr=("127.0.0.1", 0))
            target = ("127.0.0.1", nodes[1].port)
            sender = os.urandom(20)
            try:
                garbage = garbage_datagrams()
                with capture_logs() as logs:
                    for blob in forged_records(nodes[2].identity, mesh):
                        reply = await raw_request(transport, peer, target, "store", [sender, topic_key(TOPIC), blob])
                        assert reply is False
                    for data in garbage:
                        transport.sendto(data, target)
                    await asyncio.sleep(0.1)
                    assert await raw_request(transport, peer, target, "ping", [sender]) == nodes[1].identity.node_id
            finally:
                transport.close()
            events = [entry["event"] for entry in logs]
            assert events.count("dht.store_rejected") == 2
            assert sum(events.count(event) for event in DROPPED) == len(garbage), events
            assert "dht.datagram_failed" not in events
            for node in nodes:
                providers = await node.lookup(TOPIC)
                assert [(p.endpoint, p.node_key) for p in providers] == [(endpoint(2), nodes[2].identity.public_key)]
    finally:
        loop.set_exception_handler(None)
    assert errors == []


@pytest.mark.rpc
async def test_one_address_posing_as_many_nodes_holds_one_contact(mesh):
    loop = asyncio.get_running_loop()
    async with cluster(mesh, 2) as nodes:
        target = nodes[1]
        transport, peer = await loop.create_datagram_endpoint(RawPeer, local_addr=("127.0.0.1", 0))
        try:
            ids = [os.urandom(20) for _ in range(40)]
            for node_id in ids:
                assert await raw_request(transport, peer, ("127.0.0.1", target.port), "ping", [node_id]) \
                    == target.identity.node_id
            address = transport.get_extra_info("sockname")[:2]
            at_address = [c.id for c in target.server.protocol.contacts() if (c.ip, c.port) == address]
            # the latest id replaced the others; the real neighbour is untouched
            assert at_address == [ids[-1]]
            assert nodes[0].identity.node_id in contact_ids(target)
        finally:
            transport.close()


# -- dead nodes (bmuller/kademlia#98) --------------------------------------------------


async def _timed_round(node: KademliaDiscovery, index: int) -> float:
    start = time.perf_counter()
    await announce(node, index)
    await node.lookup(TOPIC)  # not cached: its own announce dropped the entry
    return time.perf_counter() - start


@pytest.mark.rpc
async def test_announce_and_lookup_are_fast_again_after_a_node_dies(mesh):
    async with cluster(mesh, 5) as nodes:
        for i in range(4):
            await announce(nodes[i], i)
        dead = nodes[4]
        await dead.close()
        # right away: the dead node's timeout is paid at most once
        first = [await _timed_round(nodes[1], 1) for _ in range(4)]
        assert sum(first) < FAST.rpc_timeout + 0.3, first
        assert sorted(first)[-2] < 0.2, first
        # a few seconds later every survivor has dropped it and is fast
        await wait_until(lambda: all(dead.identity.node_id not in contact_ids(node) for node in nodes[:4]),
                         10 * (FAST.ping_interval + FAST.rpc_timeout), message="a survivor kept the dead contact")
        for i, node in enumerate(nodes[:4]):
            assert dead.identity.node_id not in contact_ids(node)
            timings = [await _timed_round(node, i) for _ in range(3)]
            assert max(timings) < 0.2, timings


# -- joining ----------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.rpc
async def test_restart_from_the_saved_neighbours_needs_no_seed(mesh, tmp_path):
    path = tmp_path / "neighbours.json"
    identity = NodeIdentity.generate()
    async with cluster(mesh, 2) as nodes:
        node = KademliaDiscovery(
            identity=identity, mesh=mesh, seeds=[nodes[0].address], neighbours_path=path, config=FAST
        )
        async with node:
            assert contact_ids(node) == {n.identity.node_id for n in nodes}
        saved = json.loads(path.read_text())
        assert saved["node_id"] == identity.node_id.hex()
        assert set(saved["neighbours"]) == {n.address for n in nodes}

        async with KademliaDiscovery(identity=identity, mesh=mesh, neighbours_path=path, config=FAST) as again:
            assert again.server.node.id == identity.node_id
            assert contact_ids(again) == {n.identity.node_id for n in nodes}
            await announce(again, 7)
            assert await endpoints(nodes[1]) == {endpoint(7)}


@pytest.mark.rpc
async def test_a_late_seed_is_retried_and_a_restarted_seed_rejoined(mesh):
    port = free_udp_port()
    seed_identity = NodeIdentity.generate()

    def seed() -> KademliaDiscovery:
        return KademliaDiscovery(identity=seed_identity, mesh=mesh, port=port, config=FAST)

    async with KademliaDiscovery(
        identity=NodeIdentity.generate(), mesh=mesh, seeds=[f"localhost:{port}"], config=FAST
    ) as node:
        assert not node.server.has_contacts()  # the seed is not up: start did not fail
        async with seed():
            await eventually(node.server.has_contacts, timeout=3.0)
        await eventually(lambda: not node.server.has_contacts(), timeout=3.0)
        async with seed() as restarted:
            await eventually(node.server.has_contacts, timeout=3.0)
            await announce(node, 1)
            assert await endpoints(restarted) == {endpoint(1)}


# -- announcer ----------------------------------------------------------------------------


@pytest.mark.rpc
async def test_announcer_refreshes_pokes_and_withdraws(mesh):
    other = "inferswarm/model/tiny"
    load = {"queue": 0}
    async with cluster(mesh, 3) as nodes:
        announcer = Announcer(
            nodes[1], [TOPIC, other], service="auth", endpoint=endpoint(1), version="1.0",
            load=lambda: dict(load), ttl=1.0, poke_interval=0.1,
        )
        async with announcer:
            for topic in (TOPIC, other):
                assert await endpoints(nodes[2], topic) == {endpoint(1)}
            (first,) = await nodes[2].lookup(TOPIC)
            await asyncio.sleep(2.0)  # twice the ttl: still there only if re-announced
            (later,) = await nodes[2].lookup(TOPIC)
            assert later.seq > first.seq

            load["queue"] = 7
            announcer.poke()
            took = await eventually(lambda: _has_load(nodes[2], {"queue": 7}), timeout=1.0)
            assert took < 0.1 + FAST.cache_ttl + 0.2

        async def withdrawn() -> bool:
            return all([await endpoints(nodes[2], topic) == set() for topic in (TOPIC, other)])

        # withdrawn on leaving: gone once the lookup cache expires, before the 1 s ttl would do it
        await wait_until(withdrawn, FAST.cache_ttl + 0.5, message="the announcer's records outlived it")


@pytest.mark.rpc
async def test_announcer_withdraws_a_hidden_topic_at_once_and_announces_it_again_when_shown(mesh):
    other = "inferswarm/model/tiny"
    hidden: set[str] = set()
    async with cluster(mesh, 3) as nodes:
        announcer = Announcer(
            nodes[1], [TOPIC, other], service="auth", endpoint=endpoint(1), version="1.0",
            hidden=lambda: set(hidden), ttl=8.0, poke_interval=0.1,
        )
        async with announcer:
            assert await endpoints(nodes[2], other) == {endpoint(1)}
            hidden.add(other)
            announcer.poke()

            async def other_gone() -> bool:
                return await endpoints(nodes[2], other) == set()

            # withdrawn (ttl 0), not left to expire: well within the 8 s ttl
            await wait_until(other_gone, FAST.cache_ttl + 1.0, message="the hidden topic is still found")
            assert announcer.announced == [TOPIC]
            assert await endpoints(nodes[2], TOPIC) == {endpoint(1)}  # the other topic stays

            hidden.clear()
            announcer.poke()

            async def other_back() -> bool:
                return await endpoints(nodes[2], other) == {endpoint(1)}

            await wait_until(other_back, FAST.cache_ttl + 1.0, message="the shown topic was not announced again")
            assert announcer.announced == [TOPIC, other]


async def _has_load(node: KademliaDiscovery, load: dict) -> bool:
    return [p.load for p in await node.lookup(TOPIC)] == [load]


class FlakyDiscovery:
    """An in-memory `Discovery` whose first `failures` announces fail."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.records: dict[str, Provider] = {}

    async def announce(self, topic: str, *, service: str, endpoint: str, version: str,
                       load: Mapping[str, Any] | None = None, ttl: float | None = None) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable("no DHT node reachable")
        self.records[topic] = Provider(topic, service, endpoint, b"k" * 32, b"c" * 40, version,
                                       seq=self.calls, ttl=ttl or 30, load=dict(load or {}))

    async def withdraw(self, topic: str) -> None:
        self.records.pop(topic, None)

    async def lookup(self, topic: str, *, timeout: float | None = None) -> list[Provider]:
        if topic not in self.records:
            raise NoProviders(topic)
        return [self.records[topic]]

    def forget(self, topic: str) -> None:
        pass


@pytest.mark.rpc
async def test_announcer_retries_failures_without_dying():
    discovery = FlakyDiscovery(failures=3)
    announcer = Announcer(discovery, [TOPIC], service="auth", endpoint=endpoint(0), version="1.0",
                          ttl=10.0, retry_interval=0.05)
    async with announcer:  # the first failure does not fail the enter
        await eventually(lambda: TOPIC in discovery.records, timeout=1.0)
        assert discovery.calls == 4
    assert discovery.records == {}


# -- the standalone node -------------------------------------------------------------------


@pytest.mark.rpc
async def test_standalone_node_prints_its_address_and_stops_on_sigterm(secret, mesh, tmp_path):
    env = dict(os.environ, INFERSWARM_MESH_SECRET=secret.hex())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.dht", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        address = json.loads(line)["dht"]
        async with KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh, seeds=[address], config=FAST) as node:
            assert node.server.has_contacts()
            await announce(node, 3)
            assert await endpoints(node) == {endpoint(3)}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (tmp_path / "node.key").exists() and not (tmp_path / "mesh.secret").exists()
    assert json.loads((tmp_path / "neighbours.json").read_text())["neighbours"]


@pytest.mark.unit
def test_peer_budget_pays_by_reply_size_refills_and_spares_loopback():
    from shared.dht.budget import PeerBudget

    now = [0.0]
    budget = PeerBudget(rate=1000.0, burst=3000.0, min_cost=500, max_peers=2, clock=lambda: now[0])
    assert budget.admit("127.0.0.1") and budget.pay_reply("::1", 10**9)  # this host: never limited
    assert budget.admit("10.0.0.1") and budget.pay_reply("10.0.0.1", 2000)  # 500 + 1500 of 3000
    assert budget.admit("10.0.0.1") and not budget.pay_reply("10.0.0.1", 1500)  # 1000 is not enough
    assert budget.admit("10.0.0.1") and not budget.admit("10.0.0.1")  # 0 left; refusals take nothing
    assert budget.admit("10.0.0.2")  # every peer its own bucket
    now[0] += 0.5
    assert budget.admit("10.0.0.1") and not budget.admit("10.0.0.1")  # 500 bytes refilled in 0.5 s
    assert budget.refused == 3
    budget.admit("10.0.0.3")  # a third peer: the least recently used bucket is forgotten
    assert budget.tracked == ["10.0.0.1", "10.0.0.3"]
    assert PeerBudget(rate=0, burst=0).admit("10.0.0.9")  # rate 0: no limit
