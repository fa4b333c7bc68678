"""One `gateway.infer` call, owned by one object from its arrival to its record.

    request = Request(parts, model, deadline)        # GatewayService.infer
    try:
        chunk = await request.start(api_key, token, generation)
        while chunk is not None:
            yield chunk
            chunk = await request.next()
    finally:
        await request.end()

Read top to bottom, in the order things happen:

1. **identify** the caller: an API key or a session token (callers.py). A
   failure is counted, nothing else: there is nobody to bill. A key with a
   model allow-list is refused a model outside it here (`FORBIDDEN` naming
   `model`), before anything is routed or held.
2. **check** the parameters with the workers' rules (checks.py), **route**
   (router.py) to the first model of the request's chain whose workers can
   take it now: the chain is an alias's, or the model named (`default`: the
   operator's default model) then the operator's fallback models
   (routing_settings.py); `NOT_FOUND` if nobody serves any of them.
3. **wait for a slot** toward workers (dispatch.py): at once unless the
   gateway is full, then by the caller's priority.
4. **price** (the model's price at the request's start, spend.py) and
   **admit** (hold quota of every scope -- key, user, organisation -- and the
   worst-case cost of every budget, quota/: `RATE_LIMITED` with
   `retry_after`). A refusal is recorded (a usage record with its status) and
   counted. Admitted: an `A` journal entry (accounts.py), so that a crash from
   here on is still billed and its leases settled on restart.
5. **relay**: a worker's stream (relay.py, which tries the model's other
   workers before the first chunk); its chunks are passed on as they come, the
   first with the request's id, the model routed to and, for a stream, the
   rate-limit facts as admitted (what an HTTP reply's headers need).
   When every worker of the model fails before the first chunk in a way that
   is the model's (fallback.py: down, an upstream's 429, its first-token
   time, a context too small), the request **falls back** to the chain's
   next model after a jittered backoff: what the failed model held is given
   back, and the next model is priced and admitted (step 4) -- limits and
   price are those of the model that serves. `fallback: false` keeps the
   chain's first model only.
6. **settle** however it ends. A request a worker took -- its stream opened,
   or the caller's deadline passed or the caller left while a worker had it
   -- keeps its request counts and the tokens used: after text was delivered,
   the prompt (`prompt_tokens` of the first text chunk) and the text chunks
   delivered. A request no worker took releases everything.
7. **record** the one usage record (a `D` entry): on success before the
   final chunk is sent, otherwise when the request ends. A success's final
   chunk (and an embedding's answer) carries its signed `receipt`
   (shared/receipts.py: request id, model, tokens, cost, start, user, signer).
   The record names the model that served (`model`), the name asked when it
   differs (`asked`), and the models that failed first (`tried`: auth keeps
   a request that failed after all of them as a dead letter).
8. **count** (counts.py), once.

**State.** This object is the only writer of its request's state: the
caller, the admission, the worker that took it, the chunks delivered, the
prompt's tokens, the outcome. Collaborators get values and give values back;
the relay reports a worker taking the work through `took`. The upstream is a
plain object closed once, in `end`: no generator is nested in another, so a
request dropped while it streams is settled once and never closed twice.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

from collections.abc import Iterator
from contextlib import contextmanager

from decimal import Decimal

from shared.dht import Provider
from shared.errors import Forbidden, MeshError, NotFound, RateLimited
from shared.logging import bind_request_id, get_logger
from shared.generation import is_final, output_of
from shared.receipts import Signer, sign
from services.gateway.accounts import Accounts, safe_model
from services.gateway.callers import Caller, Callers
from services.gateway.checks import Checked, Limits, check_capabilities, check_embedding, check_request
from services.gateway.counts import Counts
from services.gateway.dispatch import Dispatch
from services.gateway.fallback import Chain, backoff, code_of, falls_back
from services.gateway.prices import PriceBook
from services.gateway.quota import COUNTERS, TOKEN_COUNTER, Admission, Quota
from services.gateway.relay import Relay, Upstream
from services.gateway.router import Router
from services.gateway.routing_settings import RoutingSettings
from services.gateway.spend import Spend

__all__ = ["Parts", "Request"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Parts:
    """The gateway's collaborators a request uses (none of them holds request state)."""

    callers: Callers
    quota: Quota
    router: Router
    relay: Relay
    accounts: Accounts
    counts: Counts
    limits: Limits
    signer: Signer  #: signs the receipts (the gateway's node key)
    prices: PriceBook  #: what each model costs, for budgets, receipts and records
    settings: RoutingSettings  #: the default model, the fallbacks, the aliases, the workers' cache TTL
    dispatch: Dispatch  #: the gateway's slots toward workers, handed out by priority


