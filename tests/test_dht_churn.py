"""Short-lived clients and dead contacts: the mesh stays clean and lookups stay fast.

Real DHT nodes on 127.0.0.1 UDP. Client nodes are read-only (BEP 43): they
must never enter a routing table, however many come and go. Dead contacts
(addresses where nothing answers) cost a lookup the measured round trip, not
the full RPC timeout, and a contact given up on comes back when it replies.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import msgpack
import pytest
from kademlia.node import Node

from shared.dht import DHTConfig, KademliaDiscovery
from shared.dht.record import sign_record, wall_ms
from shared.dht.rtt import RttEstimator
from shared.errors import InvalidParams, Timeout
from shared.identity import MeshCredential, MeshId, NodeIdentity

pytestmark = pytest.mark.timeout(90)

TOPIC = "inferswarm/gateway/v1"
#: A full RPC timeout far above any loopback round trip, so that waiting on
#: a dead contact even once shows in the timings.
SLOW_TIMEOUT = DHTConfig(ttl=20.0, rpc_timeout=2.0, ping_interval=30.0, dead_ttl=30.0, cache_ttl=0)


@pytest.fixture
def mesh() -> MeshCredential:
    return MeshCredential(MeshCredential.new_secret())


@asynccontextmanager
async def services(mesh: MeshCredential, count: int, config: DHTConfig) -> AsyncIterator[list[KademliaDiscovery]]:
    """`count` full nodes (long-running services), three of them announcing TOPIC."""
    async with AsyncExitStack() as stack:
        nodes: list[KademliaDiscovery] = []
        for _ in range(count):
            seeds = [nodes[0].address] if nodes else []
            node = KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh, seeds=seeds, config=config)
            nodes.append(await stack.enter_async_context(node))
        for index, node in enumerate(nodes[:3]):
            await node.announce(TOPIC, service="gateway", endpoint=f"tcp://127.0.0.1:{7000 + index}", version="1")
        yield nodes


def client(mesh: MeshCredential, seed: KademliaDiscovery, config: DHTConfig) -> KademliaDiscovery:
    return KademliaDiscovery(identity=NodeIdentity.generate(), mesh=MeshId(mesh.mesh_id), seeds=[seed.address],
                             config=config, read_only=True)


def table_ids(node: KademliaDiscovery) -> set[bytes]:
    protocol = node.server.protocol
    return {node_id for bucket in protocol.router.buckets
            for node_id in (*bucket.nodes, *bucket.replacement_nodes)}


def dead_addresses(count: int) -> list[tuple[str, int]]:
    """Loopback ports where nothing listens (bound, then closed)."""
    addresses = []
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            addresses.append(sock.getsockname()[:2])
    return addresses


def plant_dead(nodes: list[KademliaDiscovery], fraction: float, replacing: list[Node] = ()) -> list[Node]:
    """Put the same dead contacts in every table, `fraction` of its size after
    planting (each node knows the `len(nodes) - 1` others); those planted
    before (`replacing`) are taken out first."""
    count = max(1, round((len(nodes) - 1) * fraction / (1 - fraction)))
    dead = [Node(os.urandom(20), ip, port) for ip, port in dead_addresses(count)]
    for node in nodes:
        for contact in replacing:
            node.server.protocol.router.remove_contact(contact)
        for contact in dead:
            node.server.protocol.welcome_if_new(contact)
    return dead


@pytest.mark.rpc
async def test_two_hundred_clients_come_and_go_and_never_enter_a_table(mesh):
    config = DHTConfig(ttl=20.0, rpc_timeout=1.0, ping_interval=30.0, dead_ttl=30.0, cache_ttl=0)
    async with services(mesh, 6, config) as nodes:
        before = [table_ids(node) for node in nodes]
        clients_seen: set[bytes] = set()
        lookup_seconds: list[float] = []
        stop = asyncio.Event()

        async def service_lookups() -> None:  # a gateway looking auth up while clients churn
            while not stop.is_set():
                began = time.perf_counter()
                assert len(await nodes[5].lookup(TOPIC)) == 3
                lookup_seconds.append(time.perf_counter() - began)
                await asyncio.sleep(0.01)

        async def one_client(seed: KademliaDiscovery) -> None:
            async with client(mesh, seed, config) as node:
                clients_seen.add(node.identity.node_id)
                assert node.joined
                assert len(await node.lookup(TOPIC)) == 3
                with pytest.raises(InvalidParams):
                    await node.announce(TOPIC, service="cli", endpoint="tcp://127.0.0.1:1", version="1")

        looking = asyncio.create_task(service_lookups())
        for batch in range(10):  # 200 clients, 20 at a time, each seeded by another service
            await asyncio.gather(*(one_client(nodes[(batch + i) % len(nodes)]) for i in range(20)))
            for node in nodes:
                assert not table_ids(node) & clients_seen
        stop.set()
        await looking

        assert len(clients_seen) == 200
        for node, known in zip(nodes, before):
            assert not table_ids(node) & clients_seen
            assert known <= table_ids(node) | {node.identity.node_id}  # no service was lost either
        # Nothing dead was ever met: no lookup waited anywhere near an RPC timeout.
        assert max(lookup_seconds) < config.rpc_timeout / 2, max(lookup_seconds)


@pytest.mark.rpc
async def test_a_full_client_node_would_have_entered_every_table(mesh):
    """The control: what the read-only flag prevents does happen without it."""
    config = DHTConfig(ttl=20.0, ping_interval=30.0, cache_ttl=0)
    async with services(mesh, 4, config) as nodes:
        async with KademliaDiscovery(identity=NodeIdentity.generate(), mesh=MeshId(mesh.mesh_id),
                                     seeds=[nodes[0].address], config=config) as full:
            await full.lookup(TOPIC)
            assert all(full.identity.node_id in table_ids(node) for node in nodes)


@pytest.mark.rpc
async def test_a_read_only_node_answers_nobody(mesh):
    async with services(mesh, 2, SLOW_TIMEOUT) as nodes, client(mesh, nodes[0], SLOW_TIMEOUT) as ro:
        probe = NodeIdentity.generate().node_id
        answered, _ = await asyncio.wait_for(nodes[1].server.protocol.ping(("127.0.0.1", ro.port), probe), 5)
        assert not answered
        assert ro.identity.node_id not in table_ids(nodes[0])


@pytest.mark.rpc
async def test_dead_contacts_cost_a_lookup_milliseconds_not_timeouts(mesh):
    async with services(mesh, 8, SLOW_TIMEOUT) as nodes:
        durations: list[float] = []
        dead: list[Node] = []
        for _ in range(20):
            dead = plant_dead(nodes, 0.3, dead)  # fresh dead contacts every time, in every table
            async with client(mesh, nodes[0], SLOW_TIMEOUT) as fresh:
                began = time.perf_counter()
                providers = await fresh.lookup(TOPIC)
                durations.append(time.perf_counter() - began)
                assert len(providers) == 3
                # what the lookup gave up on, it no longer hands out
                protocol = fresh.server.protocol
                assert any(protocol.is_dead(contact.id) for contact in dead)
                handed_out = {n.id for n in protocol.neighbours(Node(os.urandom(20)))}
                assert not handed_out & {c.id for c in dead if protocol.is_dead(c.id)}
        # Waiting on one dead contact for the full timeout would cost 2 s.
        assert max(durations) < SLOW_TIMEOUT.rpc_timeout / 4, durations
        assert statistics.median(durations) < SLOW_TIMEOUT.rpc_timeout / 20, durations


@pytest.mark.rpc
async def test_a_service_lookup_through_dead_contacts_is_fast_and_drops_them(mesh):
    async with services(mesh, 6, SLOW_TIMEOUT) as nodes:
        looking = nodes[5]
        dead = plant_dead(nodes, 0.3)
        began = time.perf_counter()
        assert len(await looking.lookup(TOPIC)) == 3
        assert time.perf_counter() - began < SLOW_TIMEOUT.rpc_timeout / 4
        given_up = [c for c in dead if looking.server.protocol.is_dead(c.id)]
        assert given_up
        # they leave its routing table once their requests time out for good
        deadline = time.monotonic() + 3 * SLOW_TIMEOUT.rpc_timeout
        while {c.id for c in given_up} & table_ids(looking):
            assert time.monotonic() < deadline, "given-up contacts stayed in the table"
            await asyncio.sleep(0.05)


class LatePeer(asyncio.DatagramProtocol):
    """A DHT peer speaking the wire format: pings at once, lookups after `delay`
    (answering `find_value` with `records`, the blobs it holds)."""

    def __init__(self, node_id: bytes, delay: float, records: list[bytes] = ()) -> None:
        self.node_id = node_id
        self.delay = delay
        self.records = list(records)
        self.transport: Any = None
        self.lookups = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] != b"\x00":
            return
        method, _args, *_ = msgpack.unpackb(data[21:])
        reply: Any = self.node_id if method == "ping" else {"v": self.records, "n": []} if method == "find_value" else []
        packet = b"\x01" + data[1:21] + msgpack.packb(reply, use_bin_type=True)
        if method == "ping":
            self.transport.sendto(packet, addr)
        else:
            self.lookups += 1
            asyncio.get_running_loop().call_later(self.delay, self.transport.sendto, packet, addr)


@pytest.mark.rpc
async def test_a_contact_given_up_on_comes_back_when_it_replies(mesh):
    loop = asyncio.get_running_loop()
    peer_id = NodeIdentity.generate().node_id
    transport, peer = await loop.create_datagram_endpoint(lambda: LatePeer(peer_id, 0.3),
                                                          local_addr=("127.0.0.1", 0))
    try:
        async with services(mesh, 3, SLOW_TIMEOUT) as nodes:
            looking = nodes[2]
            protocol = looking.server.protocol
            slow = Node(peer_id, *transport.get_extra_info("sockname")[:2])
            answered, _ = await protocol.call_ping(slow)  # it joins the table, answering at once
            assert answered and peer_id in table_ids(looking)
            assert protocol.rtt.timeout < 0.3  # loopback round trips measured: a wait of milliseconds

            began = time.perf_counter()
            assert len(await looking.lookup(TOPIC)) == 3
            # it did not wait for the slow peer (its timeout is 2 s; generous for a loaded box)
            assert time.perf_counter() - began < SLOW_TIMEOUT.rpc_timeout / 2
            assert peer.lookups == 1 and protocol.is_dead(peer_id)
            assert peer_id not in {n.id for n in protocol.neighbours(Node(os.urandom(20)))}

            deadline = time.monotonic() + 5  # its late reply clears the mark
            while protocol.is_dead(peer_id):
                assert time.monotonic() < deadline, "the late reply did not bring the peer back"
                await asyncio.sleep(0.02)
            assert peer_id in table_ids(looking)
            assert peer_id in {n.id for n in protocol.neighbours(Node(os.urandom(20)))}
    finally:
        transport.close()


@pytest.mark.rpc
async def test_a_record_held_only_by_a_contact_given_up_on_is_still_found(mesh):
    """On a loaded machine the node holding a record may answer after the adaptive
    wait: the lookup gives up on it for the crawl, but does not end empty while its
    reply can still come -- an empty answer would claim that nobody serves the topic."""
    loop = asyncio.get_running_loop()
    async with services(mesh, 2, SLOW_TIMEOUT) as nodes:
        signer = nodes[0]
        topic = "inferswarm/late/v1"
        blob = sign_record(signer.identity, signer._cert, topic=topic, service="late", endpoint="tcp://127.0.0.1:7100",
                           version="1", seq=wall_ms(), load={}, ttl=20.0)
        peer_id = NodeIdentity.generate().node_id
        transport, peer = await loop.create_datagram_endpoint(lambda: LatePeer(peer_id, 0.3, [blob]),
                                                              local_addr=("127.0.0.1", 0))
        try:
            looking = nodes[1]
            protocol = looking.server.protocol
            answered, _ = await protocol.call_ping(Node(peer_id, *transport.get_extra_info("sockname")[:2]))
            assert answered and protocol.rtt.timeout < 0.3  # it will be given up on
            began = time.perf_counter()
            (found,) = await looking.lookup(topic)
            took = time.perf_counter() - began
            assert found.endpoint == "tcp://127.0.0.1:7100" and peer.lookups >= 1
            assert 0.25 < took < SLOW_TIMEOUT.rpc_timeout, took  # its late reply, not the full timeout
        finally:
            transport.close()


@pytest.mark.rpc
async def test_a_lookup_with_a_timeout_stops_on_time(mesh):
    async with services(mesh, 2, SLOW_TIMEOUT) as nodes, client(mesh, nodes[0], SLOW_TIMEOUT) as ro:
        protocol = ro.server.protocol
        for contact in protocol.contacts():  # leave the client nothing but the dead
            protocol.router.remove_contact(contact)
        for ip, port in dead_addresses(5):
            protocol.welcome_if_new(Node(os.urandom(20), ip, port))
        began = time.perf_counter()
        with pytest.raises(Timeout):
            await ro.lookup("inferswarm/nobody/v1", timeout=0.2)
        assert 0.15 < time.perf_counter() - began < 1.0


@pytest.mark.unit
def test_rtt_estimator_follows_the_round_trip_within_its_bounds():
    rtt = RttEstimator(floor=0.005, ceiling=1.0)
    assert rtt.timeout == 1.0  # nothing measured: the ceiling
    for _ in range(20):
        rtt.sample(0.0003)
    assert rtt.timeout == 0.005  # loopback: the floor
    for _ in range(20):
        rtt.sample(0.08)
    assert 0.08 < rtt.timeout < 0.5  # a slower network: more than its round trip
    for _ in range(20):
        rtt.sample(5.0)
    assert rtt.timeout == 1.0  # never past the ceiling
    with pytest.raises(ValueError):
        RttEstimator(floor=0.0, ceiling=1.0)
