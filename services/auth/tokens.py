"""Session tokens: JWTs signed with Ed25519 (EdDSA), verifiable with the public key alone.

The auth service holds the private key in its data directory (0600, created on
first start); every other service fetches the public key once with
`auth.token_key` and verifies tokens locally with a `TokenVerifier`.
Verification pins the algorithm to EdDSA, so `alg: none` and HMAC-with-the-
public-key tricks are refused, and checks the signature, `iss`, `aud`, `exp`
and the presence of every claim. Any failure is `UNAUTHENTICATED`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import Unauthenticated
from shared.identity import write_private_file

__all__ = ["ALGORITHM", "MAX_TOKEN_LENGTH", "TokenIssuer", "TokenVerifier", "load_or_create_key"]

ALGORITHM = "EdDSA"
MAX_TOKEN_LENGTH = 4096
_REQUIRED = ["iss", "aud", "sub", "iat", "exp", "jti"]
_LEEWAY_S = 5.0  # clock skew between machines


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


def _public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()[:12]).decode().rstrip("=")


class TokenVerifier:
    """Checks tokens against one public key, issuer and audience."""

    def __init__(self, public_key: Ed25519PublicKey | str, *, issuer: str, audience: str) -> None:
        if isinstance(public_key, str):
            loaded = serialization.load_pem_public_key(public_key.encode())
            if not isinstance(loaded, Ed25519PublicKey):
                raise ValueError("not an Ed25519 public key")
            public_key = loaded
        self.public_key = public_key
        self.issuer = issuer
        self.audience = audience
        self.key_id = _key_id(public_key)

    @property
    def public_pem(self) -> str:
        return _public_pem(self.public_key)

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; `Unauthenticated` for anything else."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid token")
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=_LEEWAY_S,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthenticated("invalid token") from None
        if not isinstance(claims.get("sub"), str):
            raise Unauthenticated("invalid token")
        return claims


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
