"""Signed provider records: what a node stores under a topic key.

A record body is a msgpack map with short keys (see PROTOCOL.md):

    t topic   s service   e endpoint   k node_key (raw Ed25519 public key)
    c member cert (its role's, see identity.py)   v version   l load (small map of scalars)
    q seq (wall-clock ms at signing)   d ttl (seconds; 0 = withdrawn)

The blob stored in the DHT is msgpack `[body, signature]`, the signature being
the node key's Ed25519 signature over `RECORD_CONTEXT + body`. The context
prefix keeps a record signature from ever being valid for another message the
same key signs.

`RecordVerifier.verify` is run by storing nodes *and* by the looking-up
client: a storage node is never trusted to have checked anything.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from shared.dht.interface import Provider
from shared.errors import InvalidParams
from shared.identity import MAX_ROLE_LEN, MemberCredential, MeshCredential, NodeIdentity, curve_key_of, verify_member_cert
from shared.roles import may_announce

__all__ = [
    "RECORD_CONTEXT",
    "MAX_RECORD_SIZE",
    "MAX_LOAD_ENTRIES",
    "InvalidRecord",
    "Record",
    "member_cert",
    "peek",
    "RecordVerifier",
    "sign_record",
    "topic_key",
    "wall_ms",
]

RECORD_CONTEXT = b"inferswarm/dht-record/v1\x00"
MAX_RECORD_SIZE = 2048
MAX_LOAD_ENTRIES = 16
_SCALARS = (int, float, str, bool, type(None))
_STR_FIELDS = {"t": "topic", "s": "service", "e": "endpoint", "v": "version"}


def wall_ms() -> int:
    """Wall-clock milliseconds: the `seq` of a record signed now."""
    return time.time_ns() // 1_000_000


def topic_key(topic: str) -> bytes:
    """The 160-bit DHT key a topic's records are stored under."""
    return hashlib.sha1(topic.encode()).digest()


