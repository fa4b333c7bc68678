"""Every size and timing of the DHT, in one frozen dataclass.

Defaults suit a real mesh; tests shrink the timings (TTLs of a second or two,
RPC timeouts of a few hundred milliseconds). All durations are in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["DHTConfig"]


@dataclass(frozen=True, slots=True)
class DHTConfig:
    """Sizes and timings of a `KademliaDiscovery` node."""

    ksize: int = 20  #: k: replication factor and bucket size
    alpha: int = 3  #: lookups sent in parallel per crawl round
    max_crawl_rounds: int = 8  #: a crawl stops after this many rounds regardless
    ttl: float = 30.0  #: default lifetime of an announced record
    max_ttl: float = 300.0  #: longest ttl a record may carry
    clock_skew: float = 5.0  #: wall-clock disagreement tolerated on seq/expiry
    tombstone_ttl: float | None = None  #: how long a withdrawal blocks replays; None = max_ttl + clock_skew
    rpc_timeout: float = 1.0  #: longest wait for one UDP reply (the adaptive wait's ceiling)
    rpc_timeout_min: float = 0.005  #: shortest adaptive wait of a lookup's query (its floor)
    ping_interval: float = 5.0  #: liveness check of routing-table contacts
    dead_ttl: float = 15.0  #: a node that failed is neither re-added nor contacted for this long
    cache_ttl: float = 1.0  #: lookups are cached this long (0 = no cache)
    #: ... and after that, answered from the cache while one crawl refreshes them in the background,
    #: until this much older (0 = every lookup after `cache_ttl` waits for its crawl)
    cache_stale: float = 15.0
    cache_size: int = 1024  #: topics kept in the lookup cache
    backoff_initial: float = 0.5  #: first delay before retrying a failed bootstrap
    backoff_max: float = 30.0  #: longest delay between bootstrap retries
    resolve_timeout: float = 5.0  #: resolving one seed hostname
    save_interval: float = 60.0  #: how often the neighbours file is rewritten
    max_topics: int = 4096  #: topic keys a node stores for others
    max_records_per_topic: int = 64  #: records (tombstones included) per topic key
    max_record_size: int = 2048  #: bytes of one signed record blob
    max_request_size: int = 8192  #: bytes of an incoming request datagram
    max_response_size: int = 60000  #: bytes of a reply datagram (UDP allows 65507)
    max_pings: int = 64  #: contacts pinged per liveness round
    peer_bytes_per_s: float = 1_000_000.0  #: reply bytes per second one peer IP may be sent (0 = no limit)
    peer_burst: float = 4_000_000.0  #: ... and at once, after a quiet spell
    peer_min_cost: int = 512  #: bytes every request costs, whatever its reply
    peer_exempt_loopback: bool = True  #: processes of this host are not limited
    read_only: bool = False  #: a client node (BEP 43): asks, never answers, enters no routing table

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is not None and not value >= 0:
                raise ValueError(f"DHTConfig.{spec.name} must be >= 0, got {value!r}")
        if self.ksize < 1 or self.alpha < 1 or self.max_crawl_rounds < 1:
            raise ValueError("DHTConfig: ksize, alpha and max_crawl_rounds must be >= 1")
        if not 0 < self.ttl <= self.max_ttl:
            raise ValueError("DHTConfig: ttl must be within (0, max_ttl]")
        if self.rpc_timeout <= 0 or self.ping_interval <= 0:
            raise ValueError("DHTConfig: rpc_timeout and ping_interval must be > 0")
        if not 0 < self.rpc_timeout_min <= self.rpc_timeout:
            raise ValueError("DHTConfig: rpc_timeout_min must be within (0, rpc_timeout]")
        if self.peer_bytes_per_s and self.peer_burst < self.max_response_size:
            raise ValueError("DHTConfig: peer_burst must hold at least one reply of max_response_size")

    @property
    def tombstone_lifetime(self) -> float:
        """A withdrawal outlives any older record it may have to block."""
        if self.tombstone_ttl is not None:
            return self.tombstone_ttl
        return self.max_ttl + self.clock_skew
