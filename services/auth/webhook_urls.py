"""Where a webhook may point: the URL's shape, and addresses on the public internet only.

A webhook makes auth send requests to a URL its user chose: without a check,
anyone could make auth reach what only it can reach -- the database, the
mesh's services, a cloud's metadata endpoint (169.254.169.254) -- a
server-side request forgery. So a URL is http or https, at most 2048
characters, without credentials, and its host must resolve to global
addresses only: private (10/8, 172.16/12, 192.168/16, fc00::/7), loopback,
link-local (169.254/16, fe80::/10), shared (100.64/10), multicast, reserved
and unspecified ones are refused, an IPv4-mapped IPv6 address as its IPv4.

Checked when the URL is set, and again at every delivery: `PublicResolver`
is the resolver of the sender's HTTP client, so the address connected to is
the address checked (a name that resolved to a public address when it was set
and to 127.0.0.1 since -- DNS rebinding -- is refused then). Redirects are not
followed. `INFERSWARM_WEBHOOK_ALLOW_PRIVATE=true` lifts the address check (a
test, or receivers on a private network).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from shared.errors import InvalidParams

__all__ = ["MAX_URL", "PublicResolver", "RefusedAddress", "check_destination", "check_url", "is_public"]

MAX_URL = 2048


class RefusedAddress(OSError):
    """A webhook's host is (or resolves to) an address it may not reach."""


def check_url(url: Any) -> str:
    """An http(s) URL with a host, no credentials, at most 2048 characters; `INVALID_PARAMS` naming `url`."""
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL or not url.isprintable() or " " in url:
        raise InvalidParams(f"url must be an http or https URL of at most {MAX_URL} characters", {"param": "url"})
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  -- raises for a port that is not a number
    except ValueError:
        raise InvalidParams("url is not a valid URL", {"param": "url"}) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParams("url must start with https:// or http:// and name a host", {"param": "url"})
    if parts.username is not None or parts.password is not None:
        raise InvalidParams("url must not carry credentials: authenticate the signature instead",
                            {"param": "url"})
    return url


def is_public(address: str) -> bool:
    """Whether an address is a global unicast one (an IPv4-mapped IPv6 address judged as its IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_destination(url: str, allow_private: bool) -> None:
    """Refuse (`INVALID_PARAMS`, `url`) a URL whose host is, or resolves to, a non-public address."""
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    try:
        addresses = await _resolve(host)
    except OSError:
        raise InvalidParams("url: its host does not resolve", {"param": "url"}) from None
    if not addresses or not all(is_public(a) for a in addresses):
        raise InvalidParams("url must reach a public address: private, loopback and link-local ones are refused",
                            {"param": "url", "reason": "address"})


async def _resolve(host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class PublicResolver(AbstractResolver):
    """aiohttp's resolver for webhooks: the addresses of a name, refused unless all are public."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results or not all(is_public(r["host"]) for r in results):
            raise RefusedAddress(f"{host} resolves to an address webhooks may not reach")
        return results

    async def close(self) -> None:
        await self._inner.close()
