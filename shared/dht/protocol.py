"""The DHT's UDP protocol: kademlia's `KademliaProtocol`, hardened.

What changes from kademlia/rpcudp, and why:

* **Datagrams never raise.** rpcudp decodes with umsgpack inside unawaited
  tasks, so a malformed datagram raises where nobody listens. Here decoding
  (`wire.py`) has limits, and requests are dispatched synchronously through
  an explicit table of four methods whose arguments are type-checked; any
  other datagram is dropped with a debug log.
* **Outgoing calls are explicit** (`ping`, `store`, `find_node`,
  `find_value`); rpcudp's `__getattr__`, which turns any misspelt attribute
  into a remote call, is disabled.
* **Round trips are measured** (`rtt.py`): every reply is a sample, and
  `rtt.timeout` (`srtt + 4 rttvar` within `[rpc_timeout_min, rpc_timeout]`)
  is how long a lookup waits for a contact before moving on (`crawl.py`).
  A request itself stays open for `rpc_timeout` (rpcudp: a fixed 5 s), so a
  late reply still counts.
* **Dead nodes stay away** (bmuller/kademlia#98). A node that a lookup gave
  up on, or that did not answer at all, is remembered as recently dead for
  `dead_ttl`: it is left out of every crawl and every answer we give, and not
  re-added from other nodes' replies; one that stays silent for `rpc_timeout`
  also leaves the routing table. So an operation waits on it once, not on
  every call. Hearing from the node itself -- a late reply included -- clears
  the mark. `check_liveness` pings idle contacts, so dead ones leave every
  table within a few seconds.
* **Read-only nodes (BEP 43).** A client node (`DHTConfig.read_only`) marks
  its requests `ro`; the callee answers but neither adds it to its routing
  table nor hands it out, so a CLI that exits leaves no dead contact behind.
  A read-only node answers no requests itself.
* **One contact per address.** A node that speaks from an address the table
  already holds under another id replaces that contact: it is the same
  endpoint (a node restarted with a new key), or one endpoint posing as many
  nodes, which must not fill the table nor draw a liveness ping per id.
* **Each peer IP has a budget** (`budget.py`): bytes of replies per second,
  so the node can be neither flooded nor used to reflect large replies at a
  forged address; requests past it are dropped as if lost. Loopback is exempt.
* **Records are many per key and verified** (`rpc_store`, `rpc_find_value`);
  stored records are not forwarded to newly met nodes: they live seconds and
  their announcers re-announce to whichever nodes are closest by then.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from shared.dht.budget import PeerBudget
from shared.dht.config import DHTConfig
from shared.dht.record import InvalidRecord, RecordVerifier
from shared.dht.rtt import RttEstimator
from shared.dht.storage import RecordStore
from shared.dht.wire import (
    REQUEST,
    WireError,
    decode_datagram,
    encode_request,
    encode_response,
    is_node_id,
    node_list,
    request_parts,
    value_reply,
)

__all__ = ["DHTProtocol", "Address", "CallResult"]

log = structlog.get_logger(__name__)

Address = tuple[str, int]
#: `(answered, reply)`, as rpcudp calls resolve: `(False, None)` on timeout.
CallResult = tuple[bool, Any]

_MAX_DEAD = 4096  # remembered dead node ids; the oldest are forgotten first


@dataclass(slots=True)
class _Pending:
    """One request sent and not yet answered."""

    future: asyncio.Future[CallResult]
    timer: asyncio.TimerHandle
    address: Address
    sent: float  #: loop time


def _is_blob(value: Any) -> bool:
    return type(value) is bytes


#: method -> argument checks; nothing else is callable from the wire.
_SIGNATURES: dict[str, tuple[Callable[[Any], bool], ...]] = {
    "ping": (is_node_id,),
    "store": (is_node_id, is_node_id, _is_blob),
    "find_node": (is_node_id, is_node_id),
    "find_value": (is_node_id, is_node_id),
}


class DHTProtocol(KademliaProtocol):
    """Kademlia over UDP with signed multi-value records and dead-node memory."""

    def __init__(
        self, source_node: Node, storage: RecordStore, verifier: RecordVerifier, config: DHTConfig
    ) -> None:
        super().__init__(source_node, storage, config.ksize)
        self.config = config
        self.verifier = verifier
        self._wait_timeout = config.rpc_timeout
        self.rtt = RttEstimator(config.rpc_timeout_min, config.rpc_timeout)
        self._outstanding: dict[bytes, _Pending] = {}
        self._dead: dict[bytes, float] = {}
        self._last_seen: dict[bytes, float] = {}
        self._id_at: dict[Address, bytes] = {}  #: (ip, port) -> the id of the contact there
        self.budget = PeerBudget(rate=config.peer_bytes_per_s, burst=config.peer_burst,
                                 min_cost=config.peer_min_cost, exempt_loopback=config.peer_exempt_loopback)

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns unknown attributes into remote calls; we want typos to fail.
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- receiving ----------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:
        is_request = data[:1] == bytes([REQUEST])
        limit = self.config.max_request_size if is_request else self.config.max_response_size
        try:
            kind, msg_id, payload = decode_datagram(data, limit)
        except WireError as exc:
            log.debug("dht.datagram_dropped", peer=addr, reason=str(exc))
            return
        try:
            if kind == REQUEST:
                self._accept_request(msg_id, payload, addr)
            else:
                self._accept_response(msg_id, payload, addr)
        except Exception:  # a bug must cost one datagram, not the node
            log.exception("dht.datagram_failed", peer=addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dht.socket_error", error=str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        # Nobody will answer any more: release every waiting caller now.
        for pending in self._outstanding.values():
            pending.timer.cancel()
            if not pending.future.done():
                pending.future.set_result((False, None))
        self._outstanding.clear()

    def _accept_request(self, msg_id: bytes, payload: Any, addr: Address) -> None:
        if self.config.read_only:
            return  # BEP 43: a read-only node answers nobody (nobody should know it)
        parts = request_parts(payload)
        if parts is None:
            log.debug("dht.request_malformed", peer=addr)
            return
        method, args, read_only = parts
        checks = _SIGNATURES.get(method) if type(method) is str else None
        if checks is None:
            log.debug("dht.unknown_method", peer=addr, method=repr(method)[:40])
            return
        if len(args) != len(checks) or not all(check(arg) for check, arg in zip(checks, args)):
            log.debug("dht.bad_arguments", peer=addr, method=method)
            return
        if not self.budget.admit(addr[0]):
            log.debug("dht.peer_over_budget", peer=addr, method=method)
            return
        if not read_only:  # every request introduces its sender, but a client's
            self._heard_from(Node(args[0], addr[0], addr[1]))
        result = getattr(self, f"rpc_{method}")(addr, *args)
        response = encode_response(msg_id, result)
        if len(response) > self.config.max_response_size:
            log.warning("dht.response_too_large", method=method, size=len(response))
            return
        if not self.budget.pay_reply(addr[0], len(response)):
            log.debug("dht.peer_over_budget", peer=addr, method=method, size=len(response))
            return
        self._send(response, addr)

    def _accept_response(self, msg_id: bytes, payload: Any, addr: Address) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None or tuple(pending.address[:2]) != tuple(addr[:2]):
            log.debug("dht.unexpected_response", peer=addr)
            return
        del self._outstanding[msg_id]
        pending.timer.cancel()
        self.rtt.sample(asyncio.get_running_loop().time() - pending.sent)
        if not pending.future.done():
            pending.future.set_result((True, payload))

    # -- handlers (reached only through _SIGNATURES) --------------------------

    def rpc_ping(self, sender: Address, nodeid: bytes) -> bytes:
        node_id: bytes = self.source_node.id
        return node_id

    def rpc_store(self, sender: Address, nodeid: bytes, key: bytes, value: bytes) -> bool:
        try:
            record = self.verifier.verify(value, key=key)
        except InvalidRecord as exc:
            log.info("dht.store_rejected", peer=sender, reason=exc.reason)
            return False
        stored: bool = self.storage.put(key, record, self.verifier.lifetime(record))
        return stored

    def rpc_find_node(self, sender: Address, nodeid: bytes, key: bytes) -> list[list[Any]]:
        neighbours = self.neighbours(Node(key), exclude=(sender[0], sender[1]))
        return [[node.id, node.ip, node.port] for node in neighbours]

    def rpc_find_value(self, sender: Address, nodeid: bytes, key: bytes) -> dict[str, list[Any]]:
        nodes = self.rpc_find_node(sender, nodeid, key)
        # Newest first, and only as many as fit in one reply datagram.
        budget = self.config.max_response_size - 64 - sum(len(n[0]) + len(n[1]) + 8 for n in nodes)
        blobs = []
        for blob in self.storage.get(key):
            budget -= len(blob) + 5
            if budget < 0:
                break
            blobs.append(blob)
        return {"v": blobs, "n": nodes}

    # -- calling --------------------------------------------------------------

    def ping(self, address: Address, nodeid: bytes) -> asyncio.Future[CallResult]:
        return self._call(address, "ping", nodeid)

    def store(self, address: Address, nodeid: bytes, key: bytes, value: bytes) -> asyncio.Future[CallResult]:
        return self._call(address, "store", nodeid, key, value)

    def find_node(self, address: Address, nodeid: bytes, key: bytes) -> asyncio.Future[CallResult]:
        return self._call(address, "find_node", nodeid, key)

    def find_value(self, address: Address, nodeid: bytes, key: bytes) -> asyncio.Future[CallResult]:
        return self._call(address, "find_value", nodeid, key)

    async def call_ping(self, node_to_ask: Node) -> CallResult:
        answered, reply = await self.ping((node_to_ask.ip, node_to_ask.port), self.source_node.id)
        # Another node answering at that address means ours is gone from it.
        return self.handle_call_response((answered and reply == node_to_ask.id, reply), node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> CallResult:
        answered, reply = await self.store((node_to_ask.ip, node_to_ask.port), self.source_node.id, key, value)
        return self.handle_call_response((answered, reply is True), node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> CallResult:
        address = (node_to_ask.ip, node_to_ask.port)
        answered, reply = await self.find_node(address, self.source_node.id, node_to_find.id)
        nodes = node_list(reply, self.config.ksize) if answered else None
        return self.handle_call_response((answered, nodes), node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> CallResult:
        address = (node_to_ask.ip, node_to_ask.port)
        answered, reply = await self.find_value(address, self.source_node.id, node_to_find.id)
        found = value_reply(reply, self.config.ksize, self.config.max_record_size) if answered else None
        return self.handle_call_response((answered, found), node_to_ask)

    def handle_call_response(self, result: CallResult, node: Node) -> CallResult:
        """Welcome a node that answered; forget (and remember as dead) one that did not."""
        if result[0]:
            self._heard_from(node)
        else:
            log.info("dht.peer_unresponsive", peer=str(node))
            self.mark_dead(node)
            self.router.remove_contact(node)
        return result

    def _call(self, address: Address, method: str, *args: Any) -> asyncio.Future[CallResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CallResult] = loop.create_future()
        if self.transport is None or self.transport.is_closing():
            future.set_result((False, None))
            return future
        msg_id = os.urandom(20)
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = _Pending(future, timer, address, loop.time())
        data = encode_request(msg_id, method, list(args), read_only=self.config.read_only)
        self._send(data, address)
        return future

    def _send(self, data: bytes, address: Address) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, address)

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result((False, None))

    # -- routing-table upkeep -------------------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """Add (or refresh) a contact, unless it is us or recently dead; it
        replaces the contact of another id at the same address."""
        if node.id == self.source_node.id or self.is_dead(node.id):
            return
        address = (node.ip, node.port)
        previous = self._id_at.get(address)
        if previous is not None and previous != node.id:
            self.router.remove_contact(Node(previous))
            self._last_seen.pop(previous, None)
        self._id_at[address] = node.id
        self.router.add_contact(node)

    def is_contactable(self, node: Node) -> bool:
        """May a crawl contact `node`? Not ourselves, not a recently dead node."""
        return node.id != self.source_node.id and node.ip is not None and not self.is_dead(node.id)

    def neighbours(self, target: Node, exclude: Address | None = None) -> list[Node]:
        """The k closest live contacts to `target` (never a recently dead one), without `exclude`."""
        k = self.config.ksize
        found = self.router.find_neighbors(target, k=2 * k)
        return [node for node in found
                if not self.is_dead(node.id) and (node.ip, node.port) != exclude][:k]

    def is_dead(self, node_id: bytes) -> bool:
        """True while `node_id` failed to answer less than `dead_ttl` ago."""
        since = self._dead.get(node_id)
        if since is None:
            return False
        if time.monotonic() - since < self.config.dead_ttl:
            return True
        del self._dead[node_id]
        return False

    def mark_dead(self, node: Node) -> None:
        """Remember that `node` did not answer."""
        self._dead.pop(node.id, None)
        self._dead[node.id] = time.monotonic()
        while len(self._dead) > _MAX_DEAD:
            del self._dead[next(iter(self._dead))]

    def contacts(self) -> list[Node]:
        """Every node of the routing table."""
        return [node for bucket in self.router.buckets for node in bucket.get_nodes()]

    async def check_liveness(self) -> int:
        """Ping the contacts not heard from for `ping_interval`; returns how many failed."""
        now = time.monotonic()
        contacts = self.contacts()
        idle = [n for n in contacts if now - self._last_seen.get(n.id, -1e9) >= self.config.ping_interval]
        idle.sort(key=lambda n: self._last_seen.get(n.id, -1e9))
        results = await asyncio.gather(*(self.call_ping(n) for n in idle[: self.config.max_pings]))
        self._prune({node_id for bucket in self.router.buckets
                     for node_id in (*bucket.nodes, *bucket.replacement_nodes)})
        return sum(1 for answered, _ in results if not answered)

    def _heard_from(self, node: Node) -> None:
        if node.id == self.source_node.id:
            return
        self._dead.pop(node.id, None)
        self._last_seen[node.id] = time.monotonic()
        self.welcome_if_new(node)

    def _prune(self, known: set[bytes]) -> None:
        for node_id in [i for i in self._last_seen if i not in known]:
            del self._last_seen[node_id]
        for address in [a for a, node_id in self._id_at.items() if node_id not in known]:
            del self._id_at[address]
        for node_id in list(self._dead):
            self.is_dead(node_id)  # drops the mark once dead_ttl has passed
