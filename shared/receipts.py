"""Signed usage receipts: what a gateway says it served, checkable by anyone.

A gateway signs one receipt per request it served to the end (a
`gateway.infer` stream's final chunk, a `gateway.embed` answer), with its
node's Ed25519 key (shared/identity.py) -- the key its DHT records are signed
with, so whoever can look the gateway up knows the key. A receipt is a map:

    v                  1
    request_id         the gateway's id of the request (`gw-...`): the usage record's id
    model              the model that served it
    prompt_tokens      as the worker counted them
    completion_tokens  as the worker counted them (0 for embeddings)
    cost               the request's cost at the model's price at its start, a decimal string
                       with 10 decimals ("0.0042000000", shared/pricing.py); None: no price
    at                 epoch seconds of the request's start, rounded to 3 decimals (a float)
    user_id            the account billed
    gateway            the signer's public key (64 hex digits)

**Canonical encoding**: msgpack of the map with its keys in sorted order
(bytewise; they are ASCII), integers in their shortest form, `at` as a
float64, strings as str, `cost` nil or str -- what `msgpack.packb` makes
of the map built in sorted key order. `verify` re-encodes what it decoded
and refuses bytes that differ, so there is exactly one encoding of a
receipt, whatever the order a program built its map in.

**Signature**: Ed25519 over `CONTEXT + payload` (`CONTEXT` =
``b"inferswarm/usage-receipt/v1\\x00"``): the context keeps a receipt
signature from ever passing for a DHT record's, which the same key signs
(shared/dht/record.py has its own context).

**Text form** (fits an HTTP header, no comma, no padding):

    isr-v1.<base64url(payload)>.<base64url(signature)>

base64url without `=` padding; a decoder must refuse other characters and
non-canonical final characters (this one re-encodes and compares), so no
two texts verify as the same receipt.

`verify(text, trusted_keys)` returns the `Receipt` or raises
`InvalidReceipt` (code `INVALID_PARAMS`, `data["reason"]`: `format` for
text or payload that is not a receipt of this version, `unknown_signer` for a
gateway key not in `trusted_keys`, `signature` for a signature that does not
verify -- a changed byte anywhere fails one of them).

What a receipt proves and what it does not: SECURITY.md, "Usage receipts".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import msgpack
from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from shared.errors import InvalidParams

__all__ = ["VERSION", "PREFIX", "CONTEXT", "HEADER", "Receipt", "Signer", "InvalidReceipt", "sign", "verify",
           "encode", "read_keys"]

VERSION = 1
PREFIX = "isr-v1."
CONTEXT = b"inferswarm/usage-receipt/v1\x00"
#: The HTTP header the web service sends receipts in (comma-separated when a reply has several).
HEADER = "x-inferswarm-receipt"
#: The longest receipt text `verify` reads (a real one is about 300 characters).
MAX_TEXT = 2048
_FIELDS = ("at", "completion_tokens", "cost", "gateway", "model", "prompt_tokens", "request_id", "user_id", "v")
_FIELD_SET = frozenset(_FIELDS)
_INTS = ("v", "prompt_tokens", "completion_tokens", "user_id")
_B64 = re.compile(r"[A-Za-z0-9_-]+")
_HEX_KEY = re.compile(r"[0-9a-f]{64}")
_DECIMAL = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?")


class Signer(Protocol):
    """What signs receipts: a node's identity (`shared.identity.NodeIdentity`)."""

    public_key: bytes

    def sign(self, message: bytes) -> bytes: ...


class InvalidReceipt(InvalidParams):
    """A receipt that does not verify; `data["reason"]` says why (see the module doc)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"receipt: {message}", {"reason": reason})
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Receipt:
    """A verified receipt's fields (see the module doc)."""

    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: str | None
    at: float
    user_id: int
    gateway: str
    v: int = VERSION

    def fields(self) -> dict[str, Any]:
        """The map that is signed, in canonical (sorted) key order (`getattr`, not `asdict`:
        asdict deep-copies every value, a third of signing a receipt)."""
        return {name: getattr(self, name) for name in _FIELDS}


def _pack(fields: dict[str, Any]) -> bytes:
    """msgpack of the map, its keys in the order given (`encode` sorts them first)."""
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def encode(fields: dict[str, Any]) -> bytes:
    """The canonical msgpack encoding of a receipt's map: sorted keys, whatever `fields`' order."""
    return _pack({name: fields[name] for name in sorted(fields)})


def sign(signer: Signer, *, request_id: str, model: str, prompt_tokens: int, completion_tokens: int,
         at: float, user_id: int, cost: Decimal | str | None = None) -> str:
    """A receipt signed by `signer`, in its text form."""
    fields = {  # in canonical (sorted) key order, so packed as is
        "at": round(float(at), 3), "completion_tokens": completion_tokens,
        "cost": None if cost is None else _decimal_text(cost), "gateway": signer.public_key.hex(),
        "model": model, "prompt_tokens": prompt_tokens, "request_id": request_id, "user_id": user_id,
        "v": VERSION,
    }
    _check(fields)
    payload: bytes = _pack(fields)
    return PREFIX + _b64(payload) + "." + _b64(signer.sign(CONTEXT + payload))


