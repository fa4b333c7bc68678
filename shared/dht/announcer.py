"""`Announcer`: keep a service's topics announced while it runs.

    async with Announcer(dht, [service_topic("auth")], service="auth",
                         endpoint="tcp://10.0.0.7:5555", version="1.0", load=worker.load):
        await serve_forever()

On enter every topic is announced at once; then again every `interval`
seconds (default ttl/3, shortened by up to `jitter` so that nodes started
together do not announce in lockstep); `poke()` re-announces soon after the
load changed, at most once per `poke_interval`. On exit every topic is
withdrawn (ttl 0). A failed announce is logged and retried after
`retry_interval`; it never ends the loop.

`topic_load(topic)`, when given, adds entries to one topic's record only (e.g.
an inference worker's free slots for the model of that topic), over `load`.

`hidden()`, when given, names the topics not to announce now (e.g. a model
whose circuit breaker is open). It is asked on every round (each refresh,
retry and `poke()`): a topic newly hidden is withdrawn at once (ttl 0) and
then left alone; once it is no longer named it is announced again in that
round. A withdrawal that fails is retried on the next round. Topics it names
outside `topics` are ignored; hiding every topic is allowed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import structlog

from shared.dht.interface import Discovery
from shared.errors import MeshError
from shared.tasks import Background

__all__ = ["Announcer", "DEFAULT_TTL"]

log = structlog.get_logger(__name__)

DEFAULT_TTL = 30.0


class Announcer:
    """Announce `topics` on a `Discovery` for as long as the context is open."""

    def __init__(
        self,
        discovery: Discovery,
        topics: Sequence[str],
        *,
        service: str,
        endpoint: str,
        version: str,
        load: Callable[[], Mapping[str, Any]] | None = None,
        topic_load: Callable[[str], Mapping[str, Any]] | None = None,
        hidden: Callable[[], Iterable[str]] | None = None,
        ttl: float = DEFAULT_TTL,
        interval: float | None = None,
        jitter: float = 0.2,
        poke_interval: float = 1.0,
        retry_interval: float = 1.0,
        withdraw_timeout: float = 2.0,
    ) -> None:
        if not topics:
            raise ValueError("an Announcer needs at least one topic")
        self.discovery = discovery
        self.topics = list(dict.fromkeys(topics))
        self.service, self.endpoint, self.version = service, endpoint, version
        self._load = load
        self._topic_load = topic_load
        self._hidden = hidden
        self._withdrawn: set[str] = set()  #: hidden topics whose withdrawal went out
        self.ttl = ttl
        self.interval = ttl / 3 if interval is None else interval
        self.jitter = jitter
        self.poke_interval = poke_interval
        self.retry_interval = retry_interval
        self.withdraw_timeout = withdraw_timeout
        self._poked = asyncio.Event()
        self._last_announce = float("-inf")
        self._background = Background()

    async def __aenter__(self) -> Announcer:
        ok = await self.announce_now()
        self._background.start(self._run(ok), name=f"announcer.{self.service}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        await self._withdraw_all()

    def poke(self) -> None:
        """Re-announce soon (rate-limited), e.g. because the load changed."""
        self._poked.set()

    async def announce_now(self) -> bool:
        """Announce every shown topic and withdraw the newly hidden ones, concurrently;
        True when all succeeded."""
        self._last_announce = time.monotonic()
        load = self._current_load()
        hidden = self._current_hidden()
        self._withdrawn &= hidden  # shown again: a later hiding withdraws it anew
        shown = [t for t in self.topics if t not in hidden]
        to_withdraw = [t for t in self.topics if t in hidden and t not in self._withdrawn]
        results = await asyncio.gather(
            *(self._announce(topic, load) for topic in shown),
            *(self.discovery.withdraw(topic) for topic in to_withdraw), return_exceptions=True
        )
        failures = []
        for topic, result in zip([*shown, *to_withdraw], results):
            if isinstance(result, BaseException):
                failures.append(topic)
                event = "announcer.announce_failed" if topic in shown else "announcer.withdraw_failed"
                _log_failure(event, topic, result)
            elif topic in hidden:
                self._withdrawn.add(topic)
        return not failures

    @property
    def announced(self) -> list[str]:
        """The topics announced now: `topics` less the hidden ones withdrawn."""
        return [t for t in self.topics if t not in self._withdrawn]

    async def _announce(self, topic: str, load: Mapping[str, Any]) -> None:
        if self._topic_load is not None:
            load = {**load, **self._topic_load_of(topic)}
        await self.discovery.announce(
            topic, service=self.service, endpoint=self.endpoint, version=self.version, load=load, ttl=self.ttl
        )

    def _current_load(self) -> Mapping[str, Any]:
        if self._load is None:
            return {}
        try:
            return self._load()
        except Exception:
            log.exception("announcer.load_failed", service=self.service)
            return {}

    def _current_hidden(self) -> set[str]:
        if self._hidden is None:
            return set()
        try:
            return set(self._hidden())
        except Exception:
            log.exception("announcer.hidden_failed", service=self.service)
            return set(self._withdrawn)  # as it was: neither shown nor withdrawn on an error

    def _topic_load_of(self, topic: str) -> Mapping[str, Any]:
        try:
            return self._topic_load(topic)  # type: ignore[misc]
        except Exception:
            log.exception("announcer.load_failed", service=self.service, topic=topic)
            return {}

    async def _run(self, ok: bool) -> None:
        # Runs until cancelled; every iteration waits at least poke_interval or retry_interval.
        while True:
            delay = self.interval * (1 - self.jitter * random.random()) if ok else self.retry_interval
            await self._wait(delay)
            ok = await self.announce_now()

    async def _wait(self, delay: float) -> None:
        """Sleep `delay`, or less when poked (but not within poke_interval of the last announce)."""
        try:
            await asyncio.wait_for(self._poked.wait(), delay)
        except asyncio.TimeoutError:
            return  # the timer: retries and refreshes are not rate-limited
        self._poked.clear()
        hold = self._last_announce + self.poke_interval - time.monotonic()
        if hold > 0:
            await asyncio.sleep(hold)

    async def _withdraw_all(self) -> None:
        async def withdraw(topic: str) -> None:
            try:
                await asyncio.wait_for(self.discovery.withdraw(topic), self.withdraw_timeout)
            except Exception as exc:
                _log_failure("announcer.withdraw_failed", topic, exc)

        await asyncio.gather(*(withdraw(topic) for topic in self.topics))


def _log_failure(event: str, topic: str, error: BaseException) -> None:
    if isinstance(error, MeshError) and error.expected or isinstance(error, (OSError, asyncio.TimeoutError)):
        log.warning(event, topic=topic, error=repr(error))
    else:
        log.error(event, topic=topic, exc_info=error)
