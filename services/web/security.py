"""Security headers, session and CSRF cookies, the client's address.

* **Headers** on every response (pages, API, errors, streams): a CSP that
  allows scripts, styles and images from this origin only (no inline script,
  no inline style), no framing, no MIME sniffing, no referrer to other sites
  (`same-origin`: with `no-referrer` browsers send `Origin: null` on form
  posts, defeating the origin check below), and HSTS when served over TLS. Pages and API replies are `Cache-Control: no-store`.
* **Session**: the JWT from `auth.login` in an HttpOnly, SameSite=Strict cookie,
  `Secure` over TLS; verified locally with auth's public key.
* **CSRF**: a random HttpOnly cookie per browser; each form carries
  HMAC(secret, cookie) and a POST is refused (403) unless the field matches the
  cookie (a cross-site page can neither read the cookie nor forge the MAC) and
  any `Origin` header is this site's. The REST and /v1 APIs take no cookies --
  only `Authorization` and `X-API-Key` headers -- so they need no CSRF token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path

from aiohttp import web

from shared.errors import Forbidden
from shared.identity import write_private_file

__all__ = [
    "SESSION_COOKIE",
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "CSP",
    "SECURITY_HEADERS",
    "load_or_create_secret",
    "add_security_headers",
    "is_secure",
    "client_addr",
    "set_session",
    "clear_session",
    "Csrf",
]

SESSION_COOKIE = "inferswarm_session"
CSRF_COOKIE = "inferswarm_csrf"
CSRF_FIELD = "csrf_token"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
TRUST_PROXY = web.AppKey("trust_proxy", bool)
_NONCE = web.RequestKey("csrf_nonce", str)
_NEW_NONCE = web.RequestKey("csrf_new_nonce", str)
FORCE_SECURE = web.AppKey("force_secure", bool)


def load_or_create_secret(path: Path) -> bytes:
    """32 random bytes kept in `path` (0600), created on first start."""
    if path.exists():
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"{path}: a secret of at least 32 bytes is required")
        return secret
    secret = secrets.token_bytes(32)
    write_private_file(path, secret)
    return secret


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: runs for every reply, streamed ones included."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Server"] = "inferswarm"  # not aiohttp's version string
    if is_secure(request):
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


def _from_proxy(request: web.Request, header: str) -> str:
    """The right-most value of a forwarding header: the one our proxy wrote.

    With `TRUST_PROXY`, one reverse proxy stands in front of web and appends
    what it saw to `X-Forwarded-For`/`-Proto`; everything left of that came
    from the client, who can write anything there (e.g. a fresh address per
    login attempt, to escape the throttle)."""
    return request.headers.get(header, "").split(",")[-1].strip()


def is_secure(request: web.Request) -> bool:
    """Served over TLS here, or (when trusted) at the proxy, or forced by config."""
    if request.app.get(FORCE_SECURE, False) or request.secure:
        return True
    if request.app.get(TRUST_PROXY, False):
        return _from_proxy(request, "X-Forwarded-Proto") == "https"
    return False


def client_addr(request: web.Request) -> str:
    """The HTTP client's address, for login throttling (X-Forwarded-For only when trusted)."""
    if request.app.get(TRUST_PROXY, False):
        forwarded = _from_proxy(request, "X-Forwarded-For")
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            pass  # not an address: the proxy did not write it, so trust the socket
    return (request.remote or "unknown")[:64]


def _cookie(response: web.StreamResponse, request: web.Request, name: str, value: str,
            max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Strict",
                        secure=is_secure(request))


def set_session(response: web.StreamResponse, request: web.Request, token: str, expires_at: float,
                now: float) -> None:
    """Store the session token; the cookie expires with the token."""
    _cookie(response, request, SESSION_COOKIE, token, max(1, int(expires_at - now)))


def clear_session(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(SESSION_COOKIE, path="/", secure=is_secure(request), httponly=True,
                        samesite="Strict")


class Csrf:
    """Form tokens bound to a per-browser cookie by an HMAC under the server's secret."""

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"inferswarm-web-csrf\0" + secret).digest()

    def _mac(self, nonce: str) -> str:
        digest = hmac.new(self._key, nonce.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def token(self, request: web.Request) -> str:
        """The token for this browser's forms (a new cookie nonce is made if needed)."""
        nonce = request.get(_NONCE) or request.cookies.get(CSRF_COOKIE) or ""
        if not 20 <= len(nonce) <= 64:
            nonce = secrets.token_urlsafe(24)
            request[_NEW_NONCE] = nonce
        request[_NONCE] = nonce
        return self._mac(nonce)

    def set_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        """Send the nonce cookie if `token()` made a new one for this request."""
        nonce = request.get(_NEW_NONCE)
        if nonce:
            _cookie(response, request, CSRF_COOKIE, nonce, None)

    def check(self, request: web.Request, submitted: str | None) -> None:
        """`Forbidden` unless the form's token matches this browser's cookie and origin."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}" and \
                origin != f"{'https' if is_secure(request) else 'http'}://{request.host}":
            raise Forbidden("cross-site form submission refused")
        nonce = request.cookies.get(CSRF_COOKIE, "")
        if not nonce or not submitted or not hmac.compare_digest(self._mac(nonce), submitted):
            raise Forbidden("the form expired or did not come from this site; reload and try again")