def verify(text: str, trusted_keys: Iterable[str | bytes]) -> Receipt:
    """The receipt `text` holds, if a key of `trusted_keys` (hex or raw) signed it;
    else `InvalidReceipt`."""
    payload, signature = _split(text)
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_str_len=512, max_bin_len=0,
                                 max_array_len=0, max_map_len=len(_FIELDS), max_ext_len=0)
    except Exception:  # any malformed msgpack, or bytes after it
        raise InvalidReceipt("format", "the payload is not msgpack") from None
    if not isinstance(fields, dict):
        raise InvalidReceipt("format", "the payload is not a map")
    _check(fields)
    if encode(fields) != payload:
        raise InvalidReceipt("format", "the payload is not canonically encoded")
    trusted = {key.hex() if isinstance(key, bytes) else key.strip().lower() for key in trusted_keys}
    if fields["gateway"] not in trusted:
        raise InvalidReceipt("unknown_signer", f"signed by {fields['gateway'][:16]}…, not a trusted gateway key")
    try:
        VerifyKey(bytes.fromhex(fields["gateway"])).verify(CONTEXT + payload, signature)
    except (CryptoError, ValueError):
        raise InvalidReceipt("signature", "the signature does not verify (altered, or not the gateway's)") from None
    return Receipt(**fields)


def read_keys(text: str) -> frozenset[str]:
    """Trusted gateway keys from a file's text: a JSON list of hex keys (what
    `GET /api/receipts/keys` answers) or one hex key per line (`#` comments)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError:
            raise InvalidParams("the keys file is not a JSON list", {"param": "keys"}) from None
    else:
        items = [line.split("#", 1)[0].strip() for line in stripped.splitlines()]
    if not isinstance(items, list):
        raise InvalidParams("the keys file is not a JSON list", {"param": "keys"})
    keys = [item.strip().lower() for item in items if isinstance(item, str) and item.strip()]
    bad = [key for key in keys if not _HEX_KEY.fullmatch(key)]
    if bad or len(keys) != sum(1 for item in items if item):
        raise InvalidParams("a gateway key is 64 hex digits", {"param": "keys"})
    return frozenset(keys)


def _split(text: str) -> tuple[bytes, bytes]:
    if not isinstance(text, str) or len(text) > MAX_TEXT or not text.startswith(PREFIX):
        raise InvalidReceipt("format", f"a receipt is {PREFIX}<payload>.<signature>")
    parts = text[len(PREFIX):].split(".")
    if len(parts) != 2:
        raise InvalidReceipt("format", f"a receipt is {PREFIX}<payload>.<signature>")
    payload, signature = (_unb64(part) for part in parts)
    if len(signature) != 64:
        raise InvalidReceipt("format", "the signature is not 64 bytes")
    return payload, signature


def _check(fields: dict[str, Any]) -> None:
    """The map has exactly the fields of this version, each of its type."""
    if len(fields) != len(_FIELDS) or fields.keys() != _FIELD_SET:
        raise InvalidReceipt("format", "the payload does not have the fields of a v1 receipt")
    if fields["v"] != VERSION or any(type(fields[name]) is not int or fields[name] < 0 for name in _INTS):
        raise InvalidReceipt("format", "v, prompt_tokens, completion_tokens and user_id are whole numbers (v: 1)")
    if type(fields["at"]) is not float or fields["at"] < 0:
        raise InvalidReceipt("format", "at is epoch seconds (a float)")
    if not all(isinstance(fields[name], str) and 0 < len(fields[name]) <= 256 for name in ("request_id", "model")):
        raise InvalidReceipt("format", "request_id and model are non-empty strings")
    cost = fields["cost"]
    if cost is not None and not (isinstance(cost, str) and _DECIMAL.fullmatch(cost)):
        raise InvalidReceipt("format", "cost is null or a decimal string")
    if not (isinstance(fields["gateway"], str) and _HEX_KEY.fullmatch(fields["gateway"])):
        raise InvalidReceipt("format", "gateway is a public key in 64 lower-case hex digits")


def _decimal_text(cost: Decimal | str) -> str:
    """A cost as plain digits ("0.0000000000", never "0E-10": what a verifier's pattern takes)."""
    return format(cost, "f") if isinstance(cost, Decimal) else cost


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(part: str) -> bytes:
    """Strict base64url without padding: other characters, or a final character
    with bits set that encode nothing, are refused (one text per receipt)."""
    if not _B64.fullmatch(part) or len(part) % 4 == 1:
        raise InvalidReceipt("format", "not base64url")
    try:
        data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise InvalidReceipt("format", "not base64url") from None
    if _b64(data) != part:
        raise InvalidReceipt("format", "not canonical base64url")
    return data
