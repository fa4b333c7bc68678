"""What one caller, and all callers together, may cost a server.

Every limit is documented in PROTOCOL.md (Limits) with its setting. Who
counts as one caller: a **public caller** is a CURVE key other than the mesh
client key, and is counted per key over all its connections, since opening
more connections must not buy more requests. Members all share the mesh key,
so they are not counted per key, only in the total; outsiders together are
held to a share of the total, so that callers minting fresh keys cannot crowd
the mesh's own traffic out.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import RateLimited, Unavailable
from shared.rpc.codec import MAX_DEPTH

__all__ = ["Limits", "Admission"]

#: Seconds a refused caller is told to wait: requests in flight end quickly.
RETRY_AFTER = 1


@dataclass(frozen=True, slots=True)
class Limits:
    """A server's limits beyond the message size cap (PROTOCOL.md, Limits)."""

    #: Containers nested at most this deep in a message, the envelope included.
    max_depth: int = MAX_DEPTH
    #: Items (elements, map entries, containers) in one message from a public caller.
    public_max_items: int = 16_384
    #: Requests in flight on the server, everyone's.
    max_in_flight: int = 4096
    #: Requests in flight from all public callers together.
    public_max_in_flight: int = 1024
    #: Requests in flight from one public key, over all its connections.
    peer_max_in_flight: int = 32
    #: Seconds a public caller's request may run, whatever deadline it asks for.
    public_max_timeout: float = 300.0
    #: Seconds a stream (or reply) may wait for its reader -- credit, or room in
    #: its queue -- before it is cut and its slot freed.
    stall_timeout: float = 30.0


class Admission:
    """Requests in flight, in total, from public callers, and per public key."""

    __slots__ = ("_limits", "total", "public", "_by_peer")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.total = 0
        self.public = 0
        self._by_peer: dict[str, int] = {}  #: public keys with requests in flight only

    def check(self, peer: str, member: bool) -> None:
        """Raise the typed refusal if one more request from `peer` is over a cap."""
        limits = self._limits
        if self.total >= limits.max_in_flight:
            raise Unavailable(f"server busy: {self.total} requests in flight",
                              {"retry_safe": True, "retry_after": RETRY_AFTER, "limit": limits.max_in_flight})
        if member:
            return
        if self.public >= limits.public_max_in_flight:
            raise Unavailable(f"server busy: {self.public} public requests in flight",
                              {"retry_safe": True, "retry_after": RETRY_AFTER,
                               "limit": limits.public_max_in_flight})
        if self._by_peer.get(peer, 0) >= limits.peer_max_in_flight:
            raise RateLimited(f"at most {limits.peer_max_in_flight} requests in flight per caller",
                              {"retry_safe": True, "retry_after": RETRY_AFTER,
                               "limit": limits.peer_max_in_flight})

    def enter(self, peer: str, member: bool) -> None:
        self.total += 1
        if not member:
            self.public += 1
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1

    def leave(self, peer: str, member: bool) -> None:
        self.total -= 1
        if not member:
            self.public -= 1
            left = self._by_peer.get(peer, 1) - 1
            if left:
                self._by_peer[peer] = left
            else:
                self._by_peer.pop(peer, None)  # a key that came and went costs nothing after

    @property
    def peers(self) -> int:
        """Public keys with at least one request in flight."""
        return len(self._by_peer)
