"""The web service's configuration, read once from the environment.

    INFERSWARM_WEB_HOST            address to listen on (127.0.0.1; 0.0.0.0 for every interface)
    INFERSWARM_WEB_PORT            HTTP port (8080; 0 = any free port, printed in the ready line)
    INFERSWARM_WEB_MAX_BODY        largest request body in bytes (1048576); larger is 413
    INFERSWARM_WEB_IDLE_TIMEOUT    seconds a connection may wait with no request under way: one
                                   that sends nothing, half a request head, or an idle keep-alive
                                   is closed after this (15)
    INFERSWARM_WEB_TLS_CERT / _KEY PEM files: serve HTTPS (cookies are then always `Secure`)
    INFERSWARM_WEB_SECURE_COOKIES  force `Secure` cookies behind a TLS-terminating proxy (false)
    INFERSWARM_WEB_TRUST_PROXY     one reverse proxy you run stands in front: take the client
                                   address and scheme from the right-most X-Forwarded-For and
                                   X-Forwarded-Proto values, the ones it appended (false)
    INFERSWARM_WEB_SECRET_FILE     the key signing CSRF tokens (default <data_dir>/web/secret.key);
                                   every web instance behind one load balancer must share it
    INFERSWARM_WEB_RPC_TIMEOUT     deadline of one RPC call to auth, gateway or metrics, s (10)
    INFERSWARM_WEB_INFER_TIMEOUT   deadline of one whole inference stream, s (300)
    INFERSWARM_DROP_PARAMS         drop OpenAI parameters we do not support instead of refusing
                                   them with a 400 (false; the reply names what it dropped)
    INFERSWARM_MAX_N               the most choices (`n`) one /v1 completion may ask for; each is
                                   its own gateway.infer call, billed and limited as such (8)
    INFERSWARM_WEB_CORS_ORIGINS    browser origins that may call /v1 (CORS), comma-separated and
                                   exact (`https://app.example.com`, `http://localhost:5173`), or
                                   `*` for any; none by default (services/web/cors.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.config import ConfigError, MeshConfig, env, port, positive

__all__ = ["WebConfig", "parse_origins"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(raw: str) -> str:
    """One origin as a browser writes it in `Origin`: `scheme://host[:port]`, lower case."""
    if raw == "*":
        return raw
    try:
        parts = urlsplit(raw)
        port_number = parts.port
    except ValueError:
        raise ValueError(f"{raw!r} is not an origin (scheme://host[:port])") from None
    if (parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"{raw!r} is not an origin: http(s)://host[:port], no path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown_port = "" if port_number in (None, _DEFAULT_PORTS[parts.scheme]) else f":{port_number}"
    return f"{parts.scheme}://{host}{shown_port}"


def parse_origins(raw: str) -> tuple[str, ...]:
    """Comma-separated origins (or `*`), normalized as browsers send them."""
    return tuple(_origin(item.strip().lower()) for item in raw.split(",") if item.strip())



@dataclass(frozen=True)
class WebConfig:
    """Everything the web process reads from its environment."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    host: str = env("INFERSWARM_WEB_HOST", default="127.0.0.1")
    port: int = env("INFERSWARM_WEB_PORT", default=8080, parse=port)
    max_body_bytes: int = env("INFERSWARM_WEB_MAX_BODY", default=1_048_576, parse=positive(int))
    idle_timeout: float = env("INFERSWARM_WEB_IDLE_TIMEOUT", default=15.0, parse=positive(float))
    tls_cert: Path | None = env("INFERSWARM_WEB_TLS_CERT", default=None)
    tls_key: Path | None = env("INFERSWARM_WEB_TLS_KEY", default=None)
    secure_cookies: bool = env("INFERSWARM_WEB_SECURE_COOKIES", default=False)
    trust_proxy: bool = env("INFERSWARM_WEB_TRUST_PROXY", default=False)
    secret_file: Path | None = env("INFERSWARM_WEB_SECRET_FILE", default=None)
    rpc_timeout: float = env("INFERSWARM_WEB_RPC_TIMEOUT", default=10.0, parse=positive(float))
    infer_timeout: float = env("INFERSWARM_WEB_INFER_TIMEOUT", default=300.0, parse=positive(float))
    drop_params: bool = env("INFERSWARM_DROP_PARAMS", default=False)
    max_n: int = env("INFERSWARM_MAX_N", default=8, parse=positive(int))
    cors_origins: tuple[str, ...] = env("INFERSWARM_WEB_CORS_ORIGINS", default=(), parse=parse_origins)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(["INFERSWARM_WEB_TLS_CERT and INFERSWARM_WEB_TLS_KEY: set both or neither"])

    @property
    def secret_path(self) -> Path:
        return self.secret_file or self.mesh.data_dir / "web" / "secret.key"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