class InvalidRecord(ValueError):
    """A record that failed verification; `reason` is a stable code.

    Local only (a store RPC answers a plain `False`), so it is not one of the
    wire errors of `shared.errors`.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """A verified record; `blob` is its signed wire form."""

    topic: str
    service: str
    endpoint: str
    node_key: bytes
    version: str
    seq: int
    ttl: float
    load: Mapping[str, Any] = field(default_factory=dict)
    blob: bytes = b""

    @property
    def withdrawn(self) -> bool:
        return self.ttl == 0

    def to_provider(self) -> Provider:
        """The public view; the Curve key is derived, never taken from the wire."""
        return Provider(
            topic=self.topic,
            service=self.service,
            endpoint=self.endpoint,
            node_key=self.node_key,
            curve_key=curve_key_of(self.node_key),
            version=self.version,
            seq=self.seq,
            ttl=self.ttl,
            load=dict(self.load),
            record=self.blob,
        )


def _check_load(load: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(load, Mapping) or len(load) > MAX_LOAD_ENTRIES:
        raise InvalidRecord("BAD_TYPE", "load must be a map of at most 16 entries")
    for key, value in load.items():
        if not isinstance(key, str) or not isinstance(value, _SCALARS):
            raise InvalidRecord("BAD_TYPE", "load keys must be str and values scalars")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRecord("BAD_TYPE", "load values must be finite")
    return dict(load)


def sign_record(
    identity: NodeIdentity,
    cert: bytes,
    *,
    topic: str,
    service: str,
    endpoint: str,
    version: str,
    ttl: float,
    seq: int | None = None,
    load: Mapping[str, Any] | None = None,
) -> bytes:
    """Build and sign a record blob. `cert` is `MeshCredential.certify(node key)`.

    Raises `InvalidParams` when a field does not fit the record format.
    """
    try:
        body = {
            "t": topic,
            "s": service,
            "e": endpoint,
            "k": identity.public_key,
            "c": cert,
            "v": version,
            "l": _check_load(load or {}),
            "q": wall_ms() if seq is None else seq,
            "d": ttl,
        }
    except InvalidRecord as exc:
        raise InvalidParams(str(exc)) from None
    body_bytes = msgpack.packb(body, use_bin_type=True)
    signature = identity.sign(RECORD_CONTEXT + body_bytes)
    blob: bytes = msgpack.packb([body_bytes, signature], use_bin_type=True)
    return blob


def _unpack(data: bytes, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # any decoding failure of untrusted bytes
        raise InvalidRecord("BAD_ENCODING", type(exc).__name__) from None


def _split_blob(blob: Any, max_size: int) -> tuple[bytes, bytes]:
    if type(blob) is not bytes:
        raise InvalidRecord("BAD_TYPE", "a record blob must be bytes")
    if len(blob) > max_size:
        raise InvalidRecord("TOO_LARGE", f"{len(blob)} > {max_size} bytes")
    outer = _unpack(blob, max_size)
    if not (isinstance(outer, list) and len(outer) == 2):
        raise InvalidRecord("BAD_TYPE", "a record blob is [body, signature]")
    body, signature = outer
    if type(body) is not bytes or type(signature) is not bytes or len(signature) != 64:
        raise InvalidRecord("BAD_TYPE", "body and signature must be bytes")
    return body, signature


def _parse_body(body_bytes: bytes, max_size: int) -> dict[str, Any]:
    body = _unpack(body_bytes, max_size)
    if not isinstance(body, dict):
        raise InvalidRecord("BAD_TYPE", "the body must be a map")
    for key, name in _STR_FIELDS.items():
        if type(body.get(key)) is not str:
            raise InvalidRecord("BAD_TYPE", f"{name} must be a string")
    if type(body.get("k")) is not bytes or len(body["k"]) != 32:
        raise InvalidRecord("BAD_TYPE", "field 'k' must be 32 bytes")
    if type(body.get("c")) is not bytes or not 160 < len(body["c"]) <= 160 + MAX_ROLE_LEN:
        raise InvalidRecord("BAD_TYPE", "field 'c' must be a member certificate")
    if type(body.get("q")) is not int:
        raise InvalidRecord("BAD_TYPE", "seq must be an integer")
    if type(body.get("d")) not in (int, float):
        raise InvalidRecord("BAD_TYPE", "ttl must be a number")
    body["l"] = _check_load(body.get("l", {}))
    return body


def peek(blob: bytes, max_size: int = MAX_RECORD_SIZE) -> tuple[bytes, int]:
    """`(node_key, seq)` of a blob WITHOUT checking it, to order candidates.

    Lets a client verify only the newest record of each node; raises
    `InvalidRecord` when the blob cannot even be parsed.
    """
    body, _ = _split_blob(blob, max_size)
    fields = _parse_body(body, max_size)
    return fields["k"], fields["q"]


class RecordVerifier:
    """Checks record blobs for one mesh; see `verify` for what is rejected."""

    def __init__(
        self,
        mesh_id: bytes,
        *,
        max_size: int = MAX_RECORD_SIZE,
        max_ttl: float = 300.0,
        clock_skew: float = 5.0,
        cert_cache_size: int = 1024,
    ) -> None:
        self.mesh_id = mesh_id
        self.max_size = max_size
        self.max_ttl = max_ttl
        self.clock_skew = clock_skew
        # Member certs repeat in every record of a node: remember the good
        # ones instead of re-running an Ed25519 verification each time.
        self._good_certs: OrderedDict[tuple[bytes, bytes], str] = OrderedDict()
        self._cert_cache_size = cert_cache_size

    def verify(
        self,
        blob: Any,
        *,
        key: bytes | None = None,
        topic: str | None = None,
        now_ms: int | None = None,
    ) -> Record:
        """The `Record` in `blob`, or `InvalidRecord` naming why it was dropped.

        Rejected: wrong types or encoding, a blob over `max_size`, a ttl outside
        [0, max_ttl], a seq more than `clock_skew` in the future, an expired
        record, a topic whose digest is not `key` (or which is not `topic`), a
        member cert not valid for this mesh, a topic the cert's role may not
        announce (shared/roles.py), a bad signature.
        """
        body_bytes, signature = _split_blob(blob, self.max_size)
        body = _parse_body(body_bytes, self.max_size)
        self._check_times(body["q"], body["d"], wall_ms() if now_ms is None else now_ms)
        if key is not None and topic_key(body["t"]) != key:
            raise InvalidRecord("WRONG_KEY", "the topic does not hash to this key")
        if topic is not None and body["t"] != topic:
            raise InvalidRecord("WRONG_KEY", "a record of another topic")
        role = self._check_cert(body["k"], body["c"])
        if not may_announce(role, body["t"]):
            raise InvalidRecord("WRONG_ROLE", f"a {role} member cannot announce {body['t']!r}")
        try:
            VerifyKey(body["k"]).verify(RECORD_CONTEXT + body_bytes, signature)
        except (CryptoError, ValueError, TypeError):
            raise InvalidRecord("BAD_SIGNATURE") from None
        return Record(
            topic=body["t"],
            service=body["s"],
            endpoint=body["e"],
            node_key=body["k"],
            version=body["v"],
            seq=body["q"],
            ttl=body["d"],
            load=body["l"],
            blob=blob,
        )

    def lifetime(self, record: Record, now_ms: int | None = None) -> float:
        """Seconds a storing node keeps `record` from now.

        Its ttl, but never past the signer's expiry (+ skew): a record
        replayed late must not live a full ttl again.
        """
        now_ms = wall_ms() if now_ms is None else now_ms
        left = (record.seq + record.ttl * 1000 - now_ms) / 1000 + self.clock_skew
        return max(0.0, min(record.ttl, left))

    def _check_times(self, seq: int, ttl: float, now_ms: int) -> None:
        if not (math.isfinite(ttl) and 0 <= ttl <= self.max_ttl):
            raise InvalidRecord("BAD_TTL", f"ttl must be within [0, {self.max_ttl}]")
        skew_ms = self.clock_skew * 1000
        if seq > now_ms + skew_ms:
            raise InvalidRecord("FUTURE_SEQ", "signed in the future beyond the clock skew")
        # A withdrawal matters as long as a record it overrides could still
        # be valid, so it "lives" max_ttl: then an older record of the node
        # returned by a storage node that missed it is still overruled.
        lives = self.max_ttl if ttl == 0 else ttl
        if seq + lives * 1000 < now_ms - skew_ms:
            raise InvalidRecord("EXPIRED")

    def _check_cert(self, node_key: bytes, cert: bytes) -> str:
        """The role `cert` gives `node_key`, or InvalidRecord."""
        pair = (node_key, cert)
        role = self._good_certs.get(pair)
        if role is not None:
            self._good_certs.move_to_end(pair)
            return role
        role = verify_member_cert(self.mesh_id, node_key, cert)
        if role is None:
            raise InvalidRecord("BAD_CERT", "the member cert is not valid for this mesh")
        self._good_certs[pair] = role
        if len(self._good_certs) > self._cert_cache_size:
            self._good_certs.popitem(last=False)
        return role


def member_cert(mesh: MeshCredential | MemberCredential, identity: NodeIdentity) -> bytes:
    """This node's member cert, as records carry it."""
    return mesh.certify(identity.public_key)
