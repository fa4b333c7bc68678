"""Key-affine provider choice without a network (shared/rpc/mesh.py, "Affinity"):
rendezvous hashing is stable for a key, spreads keys evenly, moves about 1/N of
them when a provider joins, fails over to the key's next-highest provider, and
gives way to the power of two choices under the load bound; `caller_affinity`
(services/gateway/client.py) stands for the caller without carrying its key.
The providers come from `MemoryDiscovery`, the in-memory implementation of the
discovery interface; no socket is opened."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.public import PrivateKey

from shared.dht import Provider, service_topic
from shared.dht.memory import MemoryDiscovery, MemoryRegistry
from shared.identity import CurveKeyPair, NodeIdentity
from shared.rpc import MeshClient
from shared.rpc.mesh import AFFINITY_LOAD_FACTOR, AFFINITY_LOAD_SLACK, rendezvous
from services.auth.tokens import TokenIssuer
from services.gateway.client import caller_affinity

pytestmark = pytest.mark.unit

TOPIC = service_topic("gateway")


def providers(count: int, seed: int = 1) -> list[Provider]:
    """`count` gateway records with node keys drawn from `seed`."""
    draw = random.Random(seed)
    return [Provider(topic=TOPIC, service="gateway", endpoint=f"tcp://127.0.0.1:{6000 + i}",
                     node_key=draw.randbytes(32), curve_key=draw.randbytes(40), version="t", seq=0, ttl=30.0)
            for i in range(count)]


def keys(count: int) -> list[bytes]:
    """The affinities of `count` API keys."""
    return [caller_affinity(api_key=f"sk-test-{i}") or b"" for i in range(count)]


def ranking(candidates: list[Provider], affinity: bytes) -> list[Provider]:
    """Every provider in the key's order of preference: the first, then the first of the rest..."""
    left, order = list(candidates), []
    while left:
        order.append(rendezvous(left, affinity))
        left.remove(order[-1])
    return order


class Gateways:
    """Announced gateways of one in-memory registry, with the load each reports, and a
    mesh client that finds them there."""

    def __init__(self, count: int) -> None:
        self.registry = MemoryRegistry()
        self.nodes = [MemoryDiscovery(self.registry, NodeIdentity.generate()) for _ in range(count)]
        self.mesh = MeshClient(MemoryDiscovery(self.registry, NodeIdentity.generate()),
                               CurveKeyPair.from_private(PrivateKey.generate()))

    async def announce(self, loads: list[int]) -> list[Provider]:
        for i, (node, in_flight) in enumerate(zip(self.nodes, loads)):
            await node.announce(TOPIC, service="gateway", endpoint=f"tcp://127.0.0.1:{6000 + i}", version="t",
                                load={"in_flight": in_flight})
        by_endpoint = {p.endpoint: p for p in await self.mesh.discovery.lookup(TOPIC)}
        return [by_endpoint[f"tcp://127.0.0.1:{6000 + i}"] for i in range(len(self.nodes))]  # in `loads`' order

    async def picks(self, affinity: bytes | None, times: int = 40) -> Counter[str]:
        service = self.mesh.topic(TOPIC)
        return Counter([(await service.pick(affinity=affinity)).endpoint for _ in range(times)])


async def test_a_key_gets_the_same_provider_whatever_the_order_of_the_lookup():
    found = providers(5)
    for affinity in keys(200):
        chosen = rendezvous(found, affinity)
        assert all(rendezvous(random.sample(found, len(found)), affinity) == chosen for _ in range(5))
    gateways = Gateways(4)
    await gateways.announce([0, 0, 0, 0])
    for affinity in keys(20):
        assert len(await gateways.picks(affinity, times=10)) == 1  # through `pick`, every time the same


def test_many_keys_spread_evenly_over_the_providers():
    found = providers(8)
    shares = Counter(rendezvous(found, affinity).endpoint for affinity in keys(8000))
    assert len(shares) == 8
    assert all(850 <= n <= 1150 for n in shares.values()), shares  # 1,000 each, σ ≈ 30


