"""Node identity and the mesh (cluster) credential.

Every node has one Ed25519 key pair, kept in its data directory. Its public key
is the node's identity: DHT records are signed with it, and the node's
CurveZMQ server key pair is *derived* from it (Ed25519 -> Curve25519), so a
record that verifies under key K can only advertise K's own Curve key.

A mesh is a 32-byte secret (`mesh.secret` in the first node's data
directory), like a cluster join token; whoever holds it is the mesh's
operator. From it derive:

* the **mesh signing key**, whose public half is the *mesh id*: all a client
  needs to check DHT records;
* one **role key** per role (shared/roles.py: auth, gateway, inference,
  metrics, web, dht, operator), each signed by the mesh key. A process is
  given only its role's credential (`MemberCredential`, as text in
  `INFERSWARM_CREDENTIAL`): its role key certifies the process's node key,
  so its DHT records say which role signed them and are accepted only on
  that role's topics; and the role's CurveZMQ client key, derived from the
  role key, is what it calls others with, so servers know the caller's role
  and serve an internal method to the roles it names only.

Public sockets (the gateway's, auth's) accept any CURVE client, and calls are
then authorised per method by the API key or token they carry.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path

import msgpack
from zmq.utils import z85
from nacl.bindings import crypto_sign, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from shared.roles import OPERATOR, ROLES, check_role

__all__ = [
    "CurveKeyPair",
    "NodeIdentity",
    "MemberCredential",
    "MeshCredential",
    "MeshId",
    "curve_key_of",
    "write_private_file",
    "verify_member_cert",
]

_CERT_CONTEXT = b"inferswarm/member-cert/v2\x00"
_ROLE_CONTEXT = b"inferswarm/role-cert/v1\x00"
_ROLE_SEED_CONTEXT = b"inferswarm/role-seed/v1\x00"
_MEMBER_PREFIX = "isw-member-v1:"
#: The longest role name a certificate may carry.
MAX_ROLE_LEN = 16


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
        self._secret = crypto_sign_seed_keypair(bytes(signing_key))[1]  #: libsodium's 64-byte secret key
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
        """The 64-byte Ed25519 signature of `message` (libsodium's, without PyNaCl's
        SignedMessage wrapping: receipts are signed on the request path)."""
        return crypto_sign(message, self._secret)[:64]


class MemberCredential:
    """One role's credential: all a process of that role holds of the mesh.

    * a **role key** (Ed25519), with the mesh key's signature binding it to
      the role name: it certifies the node keys of the role's processes, so
      their DHT records say which role signed them (`certify`);
    * the role's **CurveZMQ client key**, derived from the role key: servers
      know each role's public client key (the `roster`), so a call says which
      role made it;
    * the **roster**: every role's public key with the mesh's signature, each
      checked against the mesh id when the credential is loaded.

    Made by whoever holds the mesh secret (`MeshCredential.member`), handed to
    the process as text (`to_text`, `INFERSWARM_CREDENTIAL`).
    """

    def __init__(self, mesh_id: bytes, role: str, seed: bytes, roster: Mapping[str, bytes]) -> None:
        check_role(role)
        if len(mesh_id) != 32 or len(seed) != 32:
            raise ValueError("a member credential needs a 32-byte mesh id and a 32-byte role seed")
        self.mesh_id = mesh_id
        self.role = role
        self._seed = seed
        self._signing_key = SigningKey(seed)
        self.public_key: bytes = bytes(self._signing_key.verify_key)
        self._roster_certs = dict(roster)
        #: Z85 client key -> role, for servers to tell who calls.
        self.roster: dict[bytes, str] = {}
        for name, entry in self._roster_certs.items():
            check_role(name)
            if len(entry) != 96 or not _verify_role(mesh_id, name, entry[:32], entry[32:]):
                raise ValueError(f"the roster's {name!r} entry is not signed by this mesh")
            self.roster[curve_key_of(entry[:32])] = name
        if self._roster_certs.get(role, b"")[:32] != self.public_key:
            raise ValueError(f"the roster has no certificate for this credential's {role!r} key")
        self._role_sig = self._roster_certs[role][32:]
        self.client = CurveKeyPair.from_private(self._signing_key.to_curve25519_private_key())

    def __repr__(self) -> str:  # never print the seed
        return f"MemberCredential(role={self.role!r}, mesh_id={self.mesh_id.hex()[:16]}…)"

    def certify(self, node_key: bytes) -> bytes:
        """A member certificate for `node_key`, as DHT records carry it:
        role key (32) | the mesh's signature of it (64) | the role key's
        signature of the node key (64) | the role's name."""
        name = self.role.encode()
        node_sig = self._signing_key.sign(_CERT_CONTEXT + name + b"\x00" + node_key).signature
        return self.public_key + self._role_sig + node_sig + name

    def to_text(self) -> str:
        """The credential as one line of text (for a file or an environment variable)."""
        packed = msgpack.packb([self.mesh_id, self.role, self._seed, self._roster_certs], use_bin_type=True)
        return _MEMBER_PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")

    @classmethod
    def from_text(cls, text: str) -> MemberCredential:
        text = text.strip()
        if not text.startswith(_MEMBER_PREFIX):
            raise ValueError(f"a member credential starts with {_MEMBER_PREFIX!r} (made by `inferswarm credential`)")
        body = text[len(_MEMBER_PREFIX):]
        try:
            packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            mesh_id, role, seed, roster = msgpack.unpackb(packed, raw=False, max_bin_len=4096, max_str_len=64,
                                                        max_array_len=8, max_map_len=16)
        except Exception:  # any malformed text
            raise ValueError("a member credential that cannot be read (cut or altered?)") from None
        if not (type(mesh_id) is bytes and type(role) is str and type(seed) is bytes and isinstance(roster, dict)):
            raise ValueError("a member credential that cannot be read (cut or altered?)")
        return cls(mesh_id, role, seed, roster)


