"""Member roles: credentials, which methods a role may call, which credential a
process takes (real CurveZMQ servers on loopback, no mesh)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import msgpack
import pytest
import zmq.asyncio
from nacl.public import PrivateKey

from shared.config import ConfigError, MeshConfig, Secret
from shared.errors import Forbidden
from shared.identity import CurveKeyPair, MemberCredential, MeshCredential, NodeIdentity, verify_member_cert
from shared.membership import mesh_credential
from shared.roles import ROLES, may_announce
from shared.rpc import Connection, Dispatcher, RpcServer, current_request, method


class Vault:
    """A service with one method per kind of access."""

    name = "vault"

    @method(roles=("gateway",))
    async def settle(self) -> dict[str, Any]:
        request = current_request.get()
        assert request is not None
        return {"role": request.role}

    @method(roles=())
    async def grant(self) -> str:
        return "granted"

    @method
    async def note(self) -> str:
        return "noted"

    @method(public=True)
    async def hello(self) -> str:
        return "hi"


_SECRET = MeshCredential.new_secret()


@pytest.fixture(scope="module")
def mesh() -> MeshCredential:
    return MeshCredential(_SECRET)


def fields_of(text: str) -> tuple[bytes, str, bytes, dict[str, bytes]]:
    """The fields of a credential's text (its documented format: a prefix, then base64url msgpack)."""
    body = text.split(":", 1)[1]
    mesh_id, role, seed, roster = msgpack.unpackb(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return mesh_id, role, seed, roster


@pytest.mark.unit
def test_a_role_credential_travels_as_text_and_keeps_its_keys(mesh):
    for role in ROLES:
        member = mesh.member(role)
        again = MemberCredential.from_text(member.to_text())
        assert (again.role, again.mesh_id, again.client) == (role, mesh.mesh_id, member.client)
        assert again.roster == mesh.roster and again.roster[again.client.public] == role
        node = NodeIdentity.generate()
        assert verify_member_cert(mesh.mesh_id, node.public_key, again.certify(node.public_key)) == role
    # every role has its own client key: a call says which role made it
    assert len({mesh.member(role).client.public for role in ROLES}) == len(ROLES)
    assert "seed" not in repr(mesh.member("auth")) and mesh.member("auth").to_text() not in repr(mesh.member("auth"))


@pytest.mark.unit
def test_an_altered_credential_is_refused(mesh):
    text = mesh.member("inference").to_text()
    with pytest.raises(ValueError, match="starts with"):
        MemberCredential.from_text(text.replace("isw-member-v1:", "isw-member-v0:"))
    with pytest.raises(ValueError, match="cannot be read"):
        MemberCredential.from_text(text[:-40])
    # a worker that claims the auth role: its key is not the roster's auth key
    _, _, seed, roster = fields_of(text)
    with pytest.raises(ValueError, match="no certificate for this credential's 'auth' key"):
        MemberCredential(mesh.mesh_id, "auth", seed, roster)
    # a roster entry not signed by the mesh (a key of one's own slipped in as auth's)
    forged = dict(roster)
    forged["auth"] = bytes(NodeIdentity.generate().public_key) + forged["auth"][32:]
    with pytest.raises(ValueError, match="'auth' entry is not signed by this mesh"):
        MemberCredential(mesh.mesh_id, "inference", seed, forged)
    with pytest.raises(ValueError, match="unknown role"):
        mesh.member("root")


@pytest.mark.unit
def test_topics_belong_to_roles():
    assert may_announce("auth", "inferswarm/auth/v1") and not may_announce("inference", "inferswarm/auth/v1")
    assert may_announce("inference", "inferswarm/model/x") and not may_announce("gateway", "inferswarm/model/x")
    assert not may_announce("", "inferswarm/auth/v1")  # a client without a role


@pytest.mark.unit
def test_public_methods_take_no_roles():
    with pytest.raises(TypeError, match="no roles"):
        method(public=True, roles=("gateway",))
    with pytest.raises(ValueError, match="unknown role"):
        method(roles=("root",))


@pytest.mark.rpc
async def test_a_method_serves_only_the_roles_it_names(mesh):
    node = NodeIdentity.generate()
    context = zmq.asyncio.Context()
    try:
        async with RpcServer(Dispatcher(Vault()), curve=node.curve, members=mesh.roster) as server:

            async def call(keys: CurveKeyPair, name: str) -> Any:
                connection = Connection(server.endpoint, node.curve.public, keys, context=context)
                connection.open()
                try:
                    return await connection.call(name, timeout=5)
                finally:
                    await connection.close()

            gateway, worker = mesh.member("gateway").client, mesh.member("inference").client
            stranger = CurveKeyPair.from_private(PrivateKey.generate())
            assert await call(gateway, "vault.settle") == {"role": "gateway"}
            assert await call(mesh.client, "vault.settle") == {"role": "operator"}  # the operator: everything
            with pytest.raises(Forbidden, match="not open to the inference role") as refused:
                await call(worker, "vault.settle")
            assert refused.value.data == {"role": "inference"}
            for keys in (gateway, worker):  # roles=(): the operator's alone
                with pytest.raises(Forbidden):
                    await call(keys, "vault.grant")
            assert await call(mesh.client, "vault.grant") == "granted"
            assert await asyncio.gather(*(call(keys, "vault.note") for keys in (gateway, worker))) == ["noted"] * 2
            with pytest.raises(Forbidden, match="members only"):
                await call(stranger, "vault.note")
            assert await call(stranger, "vault.hello") == "hi"
            # a key of another mesh's gateway role is a stranger here
            other = MeshCredential(MeshCredential.new_secret()).member("gateway").client
            with pytest.raises(Forbidden, match="members only"):
                await call(other, "vault.settle")
    finally:
        context.destroy(linger=0)


@pytest.mark.unit
def test_a_process_takes_the_credential_of_its_role(tmp_path, mesh):
    gateway_text = mesh.member("gateway").to_text()
    given = MeshConfig(data_dir=tmp_path, credential=Secret(gateway_text), bootstrap=("127.0.0.1:7400",))
    assert mesh_credential(given, "gateway").client == mesh.member("gateway").client
    with pytest.raises(ConfigError, match="a credential of the 'gateway' role, and this process is 'auth'"):
        mesh_credential(given, "auth")
    path = tmp_path / "inference.credential"
    path.write_text(mesh.member("inference").to_text() + "\n")
    from_file = MeshConfig(data_dir=tmp_path, credential_file=path, bootstrap=("127.0.0.1:7400",))
    assert mesh_credential(from_file, "inference").role == "inference"
    with pytest.raises(ConfigError, match="INFERSWARM_CREDENTIAL_FILE .* cannot read it"):
        mesh_credential(MeshConfig(data_dir=tmp_path, credential_file=tmp_path / "missing"), "web")
    with pytest.raises(ConfigError, match="INFERSWARM_CREDENTIAL: a member credential that cannot be read"):
        mesh_credential(MeshConfig(data_dir=tmp_path, credential=Secret("isw-member-v1:AAAA")), "web")
    # the mesh secret derives the role's credential (the operator's when no role is named)
    secret = MeshConfig(data_dir=tmp_path, mesh_secret=Secret(_SECRET.hex()))
    assert mesh_credential(secret, "metrics").client == mesh.member("metrics").client
    assert mesh_credential(secret).client == mesh.client


@pytest.mark.rpc
def test_the_credential_command_as_an_operator_and_as_anyone_else(tmp_path):
    """`inferswarm credential ROLE`: from the mesh secret, a credential of that role
    (owner-only file); without the secret, or for no role, a one-line refusal."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    base.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_CACHE_HOME=str(tmp_path / "cache"))

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "inferswarm.cli", "credential", *args],
                              capture_output=True, text=True, timeout=60, env={**base, **env})

    out = tmp_path / "worker.credential"
    made = cli("inference", "--out", str(out), INFERSWARM_MESH_SECRET=_SECRET.hex())
    assert made.returncode == 0, made.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert MemberCredential.from_text(out.read_text()).client == MeshCredential(_SECRET).member("inference").client
    printed = cli("web", INFERSWARM_MESH_SECRET=_SECRET.hex())
    assert MemberCredential.from_text(printed.stdout).role == "web"
    nobody = cli("gateway")  # no secret here, no local stack
    assert nobody.returncode == 3 and nobody.stderr.startswith("inferswarm: ") and "mesh secret" in nobody.stderr
    assert nobody.stdout == ""
    bad = cli("gateway", INFERSWARM_MESH_SECRET="not-hex")
    assert bad.returncode == 3 and "INFERSWARM_MESH_SECRET" in bad.stderr
    assert cli("operator", INFERSWARM_MESH_SECRET=_SECRET.hex()).returncode == 2  # the secret itself: no