def test_a_provider_joining_takes_about_one_key_in_n_and_one_leaving_moves_only_its_own():
    before, joined = providers(8), providers(9)[8]
    after = before + [joined]
    moved = Counter()
    for affinity in keys(9000):
        was, now = rendezvous(before, affinity), rendezvous(after, affinity)
        if was != now:
            assert now == joined, "a key moved between two providers that were there all along"
            moved[now.endpoint] += 1
    assert 850 <= moved[joined.endpoint] <= 1150, moved  # 1,000 expected (1/9 of 9,000)
    gone = before[3]
    for affinity in keys(2000):
        if rendezvous(before, affinity) != gone:  # only the leaver's keys move
            assert rendezvous([p for p in before if p != gone], affinity) == rendezvous(before, affinity)


async def test_a_tried_or_cooling_provider_gives_the_key_to_its_next_highest():
    gateways = Gateways(4)
    found = await gateways.announce([0, 0, 0, 0])
    service = gateways.mesh.topic(TOPIC)
    for affinity in keys(20):
        first, second, third, _ = ranking(found, affinity)
        assert await service.pick(affinity=affinity) == first
        tried = {(first.node_key, first.endpoint)}
        assert await service.pick(tried, affinity=affinity) == second
        assert await service.pick(tried | {(second.node_key, second.endpoint)}, affinity=affinity) == third
    affinity = keys(1)[0]
    first, second, *_ = ranking(found, affinity)
    gateways.mesh.cool_down(first)  # failed a moment ago: its keys go to their next-highest meanwhile
    assert await service.pick(affinity=affinity) == second


async def test_an_overloaded_affine_provider_gives_way_to_two_choices():
    for count in (2, 4):  # two providers too: the bound compares with the mean of the *others*
        gateways = Gateways(count)
        found = await gateways.announce([0] * count)
        affinity = keys(1)[0]
        mine = rendezvous(found, affinity)
        at = next(i for i, p in enumerate(found) if p == mine)
        others = [3] * count
        bound = int(AFFINITY_LOAD_FACTOR * 3 + AFFINITY_LOAD_SLACK)
        others[at] = bound  # at the bound: still the key's
        await gateways.announce(others)
        assert await gateways.picks(affinity) == Counter({mine.endpoint: 40})
        others[at] = bound + 1  # above it: the less loaded of two, never the overloaded one
        await gateways.announce(others)
        picked = await gateways.picks(affinity)
        assert mine.endpoint not in picked and sum(picked.values()) == 40
        if count > 2:
            assert len(picked) > 1, "two choices spread the key over the others"


async def test_without_affinity_the_choice_is_the_power_of_two_choices():
    gateways = Gateways(2)
    found = await gateways.announce([0, 5])
    assert await gateways.picks(None) == Counter({found[0].endpoint: 40})  # the less loaded of the two, always
    found = await gateways.announce([0, 0])
    assert len(await gateways.picks(None, times=200)) == 2  # a tie drawn at random, not by a key


def test_the_callers_affinity_stands_for_the_key_or_the_user_and_carries_neither():
    key = "sk-abcdefghijklmnopqrstuvwxyz012345"
    assert caller_affinity(api_key=key) == caller_affinity(api_key=key, token="ignored: the key decides")
    assert caller_affinity(api_key=key) != caller_affinity(api_key=key + "6")
    digest = caller_affinity(api_key=key) or b""
    assert len(digest) == 16 and key.encode() not in digest
    issuer = TokenIssuer(Ed25519PrivateKey.generate(), issuer="auth", audience="inferswarm", ttl=3600)
    first, _ = issuer.issue("42")
    again, _ = issuer.issue("42")  # another login of the same user: another token, the same gateway
    other, _ = issuer.issue("43")
    assert first != again and caller_affinity(token=first) == caller_affinity(token=again)
    assert caller_affinity(token=first) != caller_affinity(token=other)
    assert caller_affinity(token="not a JWT") == caller_affinity(token="not a JWT") != caller_affinity(token="x.y")
    assert caller_affinity() is None
