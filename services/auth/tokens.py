"""Session tokens: JWTs signed with Ed25519 (EdDSA), verifiable with the public key alone.

The auth service holds the private key in its data directory (0600, created on
first start) and issues tokens with a `TokenIssuer`; every other service
fetches the public key once with `auth.token_key` and verifies tokens locally
with a `TokenVerifier` (services/auth/client/tokens.py, re-exported here).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.identity import write_private_file
from services.auth.client.tokens import ALGORITHM, MAX_TOKEN_LENGTH, TokenVerifier

__all__ = ["ALGORITHM", "MAX_TOKEN_LENGTH", "TokenIssuer", "TokenVerifier", "load_or_create_key"]


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in `path` (PEM, PKCS#8), created with mode 0600 if missing."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem)
    return key


class TokenIssuer(TokenVerifier):
    """Signs tokens with the private key; verifies them like any verifier."""

    def __init__(
        self, private_key: Ed25519PrivateKey, *, issuer: str, audience: str, ttl: float
    ) -> None:
        super().__init__(private_key.public_key(), issuer=issuer, audience=audience)
        self._private_key = private_key
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"TokenIssuer(kid={self.key_id!r}, issuer={self.issuer!r})"

    def issue(self, subject: str, **extra: Any) -> tuple[str, int]:
        """A signed token for `subject` and its expiry (epoch seconds)."""
        now = int(time.time())
        expires = now + int(self.ttl)
        claims = {
            **extra,
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "exp": expires,
            "jti": secrets.token_urlsafe(16),
        }
        token = jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.key_id})
        return token, expires