class Request:
    """One `gateway.infer` call (see the module doc)."""

    def __init__(self, parts: Parts, model: str, deadline: float, *, fallback: bool = True) -> None:
        self._parts = parts
        self.request_id = "gw-" + secrets.token_hex(12)
        bind_request_id(self.request_id)  # on this request's log lines, here and (sent along) the worker's
        self.asked = model  #: the name the caller gave: a model, an alias or `default`
        self.model = model  #: the model routed to: the one that served, once it ends
        self._fallback = fallback
        self._chain = Chain([])  #: the models still to try, and those tried (fallback.py)
        self._last_error: str | None = None  #: the code of the last model's failure before its first chunk
        self._cut_short = False  #: the model's attempt had its first-token time, less than the caller's deadline
        self.deadline = deadline  #: time.monotonic() by which the caller wants the answer
        self.started = time.monotonic()
        self.at = time.time()
        self.caller: Caller | None = None
        self.prompt_hash: str | None = None
        self.admission: Admission | None = None
        self.spend = Spend(None, False)  #: the price at the start, once the caller is known
        self.worker: str | None = None  #: the worker that took it (node key, hex)
        self.delivered = 0  #: chunks of output (text or tool calls) passed on
        self.prompt_tokens = 0  #: as the worker counted them, with its first text chunk
        self._upstream: Upstream | None = None
        self._status: str | None = None  #: how it failed, when it did
        self._ended = False
        self._slot = False  #: holds one of the gateway's dispatch slots

    # -- 1-4: from arrival to the first chunk -------------------------------------------

    async def start(self, api_key: str | None, token: str | None, generation: dict[str, Any],
                    stream: bool) -> dict[str, Any]:
        """Identify, check, route, admit, open a worker's stream: the first chunk to send
        (with the request's id and the model routed to, so an HTTP reply can name them
        before the end)."""
        parts = self._parts
        with self._failing():
            self.caller = caller = await parts.callers.identify(api_key, token, deadline=self.deadline)
            checked = check_request(parts.limits, model=self.model, generation=generation, stream=stream)
            self.prompt_hash = checked.prompt_hash
            self._chain = Chain(parts.settings.candidates(self.asked, fallback=self._fallback))
            workers = await self._route(caller)
            check_capabilities(checked.request, workers)
            await self._dispatched(caller)
            room = await self._hold(caller, checked)
        params = {**checked.params, "priority": caller.priority,
                  "tenant": f"user:{caller.user_id}"}  # the worker's response cache is per user
        if parts.settings.cache_ttl is not None:  # the operator's, else each worker's own
            params["cache_ttl"] = parts.settings.cache_ttl
        with self._failing():
            while True:
                try:
                    self._upstream = await self._open(params, workers, room)
                    break
                except MeshError as exc:
                    workers, room = await self._fall_back(exc, caller, checked)
        parts.counts.first_token(self.model, self._upstream.ttft)
        first = self._passed(self._upstream.first)
        opening = {**first, "request_id": first.get("request_id", self.request_id), "model": self.model}
        if stream and not is_final(first):  # the facts as admitted, for what is sent before the end (headers)
            opening["rate_limit"] = parts.quota.facts(caller.scopes)
        return opening

    async def _dispatched(self, caller: Caller) -> None:
        """Wait for one of the gateway's slots toward workers, by the caller's priority (dispatch.py)."""
        await self._parts.dispatch.enter(caller.priority, self.deadline)
        self._slot = True

    async def _hold(self, caller: Caller, checked: Checked) -> int | None:
        """Price the model routed to and admit the request for it (an `A` entry); the
        `max_tokens` a budget leaves, if it set one."""
        parts = self._parts
        self.spend = Spend.of(caller, parts.prices, self.model, self.at)
        self.admission, room = await self._admit(caller, checked)
        parts.accounts.admitted(self.request_id, self._stub(), self.admission)
        return room

    async def _open(self, params: dict[str, Any], workers: list[Provider], room: int | None) -> Upstream:
        """The model's stream: within the model's first-token time while the chain has
        another model to try, else the caller's deadline."""
        params = {**params, "model": self.model}
        if room is not None:
            params["max_tokens"] = room
        limit = self._parts.settings.first_token_timeout
        self._cut_short = limit is not None and self._chain.left and time.monotonic() + limit < self.deadline
        deadline = time.monotonic() + limit if self._cut_short and limit is not None else self.deadline
        return await self._parts.relay.open(self.request_id, self.model, params, workers, deadline, took=self._took)

    async def _fall_back(self, error: MeshError, caller: Caller,
                         checked: Checked) -> tuple[list[Provider], int | None]:
        """Move to the next model of the chain after `error` (fallback.py): wait its
        backoff, route, give back what the failed model held and admit for the next.
        Raises `error` (with the models tried) when the chain ends here."""
        chain, now = self._chain, time.monotonic()
        model_failed = falls_back(error, cut_short=self._cut_short)
        if model_failed:  # the model's failure: not the request's, nor the caller's deadline
            self._last_error = code_of(error)
        wait = backoff(len(chain.tried) + 1)
        if not (chain.left and model_failed) or now + wait >= self.deadline:
            raise self._naming_tried(error)
        chain.failed(self.model, error)
        self._parts.counts.fell_back(self.model, self._last_error or error.code)
        self._last_error = None
        log.info("model failed before its first token; falling back", model=self.model, code=error.code,
                 request_id=self.request_id)
        self.worker = None  # the failed model's worker did not serve it: nothing of it is kept
        await asyncio.sleep(wait)
        try:
            workers = await self._route(caller, moving=True)
        except (NotFound, Forbidden):
            raise self._naming_tried(error) from None
        check_capabilities(checked.request, workers)
        if self.admission is not None:
            self._parts.quota.release(self.admission)
            self.admission = None
        return workers, await self._hold(caller, checked)

    def _tried(self) -> list[dict[str, Any]]:
        """The models tried and failed, the last one too once it failed."""
        last = [{"model": self.model, "code": self._last_error}] if self._last_error is not None else []
        return [*self._chain.tried, *last]

    def _naming_tried(self, error: MeshError) -> MeshError:
        """`error`, naming the models tried when the chain moved before it."""
        if self._chain.tried:
            error.data["tried"] = self._tried()
        return error

    async def embed(self, api_key: str | None, token: str | None, input: Any, dimensions: Any) -> dict[str, Any]:
        """An embedding request (`gateway.embed`): identify, check, route, admit, call a
        worker's `inference.embed`, settle its prompt tokens and record it -- the
        steps of a generation, with one answer instead of a stream."""
        parts = self._parts
        with self._failing():
            self.caller = caller = await parts.callers.identify(api_key, token, deadline=self.deadline)
            caller.check_model(self.model)
            checked = check_embedding(parts.limits, model=self.model, input=input, dimensions=dimensions)
            self.prompt_hash = checked.prompt_hash
            workers = await parts.router.workers(self.model, deadline=self.deadline)
            check_capabilities(None, workers)
            await self._dispatched(caller)
            self.spend = spend = Spend.of(caller, parts.prices, self.model, self.at)
            self.admission = await parts.quota.admit(caller.scopes, checked.reserve,
                                                     spend=spend.worst(checked.reserve, 0), deadline=self.deadline)
        parts.accounts.admitted(self.request_id, self._stub(), self.admission)
        params = {**checked.params, "priority": caller.priority, "tenant": f"user:{caller.user_id}"}
        with self._failing():
            answer = await parts.relay.call(self.request_id, "inference.embed", self.model, params, workers,
                                            self.deadline, took=self._took)
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        prompt_tokens = _count(usage.get("prompt_tokens"))
        parts.quota.settle(self.admission, prompt_tokens, self.spend.used(prompt_tokens, 0))
        worker = answer.get("worker")
        worker_id = worker.get("id") if isinstance(worker, dict) and isinstance(worker.get("id"), str) else None
        self._finish("ok", prompt_tokens, 0, worker_id or self.worker)
        return {"model": answer.get("model"), "vectors": answer.get("vectors"), "dimensions": answer.get("dimensions"),
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                "request_id": self.request_id, "rate_limit": parts.quota.facts(caller.scopes),
                "receipt": self._receipt(answer.get("model"), prompt_tokens, 0)}

    async def _route(self, caller: Caller, *, moving: bool = False) -> list[Provider]:
        """The workers of the model to serve the request: the chain's first (the model
        named, `default`'s, or an alias's first) whose workers can take it now, else the
        first with workers (the relay then says `UNAVAILABLE`). `self.model` becomes the
        model chosen, and leaves the chain. A model the key may not use is `FORBIDDEN`
        when asked for by name, and skipped in a chain."""
        router, chain = self._parts.router, self._chain
        refusal: MeshError | None = None
        busy: tuple[str, list[Provider]] | None = None
        for model in list(chain.pending):
            try:
                caller.check_model(model)
                workers = await router.workers(model, deadline=self.deadline)
            except (NotFound, Forbidden) as exc:
                if not moving and model == self.asked and isinstance(exc, Forbidden):
                    raise
                chain.take(model)  # nobody serves it now, or the key may not use it
                refusal = refusal or exc
                continue
            if router.can_take(workers):
                return self._chosen(model, workers)
            busy = busy or (model, workers)
        if busy is not None:
            return self._chosen(*busy)
        assert refusal is not None
        raise refusal

    def _chosen(self, model: str, workers: list[Provider]) -> list[Provider]:
        self._chain.take(model)
        if model != self.model:
            log.info("request routed to another model", asked=self.asked, model=model, request_id=self.request_id)
            self.model = model
        return workers

    async def _admit(self, caller: Caller, checked: Checked) -> tuple[Admission, int | None]:
        """Hold the request's tokens and worst-case cost; a request that left `max_tokens`
        to the model and would pass the caller's monthly token budget or a money budget
        gets what the budget leaves (the `max_tokens` to send, else None): no hidden cap,
        and still never overspent."""
        quota, spend, prompt = self._parts.quota, self.spend, checked.prompt_reserve
        worst = spend.worst(prompt, checked.reserve - prompt)
        try:
            return await quota.admit(caller.scopes, checked.reserve, spend=worst, deadline=self.deadline), None
        except RateLimited as exc:
            room = self._room(exc, checked)
            if room is None:
                raise
        admission = await quota.admit(caller.scopes, prompt + room, spend=spend.worst(prompt, room),
                                      deadline=self.deadline)
        return admission, room

    def _room(self, refusal: RateLimited, checked: Checked) -> int | None:
        """The output tokens the refusing budget leaves a request that did not set
        `max_tokens`, if at least one; else None (the refusal stands)."""
        request, counter = checked.request, refusal.data.get("counter")
        if request is None or request.max_tokens is not None or counter not in COUNTERS:
            return None
        left = ((refusal.data.get("rate_limit") or {}).get(counter) or {}).get("remaining")
        if counter == TOKEN_COUNTER and isinstance(left, int):
            room: int | None = left - checked.prompt_reserve
        elif COUNTERS[counter].unit == "money" and isinstance(left, str):
            room = self.spend.room(Decimal(left), checked.prompt_reserve)
        else:
            return None
        return room if room is not None and room >= 1 else None

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """Keep how a step failed, for the record `end` writes."""
        try:
            yield
        except MeshError as exc:
            if exc.code == "RATE_LIMITED" and self.caller is not None and self.admission is None:
                self._parts.counts.refused(self.caller.tier)
            self._status = exc.code.lower()
            raise
        except Exception:
            self._status = "internal"
            raise

    def _took(self, worker: str) -> None:
        """The relay's word: `worker` took the work (it consumes its request counts)."""
        self.worker = worker

    # -- 4-6: the chunks, to the final one ---------------------------------------------

    async def next(self) -> dict[str, Any] | None:
        """The next chunk to send; None once the final one was sent."""
        if self._ended or self._upstream is None:
            return None
        try:
            chunk = await self._upstream.next(self.delivered)
        except MeshError as exc:
            self._status = "timeout" if exc.code == "TIMEOUT" else "worker_failed"
            raise
        except Exception:
            self._status = "internal"
            raise
        return self._passed(chunk)

    def _passed(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if is_final(chunk):
            return self._succeeded(chunk)
        if output_of(chunk):
            self.delivered += 1
            if self.delivered == 1:
                self.prompt_tokens = _count(chunk.get("prompt_tokens"))
        return chunk

    def _succeeded(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Settle, record and count a request the worker finished; the final chunk to send."""
        parts, caller, admission = self._parts, self.caller, self.admission
        assert caller is not None and admission is not None and self._upstream is not None
        usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else {}
        prompt_tokens, completion_tokens = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        cached = chunk.get("cached") is True
        parts.counts.generated(self.model, chunk.get("timing"), prompt_tokens, completion_tokens, cached)
        parts.quota.settle(admission, prompt_tokens + completion_tokens,
                           self.spend.used(prompt_tokens, completion_tokens, cached))
        worker = chunk.get("worker")
        worker_id = worker.get("id") if isinstance(worker, dict) and isinstance(worker.get("id"), str) else None
        self._finish("ok", prompt_tokens, completion_tokens, worker_id or self._upstream.provider.node_hex, cached)
        final = {**chunk, "request_id": self.request_id, "rate_limit": parts.quota.facts(caller.scopes),
                 "receipt": self._receipt(chunk.get("model"), prompt_tokens, completion_tokens, cached)}
        if self._chain.tried:
            final["tried"] = self._chain.tried
        return final

    def _receipt(self, served: Any, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> str:
        """The signed receipt of a request served to the end (shared/receipts.py): the
        tokens it was billed and their cost, the model that served it (the worker's name for it)."""
        assert self.caller is not None
        model = safe_model(served) if isinstance(served, str) and served else safe_model(self.model)
        return sign(self._parts.signer, request_id=self.request_id, model=model, prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens, at=self.at, user_id=self.caller.user_id,
                    cost=self.spend.cost(prompt_tokens, completion_tokens, cached))

    # -- 5-7: however it ended -----------------------------------------------------------

    async def end(self) -> None:
        """Close the worker's stream (CANCEL if it is still going); settle, record and
        count a request that did not succeed. Idempotent; call it in a `finally`."""
        try:
            if self._upstream is not None:
                await self._upstream.close()
        finally:
            if self._slot:
                self._slot = False
                self._parts.dispatch.leave()
            if not self._ended:
                self._failed()

    def _failed(self) -> None:
        status = self._status or "cancelled"  # no error of ours: the caller left
        if status == "cancelled" and time.monotonic() >= self.deadline:
            status = "timeout"
        if self.caller is None:  # nobody to bill
            self._ended = True
            self._parts.counts.ended(status)
            return
        prompt_tokens = self.prompt_tokens if self.delivered else 0
        if self.admission is not None:
            if self.worker is not None or self.delivered:  # a worker took it
                self._parts.quota.settle(self.admission, prompt_tokens + self.delivered,
                                         self.spend.used(prompt_tokens, self.delivered))
            else:
                self._parts.quota.release(self.admission)  # no worker took it: nothing kept
        self._finish(status, prompt_tokens, self.delivered, self.worker)

    def _finish(self, status: str, prompt_tokens: int, completion_tokens: int, worker: str | None,
                cached: bool = False) -> None:
        """The one usage record, then the counts."""
        self._ended = True
        assert self.caller is not None
        seconds = time.monotonic() - self.started
        record = {
            "request_id": self.request_id, "user_id": self.caller.user_id, "key_id": self.caller.key_id,
            "model": safe_model(self.model), "prompt_hash": self.prompt_hash,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cached": cached,
            "latency_ms": int(seconds * 1000), "status": status,
            "worker": worker if worker and len(worker) <= 256 else None, "at": round(self.at, 3),
        }
        if self.asked != self.model:
            record["asked"] = safe_model(self.asked)
        tried = self._tried() if status not in ("ok", "cancelled") and not self.delivered else self._chain.tried
        if tried:
            record["tried"] = [{"model": safe_model(t["model"]), "code": t["code"]} for t in tried]
        cost = self.spend.cost(prompt_tokens, completion_tokens, cached)
        if cost is not None and self.spend.price is not None:  # what the receipt says and the budget kept
            record["cost"], record["currency"] = format(cost, "f"), self.spend.price.currency
        self._parts.accounts.recorded(record, self.admission)
        log.debug("request done", status=status, model=record["model"], prompt_tokens=prompt_tokens,
                  completion_tokens=completion_tokens, latency_ms=record["latency_ms"])
        counts = self._parts.counts
        counts.ended(status)
        if self.admission is not None:
            counts.served(self.model, status, seconds, prompt_tokens, completion_tokens,
                          cached=cached if status == "ok" else None)

    def _stub(self) -> dict[str, Any]:
        """What an `A` entry keeps to bill the request if the process dies."""
        assert self.caller is not None
        return {"user_id": self.caller.user_id, "key_id": self.caller.key_id, "model": safe_model(self.model),
                "prompt_hash": self.prompt_hash, "at": round(self.at, 3)}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
