"""The mesh client over real DHT nodes and real CurveZMQ servers on loopback:
providers found by topic, load spread, failover when a provider dies, and a
caller's calls kept on its provider (`affinity`), failing over to its next."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack

import pytest
from nacl.public import PrivateKey

from shared import errors
from shared.dht import Announcer, KademliaDiscovery, service_topic
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity
from shared.rpc import Dispatcher, MeshClient, RpcServer, method
from shared.rpc.mesh import rendezvous
from waiting import wait_until

pytestmark = pytest.mark.rpc

FAST = dict(rpc_timeout=0.3, ping_interval=0.5, dead_ttl=3.0, cache_ttl=0.2)


class Whoami:
    name = "who"

    def __init__(self, label: str) -> None:
        self.label = label
        self.calls = 0
        self.refusing = False  #: `mine` answers UNAVAILABLE, as a draining server does

    @method(idempotent=True)
    async def am_i(self) -> str:
        self.calls += 1
        return self.label

    @method(public=True)
    async def mine(self) -> str:
        if self.refusing:
            raise errors.Unavailable("refusing", {"retry_safe": True})
        return self.label

    @method
    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return self.label


class Provider:
    """One mesh node serving `Whoami`: DHT node, RPC server, announcer."""

    def __init__(self, label: str, mesh: MeshCredential, seeds: list[str]) -> None:
        self.label, self.mesh, self.seeds = label, mesh, seeds
        self.service = Whoami(label)
        self.stack = AsyncExitStack()

    async def start(self) -> Provider:
        identity = NodeIdentity.generate()
        dht = KademliaDiscovery(identity=identity, mesh=self.mesh, seeds=self.seeds, **FAST)
        await self.stack.enter_async_context(dht)
        self.server = RpcServer(Dispatcher(self.service), curve=identity.curve, members=self.mesh.roster)
        await self.stack.enter_async_context(self.server)
        announcer = Announcer(dht, [service_topic("who")], service="who", endpoint=self.server.endpoint,
                              version="test", load=lambda: {"in_flight": self.server.in_flight}, ttl=2.0)
        await self.stack.enter_async_context(announcer)
        return self

    async def kill(self) -> None:
        """Die without withdrawing: close the socket and the DHT node abruptly."""
        await self.server.close()
        self.stack.pop_all()


@pytest.fixture
async def mesh_net():
    mesh = MeshCredential(MeshCredential.new_secret())
    async with AsyncExitStack() as stack:
        seed = KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh, **FAST)
        await stack.enter_async_context(seed)
        providers = []
        for label in ("a", "b", "c"):
            provider = await Provider(label, mesh, [seed.address]).start()
            stack.push_async_callback(provider.stack.aclose)
            providers.append(provider)
        client = MeshClient(seed, mesh.client, cooldown=2.0)
        await stack.enter_async_context(client)
        yield client, providers


async def test_all_providers_found_and_load_spread(mesh_net):
    client, providers = mesh_net
    found = await client("who").providers()
    assert sorted(p.endpoint for p in found) == sorted(p.server.endpoint for p in providers)
    answers = Counter([await client("who").call("who.am_i") for _ in range(60)])
    assert set(answers) == {"a", "b", "c"}


async def test_idempotent_call_survives_a_provider_dying_mid_call(mesh_net):
    client, providers = mesh_net
    victim = providers[0]
    # Make the victim the only reachable choice first, so the call lands there.
    for other in providers[1:]:
        client.cool_down(next(p for p in await client("who").providers() if p.endpoint == other.server.endpoint))
    call = asyncio.create_task(client("who").call("who.slow", {"seconds": 1.0}, timeout=5.0, idempotent=True))
    await wait_until(lambda: victim.server.in_flight == 1, 5, message="the call never reached the victim")
    await victim.kill()
    assert await asyncio.wait_for(call, 6) in {"b", "c"}


async def test_non_idempotent_call_in_flight_on_a_dying_provider_fails_typed(mesh_net):
    client, providers = mesh_net
    victim = providers[1]
    for other in (providers[0], providers[2]):
        client.cool_down(next(p for p in await client("who").providers() if p.endpoint == other.server.endpoint))
    call = asyncio.create_task(client("who").call("who.slow", {"seconds": 5.0}, timeout=5.0))
    await wait_until(lambda: victim.server.in_flight == 1, 5, message="the call never reached the victim")
    await victim.kill()
    with pytest.raises(errors.Unavailable) as lost:
        await asyncio.wait_for(call, 6)
    assert lost.value.data["retry_safe"] is False


async def test_calls_keep_succeeding_after_a_provider_dies(mesh_net):
    client, providers = mesh_net
    await providers[2].kill()  # its record lingers until its TTL: calls must route around it
    answers = [await client("who").call("who.slow", {"seconds": 0.0}, timeout=3.0) for _ in range(30)]
    assert set(answers) <= {"a", "b"} and len(answers) == 30


async def test_a_callers_calls_stay_on_its_provider_and_a_refused_one_goes_to_its_next_highest(mesh_net):
    """No cooldown here, so every call tries the refusing provider first: the retry
    within the call must go to the caller's next-highest provider, not any other."""
    seed_client, providers = mesh_net
    label = {p.server.endpoint: p.service for p in providers}
    keys = CurveKeyPair.from_private(PrivateKey.generate())  # a public caller, as the CLI is
    async with MeshClient(seed_client.discovery, keys, cooldown=0.0) as client:
        found = await client("who").providers()
        for n in range(6):
            affinity = bytes([n]) * 16
            first = rendezvous(found, affinity)
            second = rendezvous([p for p in found if p != first], affinity)
            assert [await client("who").call("who.mine", affinity=affinity) for _ in range(5)] == [
                label[first.endpoint].label] * 5
            label[first.endpoint].refusing = True
            try:
                assert [await client("who").call("who.mine", affinity=affinity) for _ in range(5)] == [
                    label[second.endpoint].label] * 5
            finally:
                label[first.endpoint].refusing = False


async def test_unknown_service_has_no_providers(mesh_net):
    client, _ = mesh_net
    with pytest.raises(errors.NoProviders):
        await client("nobody").call("nobody.anything")


async def test_closing_the_client_never_hangs_on_cooled_down_connections(mesh_net):
    """A connection dropped from the pool (cooldown) must still be closed with
    the client, or destroying the ZeroMQ context would wait on it forever."""
    client, providers = mesh_net
    for provider in await client("who").providers():
        client.connection(provider)  # open one to each
        client.cool_down(provider)  # dropped from the pool, closed in the background
    await asyncio.wait_for(client.close(), 5)
