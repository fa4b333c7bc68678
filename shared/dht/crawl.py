"""Iterative lookups, driven by answers as they arrive.

kademlia's `SpiderCrawl` works in rounds: it asks `alpha` contacts and waits
for all of them, so one dead contact stalls the whole round for a full RPC
timeout, and a routing table of dead contacts costs seconds. A `Crawl`
instead keeps up to `parallel` queries in flight and sends the next one as
soon as any query ends:

* it asks the closest contacts it knows, closest first, and learns closer
  ones from each answer;
* a contact that has not answered within the measured round trip
  (`protocol.rtt.timeout`, see `rtt.py`) is *given up on*: its slot goes to
  the next contact, it no longer counts among the closest, and the protocol
  marks it dead, so other crawls and the answers this node gives leave it
  out too -- until it replies again. Its request stays open: if the answer
  comes while the crawl still runs, it is used like any other;
* the crawl ends once the `ksize` closest contacts not given up on have all
  answered, when there is no one left to ask, or at its deadline -- with what
  it has by then. It never ends on an empty answer while a request is still
  open: a lookup that gave up on everyone waits for the first late reply, and
  a record lookup that found no record yet waits for every late reply (on a
  loaded machine the holders may be the contacts given up on; a topic with
  no provider then costs up to one RPC timeout when some contact is slow).

Two uses: `crawl_nodes` (the k closest answering nodes, to store on) and
`crawl_records` (the union of the records the k closest nodes hold; choosing
among them -- verification, newest per node -- is the caller's job).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from kademlia.node import Node

from shared.dht.protocol import CallResult, DHTProtocol

__all__ = ["Crawl", "crawl_nodes", "crawl_records"]

log = structlog.get_logger(__name__)

Ask = Callable[[Node], Awaitable[CallResult]]
#: What an answer teaches: the contacts it names.
Learn = Callable[[Node, Any], Iterable[tuple[bytes, str, int]]]


class Crawl:
    """One lookup of `target` from `peers` (see the module doc)."""

    def __init__(
        self, protocol: DHTProtocol, target: Node, peers: Iterable[Node], *,
        ksize: int, parallel: int, deadline: float | None = None,
    ) -> None:
        self._protocol = protocol
        self._target = target
        self._ksize = ksize
        self._parallel = max(1, parallel)
        self._deadline = deadline  #: loop time; None = no deadline
        self._known: dict[bytes, Node] = {}
        self._asked: set[bytes] = set()
        self._answered: set[bytes] = set()
        self._failed: set[bytes] = set()
        self.queries = 0
        self._meet(peers)

    def _meet(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            if node.id not in self._known and self._protocol.is_contactable(node):
                self._known[node.id] = node

    def _closest(self) -> list[Node]:
        """The `ksize` closest contacts not given up on."""
        candidates = (node for node in self._known.values() if node.id not in self._failed)
        return heapq.nsmallest(self._ksize, candidates, key=self._target.distance_to)

    async def run(self, ask: Ask, learn: Learn, enough: Callable[[], bool] | None = None) -> list[Node]:
        """Crawl; the closest contacts that answered, nearest first.

        `enough` (when given) says whether what was learnt answers the lookup:
        a crawl that would end without it waits for the late replies still
        open (each bounded by the protocol's RPC timeout) before it gives up --
        under load the contacts given up on may be the very ones that hold the
        answer. Requests still open when it ends are left to finish on their
        own (the protocol then keeps the routing table right), never cancelled.
        """
        loop = asyncio.get_running_loop()
        flying: dict[asyncio.Future[CallResult], tuple[Node, float]] = {}  #: -> (node, when to give up)
        while True:
            closest = self._closest()
            waiting = [node for node in closest if node.id not in self._answered]
            active = sum(1 for node, _ in flying.values() if node.id not in self._failed)
            for node in waiting:
                if active >= self._parallel:
                    break
                if node.id not in self._asked:
                    self._asked.add(node.id)
                    self.queries += 1
                    future: asyncio.Future[tuple[bool, Any]] = asyncio.ensure_future(ask(node))
                    flying[future] = (node, loop.time() + self._protocol.rtt.timeout)
                    active += 1
            if not flying or (not waiting and self._answered and (enough is None or enough())):
                break
            now = loop.time()
            wake = min(give_up for node, give_up in flying.values() if node.id not in self._failed) \
                if active else float("inf")
            if self._deadline is not None:
                if now >= self._deadline:
                    break
                wake = min(wake, self._deadline)
            done, _ = await asyncio.wait(flying, timeout=None if wake == float("inf") else max(0.0, wake - now),
                                         return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                node, _ = flying.pop(future)
                answered, reply = future.result()
                if answered:
                    self._failed.discard(node.id)
                    self._answered.add(node.id)
                    self._meet(Node(*triple) for triple in learn(node, reply))
                else:
                    self._failed.add(node.id)
            now = loop.time()
            for node, give_up in flying.values():
                if give_up <= now and node.id not in self._failed:
                    self._failed.add(node.id)
                    self._protocol.mark_dead(node)  # out of other crawls and of our answers, until it replies
        return [node for node in self._closest() if node.id in self._answered]


async def crawl_nodes(
    protocol: DHTProtocol, target: Node, peers: list[Node], *, ksize: int, parallel: int,
    deadline: float | None = None,
) -> list[Node]:
    """The k closest nodes to `target` that answer, nearest first."""
    crawl = Crawl(protocol, target, peers, ksize=ksize, parallel=parallel, deadline=deadline)
    return await crawl.run(lambda node: protocol.call_find_node(node, target), lambda _, nodes: nodes)


async def crawl_records(
    protocol: DHTProtocol, target: Node, peers: list[Node], *, ksize: int, parallel: int,
    max_blobs: int, deadline: float | None = None,
) -> list[bytes]:
    """Every distinct record blob the k closest nodes to `target` hold (at most `max_blobs`)."""
    blobs: dict[bytes, None] = {}

    def learn(node: Node, reply: tuple[list[bytes], list[tuple[bytes, str, int]]]) -> list[tuple[bytes, str, int]]:
        found, nodes = reply
        for blob in found:
            if len(blobs) >= max_blobs:
                log.warning("dht.too_many_records", key=target.id.hex(), kept=max_blobs)
                break
            blobs[blob] = None
        return nodes

    crawl = Crawl(protocol, target, peers, ksize=ksize, parallel=parallel, deadline=deadline)
    await crawl.run(lambda node: protocol.call_find_value(node, target), learn, lambda: bool(blobs))
    return list(blobs)
