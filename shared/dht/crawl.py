"""Iterative lookups over kademlia's `SpiderCrawl`, bounded and dead-aware.

Changes from kademlia's crawls:

* the candidate heap drops ourselves and recently dead nodes
  (`LiveNodeHeap`), so a contact that just failed is not retried because a
  peer still lists it (bmuller/kademlia#98);
* a crawl runs at most `max_rounds` rounds, whatever peers reply;
* `ProviderCrawl` replaces `ValueSpiderCrawl`, which stops at the first
  value and keeps the "most common" one: it asks every one of the k closest
  nodes and returns the *union* of the records they hold. Choosing among
  them (verification, newest seq per node) is the caller's job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl
from kademlia.node import Node, NodeHeap

from shared.dht.protocol import DHTProtocol

__all__ = ["LiveNodeHeap", "NodeCrawl", "ProviderCrawl"]

log = structlog.get_logger(__name__)


class LiveNodeHeap(NodeHeap):
    """A `NodeHeap` that refuses nodes `accept` says not to contact."""

    def __init__(self, node: Node, maxsize: int, accept: Callable[[Node], bool]) -> None:
        super().__init__(node, maxsize)
        self._accept = accept

    def push(self, nodes: Node | list[Node]) -> None:
        if not isinstance(nodes, list):
            nodes = [nodes]
        super().push([node for node in nodes if self._accept(node)])


class _Bounded:
    """Shared set-up of our crawls: a live heap and a round budget."""

    protocol: DHTProtocol
    nearest: NodeHeap

    def _setup(self, protocol: DHTProtocol, node: Node, peers: list[Node], ksize: int, max_rounds: int) -> None:
        self.nearest = LiveNodeHeap(node, ksize, protocol.is_contactable)
        self.nearest.push(peers)
        self.rounds_left = max_rounds

    def _more_rounds(self) -> bool:
        if self.rounds_left <= 0 or self.nearest.have_contacted_all():
            return False
        self.rounds_left -= 1
        return True


class NodeCrawl(_Bounded, NodeSpiderCrawl):
    """Find the k closest nodes to a key that answer."""

    def __init__(
        self, protocol: DHTProtocol, node: Node, peers: list[Node], ksize: int, alpha: int, max_rounds: int
    ) -> None:
        NodeSpiderCrawl.__init__(self, protocol, node, [], ksize, alpha)
        self._setup(protocol, node, peers, ksize, max_rounds)

    async def find(self) -> list[Node]:
        """The closest nodes that answered (kademlia's `_nodes_found` recurses here)."""
        if not self._more_rounds():
            return [node for node in self.nearest if node.id in self.nearest.contacted]
        return await self._find(self.protocol.call_find_node)


class ProviderCrawl(_Bounded, SpiderCrawl):
    """Ask the k closest nodes to a key for their records; keep them all."""

    def __init__(
        self,
        protocol: DHTProtocol,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        max_rounds: int,
        max_blobs: int,
    ) -> None:
        SpiderCrawl.__init__(self, protocol, node, [], ksize, alpha)
        self._setup(protocol, node, peers, ksize, max_rounds)
        self.blobs: dict[bytes, None] = {}  # an ordered set: peers repeat records
        self.max_blobs = max_blobs

    async def find(self) -> list[bytes]:
        """Every distinct record blob the k closest nodes returned."""
        if not self._more_rounds():
            return list(self.blobs)
        return await self._find(self.protocol.call_find_value)

    async def _nodes_found(self, responses: dict[bytes, Any]) -> list[bytes]:
        failed = []
        for peer_id, (answered, reply) in responses.items():
            if not answered:
                failed.append(peer_id)
                continue
            blobs, nodes = reply
            self._keep(blobs)
            self.nearest.push([Node(*triple) for triple in nodes])
        self.nearest.remove(failed)
        return await self.find()

    def _keep(self, blobs: list[bytes]) -> None:
        for blob in blobs:
            if len(self.blobs) >= self.max_blobs:
                log.warning("dht.too_many_records", key=self.node.id.hex(), kept=self.max_blobs)
                return
            self.blobs[blob] = None
