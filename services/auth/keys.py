"""API keys: `isk_` + 43 characters of URL-safe base64 (256 random bits).

Only the SHA-256 of a key is stored and compared. A slow hash (argon2) is for
low-entropy secrets people choose; a 256-bit random key cannot be guessed
offline, and `validate_key` is on every request's path, so one SHA-256 (about
a microsecond) is the right cost. Lookups go by hash (an index, or a dict in
the cache), and the final equality check is `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

__all__ = [
    "KEY_PREFIX",
    "MIN_KEY_LENGTH",
    "MAX_KEY_LENGTH",
    "generate_key",
    "hash_key",
    "display_prefix",
    "looks_like_key",
    "same_hash",
]

KEY_PREFIX = "isk_"
_RANDOM_BYTES = 32
#: Longer input is refused before hashing: no key we issue is near this.
MIN_KEY_LENGTH = 44
MAX_KEY_LENGTH = 124
_KEY_SHAPE = re.compile(r"isk_[A-Za-z0-9_\-]{40,120}")


def generate_key() -> str:
    """A new API key: the prefix and 32 bytes from `secrets`."""
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def hash_key(api_key: str) -> bytes:
    """The 32-byte SHA-256 digest the database and caches hold."""
    # surrogatepass: a lone surrogate (only possible in-process) hashes, never raises.
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()


def display_prefix(api_key: str) -> str:
    """What list_keys shows to tell keys apart: `isk_` and 4 characters (24 bits)."""
    return api_key[: len(KEY_PREFIX) + 4]


def looks_like_key(value: object) -> bool:
    """A cheap shape check, done before any hashing or lookup."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_KEY_LENGTH
        and _KEY_SHAPE.fullmatch(value) is not None
    )


def same_hash(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two digests."""
    return hmac.compare_digest(a, b)
