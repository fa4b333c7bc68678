"""Node identity and the mesh (cluster) credential.

Every node has one Ed25519 key pair, kept in its data directory. Its public key
is the node's identity: DHT records are signed with it, and the node's
CurveZMQ server key pair is *derived* from it (Ed25519 -> Curve25519), so a
record that verifies under key K can only advertise K's own Curve key.

Membership in a mesh is a shared 32-byte secret (`INFERSWARM_MESH_SECRET`, or
`mesh.secret` in the data directory), like a cluster join token. From it every
member derives the same:

* **mesh signing key** -- signs a *member certificate* over a node's Ed25519
  key; DHT records must carry one, so outsiders cannot announce services.
  Its public half (the *mesh id*) is all a client needs to check records.
* **mesh client key** -- the CurveZMQ key pair members use when they call each
  other. Internal servers accept only this client key (ZAP allow-list), so an
  internal method is reachable by mesh members only. Public sockets (the
  gateway's) accept any CURVE client, and calls are then authorised per
  method by the API key or token they carry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zmq.utils import z85
from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "CurveKeyPair",
    "NodeIdentity",
    "MeshCredential",
    "MeshId",
    "curve_key_of",
    "write_private_file",
    "verify_member_cert",
]

_CERT_CONTEXT = b"inferswarm/member-cert/v1\x00"


@dataclass(frozen=True, slots=True)
class CurveKeyPair:
    """A CurveZMQ key pair, both halves Z85-encoded as libzmq expects them."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print the secret half
        return f"CurveKeyPair(public={self.public.decode()!r}, secret=***)"

    @classmethod
    def from_private(cls, private: PrivateKey) -> CurveKeyPair:
        return cls(
            public=z85.encode(bytes(private.public_key)),
            secret=z85.encode(bytes(private)),
        )


def curve_key_of(node_key: bytes) -> bytes:
    """The Z85 CurveZMQ public key derived from a raw Ed25519 public key."""
    return z85.encode(bytes(VerifyKey(node_key).to_curve25519_public_key()))


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only (0600), atomically.

    Readers see the old file or the new one, never a part. The bytes go to a
    temporary file of a random name created with `O_EXCL | O_NOFOLLOW`
    (`tempfile.mkstemp`), never to a predictable name: a link planted there
    by someone who can write the directory cannot redirect the secret, nor
    truncate another file. Directories made on the way are 0700. Concurrent
    writers each have their own temporary file; the last `os.replace` wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class NodeIdentity:
    """A node's Ed25519 key pair and what derives from it."""

    def __init__(self, signing_key: SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.curve = CurveKeyPair.from_private(signing_key.to_curve25519_private_key())
        #: 160-bit Kademlia node id, stable across restarts.
        self.node_id: bytes = hashlib.sha1(self.public_key).digest()

    def __repr__(self) -> str:
        return f"NodeIdentity({self.public_key.hex()[:16]}…)"

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(SigningKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> NodeIdentity:
        """Load the 32-byte seed at `path`, creating it (0600) on first start."""
        if path.exists():
            seed = path.read_bytes()
            if len(seed) != 32:
                raise ValueError(f"{path}: expected a 32-byte Ed25519 seed, found {len(seed)} bytes")
            return cls(SigningKey(seed))
        identity = cls.generate()
        write_private_file(path, bytes(identity._signing_key))
        return identity

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature


class MeshCredential:
    """What a mesh member derives from the shared mesh secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the mesh secret must be at least 32 bytes")
        seed = hashlib.blake2b(secret, digest_size=32, person=b"isw-mesh-sign").digest()
        self._signing_key = SigningKey(seed)
        self.mesh_id: bytes = bytes(self._signing_key.verify_key)
        client_seed = hashlib.blake2b(secret, digest_size=32, person=b"isw-mesh-curv").digest()
        self.client = CurveKeyPair.from_private(PrivateKey(client_seed))

    def __repr__(self) -> str:
        return f"MeshCredential(mesh_id={self.mesh_id.hex()[:16]}…)"

    @staticmethod
    def new_secret() -> bytes:
        return secrets.token_bytes(32)

    @classmethod
    def from_text(cls, text: str) -> MeshCredential:
        """Build from the hex form used in files and `INFERSWARM_MESH_SECRET`."""
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as exc:
            raise ValueError(f"the mesh secret must be 64+ hex characters: {exc}") from None

    @classmethod
    def load_or_create(cls, path: Path) -> MeshCredential:
        if path.exists():
            return cls.from_text(path.read_text())
        secret = cls.new_secret()
        write_private_file(path, secret.hex().encode() + b"\n")
        return cls(secret)

    def certify(self, node_key: bytes) -> bytes:
        """A member certificate: the mesh key's signature over a node key."""
        return self._signing_key.sign(_CERT_CONTEXT + node_key).signature


class MeshId:
    """A mesh known by its public id only: enough to verify its DHT records.

    What a client that never announces (the CLI) holds instead of the secret:
    its lookups check every record's member certificate against `mesh_id`,
    and it calls public methods with a key of its own.
    """

    def __init__(self, mesh_id: bytes) -> None:
        if len(mesh_id) != 32:
            raise ValueError("a mesh id is 32 bytes (64 hex characters)")
        self.mesh_id = mesh_id

    def __repr__(self) -> str:
        return f"MeshId({self.mesh_id.hex()[:16]}…)"

    @classmethod
    def from_text(cls, text: str) -> MeshId:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as exc:
            raise ValueError(f"a mesh id must be 64 hex characters: {exc}") from None

    def certify(self, node_key: bytes) -> bytes:
        """No certificate: records this node signed would be refused by others."""
        return bytes(64)


def verify_member_cert(mesh_id: bytes, node_key: bytes, cert: bytes) -> bool:
    """True when `cert` is the mesh `mesh_id`'s certificate for `node_key`."""
    try:
        VerifyKey(mesh_id).verify(_CERT_CONTEXT + node_key, cert)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True

