"""Attacks from inside the mesh: a member that holds one role's credential only
(a compromised worker host, a gateway's) tries to pass for auth, or to call
what its role may not. Against a real mesh: auth, a gateway and a worker (each
given its role's credential, as `inferswarm up` does), PostgreSQL, DHT nodes.

Before roles, any holder of the mesh secret could announce `inferswarm/auth/v1`
(and collect the passwords of every login that found it) or call
`auth.record_usage` and `auth.grant_admin` for anyone (SECURITY.md, Members).
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio
from kademlia.node import Node

from shared.config import MeshConfig, Secret
from shared.dht import model_topic, service_topic
from shared.dht.record import Record, sign_record, topic_key, wall_ms
from shared.errors import Forbidden, InvalidParams
from shared.runner import MeshNode, join_mesh
from gateway_support import MODEL, GatewayMesh, infer, running_mesh

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("members"), workers=1, gateways=1) as running:
        yield running


async def member(stack: AsyncExitStack, mesh: GatewayMesh, role: str, name: str) -> MeshNode:
    """A process joining the mesh with `role`'s credential only, as a host of that role has it."""
    config = MeshConfig(data_dir=mesh.root / name, credential=Secret(mesh.mesh.member(role).to_text()),
                        bootstrap=(mesh.client.discovery.address,), record_ttl=3.0)
    return await join_mesh(stack, name, config, role=role)


async def test_a_workers_credential_cannot_pass_for_auth(mesh):
    auth_topic = service_topic("auth")
    real_auth = {p.node_key for p in await mesh.client.discovery.lookup(auth_topic)}
    assert len(real_auth) == 1
    async with AsyncExitStack() as stack:
        rogue = await member(stack, mesh, "inference", "rogue-worker")
        endpoint = "tcp://127.0.0.1:9"  # where the passwords would go
        # Through the API: refused before anything is sent, naming the rule.
        with pytest.raises(InvalidParams, match="WRONG_ROLE: a inference member cannot announce"):
            await rogue.discovery.announce(auth_topic, service="auth", endpoint=endpoint, version="1.0")
        # Around it: the rogue signs the record itself and sends it to every node it knows of...
        blob = sign_record(rogue.identity, rogue.credential.certify(rogue.identity.public_key), topic=auth_topic,
                           service="auth", endpoint=endpoint, version="1.0", ttl=30)
        dht, key = rogue.discovery._server, topic_key(auth_topic)
        nodes = await dht.crawl_nodes(Node(key))
        assert len(nodes) >= 3  # the seed (with auth), the gateway's, the worker's
        replies = await asyncio.gather(*(dht.protocol.call_store(node, key, blob) for node in nodes))
        assert [accepted for answered, accepted in replies if answered] == [False] * len(nodes)
        # ...and keeps it in its own storage, which it serves to every lookup.
        forged = Record(topic=auth_topic, service="auth", endpoint=endpoint, node_key=rogue.identity.public_key,
                        version="1.0", seq=wall_ms(), ttl=30, blob=blob)
        assert dht.storage.put(key, forged, 30.0)
        # Whoever looks auth up (a fresh client, the gateway) is served the forged blob, and drops it:
        # it finds the real auth alone.
        assert blob in await mesh.client.discovery._server.find_records(key)
        mesh.client.discovery.forget(auth_topic)
        found = await mesh.client.discovery.lookup(auth_topic)
        assert {p.node_key for p in found} == real_auth
        assert rogue.identity.public_key not in {p.node_key for p in found}
        user = await mesh.user("carol")  # logins reach auth, and the gateway's checks too
        chunks = await infer((await mesh.gateways())[0], user.api_key, max_tokens=2)
        assert chunks[-1]["done"]

        # What its role does may: announce a model, call any member's method.
        await rogue.discovery.announce(model_topic("rogue-model"), service="inference", endpoint=endpoint,
                                       version="1.0")
        assert [p.node_key for p in await mesh.client.discovery.lookup(model_topic("rogue-model"))] == [
            rogue.identity.public_key]
        assert "uptime_s" in await rogue.mesh("auth").call("rpc.ping")


@pytest.mark.parametrize("role, method, params", [
    ("inference", "auth.record_usage", {"batch": []}),          # bill anyone, or no one
    ("inference", "auth.grant_admin", {"user": "mallory"}),
    ("inference", "auth.validate_key", {"api_key": "isk-" + "0" * 40}),
    ("inference", "auth.invalidations", {}),
    ("inference", "auth.active_users", {}),
    ("gateway", "auth.grant_admin", {"user": "mallory"}),        # a public-facing role makes no admin
    ("gateway", "auth.revoke_admin", {"user": "root"}),
])
async def test_a_role_cannot_call_what_it_does_not_serve(mesh, role, method, params):
    async with AsyncExitStack() as stack:
        caller = await member(stack, mesh, role, f"{role}-caller-{secrets.token_hex(3)}")
        with pytest.raises(Forbidden, match=f"not open to the {role} role") as refused:
            await caller.mesh("auth").call(method, params, timeout=5)
        assert refused.value.data.get("role") == role


async def test_a_worker_cannot_drive_another_worker_and_the_gateway_still_can(mesh):
    user = await mesh.user("dave")
    async with AsyncExitStack() as stack:
        rogue = await member(stack, mesh, "inference", "rogue-driver")
        with pytest.raises(Forbidden, match="inference.generate is not open to the inference role"):
            stream = await rogue.mesh.topic(model_topic(MODEL)).stream(
                "inference.generate", {"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=5)
            [chunk async for chunk in stream]
        with pytest.raises(Forbidden):
            await rogue.mesh.topic(model_topic(MODEL)).call("inference.models", timeout=5)
        # the gateway role is served: a request through it completes
        chunks = await infer((await mesh.gateways())[0], user.api_key, max_tokens=3)
        assert chunks[-1]["usage"]["completion_tokens"] == 3