class MeshCredential:
    """The mesh secret, and what derives from it: the operator's credential.

    Whoever holds the secret can make every role's credential (`member`),
    so a holder is the mesh's operator: as a member, it acts in the
    `operator` role (`client`, `certify`, `roster` are that role's), which
    may call every internal method. Give service processes `member(role)`,
    never the secret.
    """

    role = OPERATOR

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the mesh secret must be at least 32 bytes")
        self._secret = secret
        seed = hashlib.blake2b(secret, digest_size=32, person=b"isw-mesh-sign").digest()
        self._signing_key = SigningKey(seed)
        self.mesh_id: bytes = bytes(self._signing_key.verify_key)
        roster = {}
        for role in ROLES:
            public = bytes(SigningKey(self._role_seed(role)).verify_key)
            roster[role] = public + self._signing_key.sign(_role_message(role, public)).signature
        self._roster = roster
        self._operator = self.member(OPERATOR)
        self.client = self._operator.client
        self.roster = self._operator.roster

    def __repr__(self) -> str:
        return f"MeshCredential(mesh_id={self.mesh_id.hex()[:16]}…)"

    def _role_seed(self, role: str) -> bytes:
        return hashlib.blake2b(_ROLE_SEED_CONTEXT + role.encode() + b"\x00" + self._secret, digest_size=32).digest()

    def member(self, role: str) -> MemberCredential:
        """The credential of `role` (the same every time: derived from the secret)."""
        check_role(role)
        return MemberCredential(self.mesh_id, role, self._role_seed(role), self._roster)

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
        """A member certificate of the operator role for `node_key`."""
        return self._operator.certify(node_key)


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

    #: No role: a client that only looks up and calls public methods.
    role = ""

    def certify(self, node_key: bytes) -> bytes:
        """No certificate: records this node signed would be refused by others."""
        return b""


def _role_message(role: str, public: bytes) -> bytes:
    return _ROLE_CONTEXT + role.encode() + b"\x00" + public


def _verify_role(mesh_id: bytes, role: str, public: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(mesh_id).verify(_role_message(role, public), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def verify_member_cert(mesh_id: bytes, node_key: bytes, cert: bytes) -> str | None:
    """The role `cert` certifies `node_key` for in the mesh `mesh_id`, or None
    when it does not (see `MemberCredential.certify` for the layout)."""
    if not 160 < len(cert) <= 160 + MAX_ROLE_LEN:
        return None
    public, role_sig, node_sig, name = cert[:32], cert[32:96], cert[96:160], cert[160:]
    try:
        role = name.decode("ascii")
        check_role(role)
        VerifyKey(public).verify(_CERT_CONTEXT + name + b"\x00" + node_key, node_sig)
    except (BadSignatureError, ValueError, TypeError):
        return None
    return role if _verify_role(mesh_id, role, public, role_sig) else None
