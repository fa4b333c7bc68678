"""Verifying auth's session tokens locally: `TokenVerifier`.

Session tokens are JWTs signed with Ed25519 (EdDSA) by the auth service
(services/auth/tokens.py, `TokenIssuer`). Any service fetches the public key
once with `AuthClient.token_key()` and verifies tokens with a `TokenVerifier`,
without a call per token. Verification pins the algorithm to EdDSA, so
`alg: none` and HMAC-with-the-public-key tricks are refused, and checks the
signature, `iss`, `aud`, `exp` and the presence of every claim. Any failure
is `UNAUTHENTICATED`.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import Unauthenticated

__all__ = ["ALGORITHM", "MAX_TOKEN_LENGTH", "TokenVerifier"]

ALGORITHM = "EdDSA"
#: No token auth issues is near this long; longer ones are refused unread.
MAX_TOKEN_LENGTH = 4096
_REQUIRED = ["iss", "aud", "sub", "iat", "exp", "jti"]
_LEEWAY_S = 5.0  # clock skew between machines


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
