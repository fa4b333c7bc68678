"""kademlia's `Server`, fitted to many signed records per key.

Kept from `Server`: listening, the routing-table refresh timer, bootstrap
pings, `bootstrappable_neighbors`, `stop`. Replaced:

* `get`/`set` (one value per key) by `store_record` / `find_records`;
* the hourly refresh no longer republishes stored keys: records live seconds
  and their own announcers re-announce them;
* bootstrap and refresh use our answer-driven, dead-aware crawls
  (`crawl.py`), and a bootstrap reply that is not a node id is treated as no
  reply; a read-only node's bootstrap only pings its seeds (its first lookup
  crawls anyway, and no one needs to know it);
* the pickle-based `save_state`/`load_state` are unused (the neighbours file
  is JSON, see `bootstrap.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

from kademlia.network import Server
from kademlia.node import Node

from shared.dht.config import DHTConfig
from shared.dht.crawl import crawl_nodes, crawl_records
from shared.dht.protocol import Address, DHTProtocol
from shared.dht.record import Record, RecordVerifier
from shared.dht.storage import RecordStore
from shared.dht.wire import is_node_id

__all__ = ["DHTServer"]


class DHTServer(Server):
    """One DHT node: routing table, storage and crawls, without policy."""

    protocol_class = DHTProtocol
    protocol: DHTProtocol
    storage: RecordStore

    def __init__(self, node_id: bytes, verifier: RecordVerifier, config: DHTConfig) -> None:
        storage = RecordStore(
            max_topics=config.max_topics,
            max_records=config.max_records_per_topic,
            tombstone_ttl=config.tombstone_lifetime,
        )
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id)
        # Not passed to Server: it tests `storage or ForgetfulStorage()`, and an
        # empty RecordStore is falsy.
        self.storage = storage
        self.config = config
        self.verifier = verifier

    def _create_protocol(self) -> DHTProtocol:
        return DHTProtocol(self.node, self.storage, self.verifier, self.config)

    @property
    def address(self) -> Address:
        """The bound `(ip, port)`."""
        sockname: Address = self.transport.get_extra_info("sockname")[:2]
        return sockname

    def has_contacts(self) -> bool:
        """True while the routing table holds at least one node."""
        return any(len(bucket) for bucket in self.protocol.router.buckets)

    async def crawl_nodes(self, target: Node, deadline: float | None = None) -> list[Node]:
        """The k closest answering nodes to `target`, ourselves excluded (`alpha` queries at a time)."""
        peers = self.protocol.neighbours(target)
        if not peers:
            return []
        return await crawl_nodes(self.protocol, target, peers, ksize=self.ksize, parallel=self.alpha,
                                 deadline=deadline)

    async def store_record(self, dkey: bytes, record: Record) -> int:
        """Store a verified record on the k closest nodes; how many accepted it.

        Stored here too when this node is among the k closest (or alone).
        """
        target = Node(dkey)
        nodes = await self.crawl_nodes(target)
        stored = 0
        farthest = max((node.distance_to(target) for node in nodes), default=0)
        if len(nodes) < self.ksize or self.node.distance_to(target) < farthest:
            stored += self.storage.put(dkey, record, self.verifier.lifetime(record))
        replies = await asyncio.gather(*(self.protocol.call_store(n, dkey, record.blob) for n in nodes))
        return stored + sum(1 for answered, accepted in replies if answered and accepted)

    async def find_records(self, dkey: bytes, deadline: float | None = None) -> list[bytes]:
        """Every record blob held here or by the k closest nodes (unverified).

        All k closest are asked at once: each of them is asked anyway, and one
        wave of queries is faster than k/alpha of them. With a `deadline`
        (loop time), what was found by then.
        """
        local = self.storage.get(dkey)
        target = Node(dkey)
        peers = self.protocol.neighbours(target)
        if not peers:
            return local
        found = await crawl_records(self.protocol, target, peers, ksize=self.ksize, parallel=self.ksize,
                                    max_blobs=4 * self.config.max_records_per_topic, deadline=deadline)
        return local + found

    async def bootstrap(self, addrs: list[Address]) -> list[Node]:
        """Ping `addrs`, then (unless read-only) crawl for our own id; the nodes found."""
        answered = await asyncio.gather(*(self.bootstrap_node(addr) for addr in addrs))
        seeds = [node for node in answered if node is not None and node.id != self.node.id]
        if not seeds or self.config.read_only:
            return seeds
        return await crawl_nodes(self.protocol, self.node, seeds, ksize=self.ksize, parallel=self.alpha)

    async def bootstrap_node(self, addr: Address) -> Node | None:
        answered, reply = await self.protocol.ping(addr, self.node.id)
        if not (answered and is_node_id(reply)) or reply == self.node.id:
            return None
        node = Node(reply, addr[0], addr[1])
        # A direct answer proves it alive, even if it was marked dead before
        # (a seed that restarted with the same identity).
        self.protocol.handle_call_response((True, reply), node)
        return node

    async def _refresh_table(self) -> None:
        # Refresh lonely buckets only; no republish (see the module docstring).
        ids = self.protocol.get_refresh_ids()
        await asyncio.gather(*(self.crawl_nodes(Node(node_id)) for node_id in ids))

    async def get(self, key: Any) -> NoReturn:
        raise NotImplementedError("one value per key does not fit topics: use find_records")

    async def set(self, key: Any, value: Any) -> NoReturn:
        raise NotImplementedError("one value per key does not fit topics: use store_record")

    async def set_digest(self, dkey: bytes, value: Any) -> NoReturn:
        raise NotImplementedError("one value per key does not fit topics: use store_record")
