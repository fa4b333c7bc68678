"""The CLI's provider cache (`inferswarm/providers.py`), without a stack.

Real signed records, a real DHT node on loopback for the lookups the cache
cannot answer, a real file; `MemoryDiscovery` (the in-memory implementation
of the same interface) where only "did it fall back to a lookup" matters.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest

from inferswarm.providers import CachedDiscovery, ProviderFile, cache_path, verifier_for
from shared.dht import KademliaDiscovery, MemoryDiscovery, MemoryRegistry, Provider, sign_record
from shared.dht.record import wall_ms
from shared.errors import NoProviders
from shared.identity import MeshCredential, MeshId, NodeIdentity

pytestmark = [pytest.mark.timeout(60), pytest.mark.rpc]

TOPIC = "inferswarm/gateway/v1"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mesh() -> MeshCredential:
    return MeshCredential(MeshCredential.new_secret())


@pytest.fixture
def mesh_id(mesh: MeshCredential) -> MeshId:
    return MeshId(mesh.mesh_id)


@pytest.fixture
def store(tmp_path: Path, mesh_id: MeshId) -> ProviderFile:
    return ProviderFile(cache_path(mesh_id, tmp_path), verifier_for(mesh_id))


def signed(mesh: MeshCredential, *, topic: str = TOPIC, endpoint: str = "tcp://127.0.0.1:5555",
           ttl: float = 30, age: float = 0, identity: NodeIdentity | None = None) -> bytes:
    """A record of `topic` signed `age` seconds ago by a member (or by `identity`)."""
    identity = identity or NodeIdentity.generate()
    return sign_record(identity, mesh.certify(identity.public_key), topic=topic, service="gateway",
                       endpoint=endpoint, version="1.0", ttl=ttl, seq=wall_ms() - int(age * 1000))


def provider(mesh_id: MeshId, blob: bytes) -> Provider:
    return verifier_for(mesh_id).verify(blob).to_provider()


def write_raw(store: ProviderFile, topics: dict[str, list[bytes]]) -> None:
    """The file as some other (or hostile) writer left it."""
    document = {"v": 1, "topics": {topic: [wall_ms(), blobs] for topic, blobs in topics.items()}}
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_bytes(msgpack.packb(document, use_bin_type=True))


def raw_topics(store: ProviderFile) -> dict[str, list[bytes]]:
    document = msgpack.unpackb(store.path.read_bytes(), raw=False)
    return {topic: blobs for topic, (_, blobs) in document["topics"].items()}


class Joins:
    """A `join` for `CachedDiscovery` that counts its calls and answers from a registry."""

    def __init__(self, registry: MemoryRegistry | None = None, error: Exception | None = None) -> None:
        self.calls = 0
        self.registry = registry or MemoryRegistry()
        self.error = error

    async def __call__(self) -> MemoryDiscovery:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return MemoryDiscovery(self.registry, NodeIdentity.generate())


async def announced(registry: MemoryRegistry, endpoint: str) -> None:
    await MemoryDiscovery(registry, NodeIdentity.generate()).announce(
        TOPIC, service="gateway", endpoint=endpoint, version="1.0")


# -- lookups -----------------------------------------------------------------------------


async def test_a_lookup_through_the_dht_is_saved_and_the_next_process_needs_no_dht(mesh, mesh_id, store):
    async with KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh) as gateway:
        await gateway.announce(TOPIC, service="gateway", endpoint="tcp://127.0.0.1:5555", version="1.0")
        nodes: list[KademliaDiscovery] = []

        async def join() -> KademliaDiscovery:
            node = KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh_id, seeds=[gateway.address],
                                     read_only=True)
            await node.start()
            nodes.append(node)
            return node

        first = CachedDiscovery(join, store)
        try:
            found = await first.lookup(TOPIC)
        finally:
            for node in nodes:
                await node.close()
        assert [p.endpoint for p in found] == ["tcp://127.0.0.1:5555"] and len(nodes) == 1
        assert raw_topics(store) == {TOPIC: [found[0].record]}
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600

    # The next command (the gateway's DHT node is gone by now) needs no join at all.
    never = Joins(error=AssertionError("the cache should have answered"))
    again = await CachedDiscovery(never, store).lookup(TOPIC)
    assert [(p.endpoint, p.node_key) for p in again] == [(found[0].endpoint, found[0].node_key)]
    assert never.calls == 0


async def test_forget_asks_the_dht_again_and_saves_its_answer(mesh, mesh_id, store):
    store.save(TOPIC, [provider(mesh_id, signed(mesh, endpoint="tcp://127.0.0.1:1111"))])
    joins = Joins()
    await announced(joins.registry, "tcp://127.0.0.1:2222")
    discovery = CachedDiscovery(joins, store)
    assert [p.endpoint for p in await discovery.lookup(TOPIC)] == ["tcp://127.0.0.1:1111"]
    assert joins.calls == 0

    discovery.forget(TOPIC)
    assert raw_topics(store) == {}  # other CLIs will not try the failed provider first either
    assert [p.endpoint for p in await discovery.lookup(TOPIC)] == ["tcp://127.0.0.1:2222"]
    assert [p.endpoint for p in await discovery.lookup(TOPIC)] == ["tcp://127.0.0.1:2222"]
    assert joins.calls == 1  # one DHT node per process, however many lookups


async def test_a_join_that_fails_is_tried_once_and_its_error_raised_each_time(store):
    joins = Joins(error=RuntimeError("cannot reach the mesh"))
    discovery = CachedDiscovery(joins, store)
    for topic in (TOPIC, "inferswarm/auth/v1"):
        with pytest.raises(RuntimeError, match="cannot reach the mesh"):
            await discovery.lookup(topic)
    assert joins.calls == 1


async def test_a_topic_nobody_serves_any_more_leaves_the_file(mesh, mesh_id, store):
    store.save(TOPIC, [provider(mesh_id, signed(mesh))])
    discovery = CachedDiscovery(Joins(), store)
    discovery.forget(TOPIC)
    with pytest.raises(NoProviders):
        await discovery.lookup(TOPIC)
    assert TOPIC not in raw_topics(store)


# -- what is never used --------------------------------------------------------------------


async def test_tampered_and_foreign_records_are_never_used(mesh, mesh_id, store):
    good = signed(mesh, endpoint="tcp://127.0.0.1:5555")
    tampered = good.replace(b"tcp://127.0.0.1:5555", b"tcp://127.0.0.1:6666")  # same length: still msgpack
    assert tampered != good
    outsider = NodeIdentity.generate()  # certified by another mesh
    foreign = sign_record(outsider, MeshCredential(MeshCredential.new_secret()).certify(outsider.public_key),
                          topic=TOPIC, service="gateway", endpoint="tcp://127.0.0.1:7777", version="1.0", ttl=30)
    misfiled = signed(mesh, topic="inferswarm/auth/v1", endpoint="tcp://127.0.0.1:8888")
    write_raw(store, {TOPIC: [tampered, foreign, misfiled], "inferswarm/web/v1": [b"\x92\xc4\x01x\xc4\x01y"]})
    assert store.load() == {}

    joins = Joins()
    await announced(joins.registry, "tcp://127.0.0.1:9999")
    assert [p.endpoint for p in await CachedDiscovery(joins, store).lookup(TOPIC)] == ["tcp://127.0.0.1:9999"]
    assert joins.calls == 1
    assert raw_topics(store) == {}  # the lookup's providers had no blob (memory), the bad ones were pruned


async def test_records_are_kept_only_until_their_own_expiry(mesh, mesh_id, store):
    fresh = signed(mesh, endpoint="tcp://127.0.0.1:1000", ttl=30)
    # Past its expiry by less than the verifier's clock skew: valid to a DHT
    # node, worthless in a cache (the provider has refreshed it by now).
    just_expired = signed(mesh, endpoint="tcp://127.0.0.1:1001", ttl=30, age=32)
    long_expired = signed(mesh, endpoint="tcp://127.0.0.1:1002", ttl=30, age=400)
    withdrawn = signed(mesh, endpoint="", ttl=0)
    write_raw(store, {TOPIC: [fresh, just_expired, long_expired, withdrawn],
                      "inferswarm/auth/v1": [signed(mesh, topic="inferswarm/auth/v1", ttl=30, age=31)]})
    loaded = store.load()
    assert list(loaded) == [TOPIC] and [p.endpoint for p in loaded[TOPIC]] == ["tcp://127.0.0.1:1000"]

    store.save("inferswarm/metrics/v1", [provider(mesh_id, signed(mesh, topic="inferswarm/metrics/v1"))])
    assert raw_topics(store) == {TOPIC: [fresh], "inferswarm/metrics/v1": raw_topics(store)["inferswarm/metrics/v1"]}


async def test_a_record_expiring_while_cached_sends_the_lookup_to_the_dht(mesh, mesh_id, store):
    store.save(TOPIC, [provider(mesh_id, signed(mesh, endpoint="tcp://127.0.0.1:1000", ttl=1.2))])
    discovery = CachedDiscovery(Joins(), store)
    assert [p.endpoint for p in await discovery.lookup(TOPIC)] == ["tcp://127.0.0.1:1000"]
    deadline = wall_ms() + 3000
    while store.load() and wall_ms() < deadline:  # its own expiry, not a fixed sleep
        await asyncio.sleep(0.05)
    assert store.load() == {}
    with pytest.raises(NoProviders):  # the file has nothing live: the (empty) DHT is asked
        await discovery.lookup(TOPIC)


@pytest.mark.parametrize("content", [
    b"",
    b"\x00garbage\xff" * 10,
    b"\x82\xa1v\x01",  # a map cut short
    msgpack.packb({"v": 99, "topics": {}}),
    msgpack.packb({"v": 1, "topics": {TOPIC: "not a list"}}),
    msgpack.packb([1, 2, 3]),
])
async def test_a_corrupt_or_foreign_file_counts_as_empty_and_is_rewritten(mesh, mesh_id, store, content):
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_bytes(content)
    assert store.load() == {}
    joins = Joins()
    await announced(joins.registry, "tcp://127.0.0.1:9999")
    assert [p.endpoint for p in await CachedDiscovery(joins, store).lookup(TOPIC)] == ["tcp://127.0.0.1:9999"]

    store.save(TOPIC, [provider(mesh_id, signed(mesh, endpoint="tcp://127.0.0.1:5555"))])
    assert [p.endpoint for p in store.load()[TOPIC]] == ["tcp://127.0.0.1:5555"]


async def test_a_truncated_file_counts_as_empty(mesh, mesh_id, store):
    for index in range(4):
        topic = f"inferswarm/model/m{index}"
        store.save(topic, [provider(mesh_id, signed(mesh, topic=topic))])
    whole = store.path.read_bytes()
    assert len(store.load()) == 4
    for cut in (1, len(whole) // 2, len(whole) - 1):
        store.path.write_bytes(whole[:cut])
        assert store.load() == {}


async def test_the_file_holds_at_most_max_topics_the_newest(mesh, mesh_id, tmp_path):
    store = ProviderFile(cache_path(mesh_id, tmp_path), verifier_for(mesh_id), max_topics=4, max_records=2)
    for index in range(6):
        topic = f"inferswarm/model/m{index}"
        store.save(topic, [provider(mesh_id, signed(mesh, topic=topic)) for _ in range(3)])
    assert sorted(raw_topics(store)) == [f"inferswarm/model/m{index}" for index in range(2, 6)]
    assert all(len(blobs) == 2 for blobs in raw_topics(store).values())


# -- many CLIs at once -----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from inferswarm.providers import ProviderFile, cache_path, verifier_for
    from shared.dht import sign_record
    from shared.dht.record import wall_ms
    from shared.identity import MeshCredential, MeshId, NodeIdentity

    mesh = MeshCredential.from_text(os.environ["SECRET"])
    mesh_id = MeshId(mesh.mesh_id)
    topic = "inferswarm/model/m" + sys.argv[1]
    identity = NodeIdentity.generate()
    blob = sign_record(identity, mesh.certify(identity.public_key), topic=topic, service="inference",
                       endpoint="tcp://127.0.0.1:" + str(5000 + int(sys.argv[1])), version="1.0", ttl=60)
    store = ProviderFile(cache_path(mesh_id, Path(sys.argv[2])), verifier_for(mesh_id), max_topics=64)
    sys.stdin.readline()  # every writer starts at once
    for _ in range(3):
        store.save(topic, [verifier_for(mesh_id).verify(blob).to_provider()])
        store.load()
""")


@pytest.mark.timeout(120)
def test_64_concurrent_writers_leave_a_valid_file_with_every_topic(tmp_path):
    secret = MeshCredential.new_secret()
    mesh_id = MeshId(MeshCredential(secret).mesh_id)
    env = {**os.environ, "SECRET": secret.hex(), "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(index), str(tmp_path)], env=env,
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(64)]
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        writer.stdin.close()
        assert writer.wait(timeout=100) == 0, writer.stderr.read()

    store = ProviderFile(cache_path(mesh_id, tmp_path), verifier_for(mesh_id), max_topics=64)
    loaded = store.load()
    assert sorted(loaded) == sorted(f"inferswarm/model/m{index}" for index in range(64))
    assert all(len(providers) == 1 for providers in loaded.values())
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []
