"""Upstream API key pools: several keys for one hosted model, rotated, each with its state.

An openai or anthropic entry may name several keys (`api_key_env`,
`api_keys_env`, `api_keys_file`, see catalog.py); the backend then holds one
`KeyPool` and every request to the upstream goes out with one of its keys.
The pool is the one owner of what is known about each key; the event loop
is its only caller, so it needs no lock, and it holds no task: every state
is computed from the clock when asked.

A key's state, as `view()` shows it:

| state     | how it gets there                                  | until                          |
| --------- | -------------------------------------------------- | ------------------------------ |
| ok        | start; a reset or a breaker cooldown passed        |                                |
| exhausted | the upstream answered 429 with this key            | the reset it reported (below)  |
| disabled  | the upstream answered 401 or 403 with this key     | the worker restarts            |
| open      | its breaker opened (or half-open): 5 upstream 5xx  | the cooldown (5 s, doubling    |
|           | or connection failures in a row with this key      | on a failed half-open probe)   |

The reset of a 429 is, first found: `retry-after-ms`; `retry-after` (seconds
or an HTTP date); else the latest of OpenAI's `x-ratelimit-reset-requests` /
`-tokens` (Go durations: `1s`, `6m0s`, `1m30.5s`, `20ms`) and Anthropic's
`anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`
(RFC 3339 times); 1 s when none is given, at most 1 hour.

Requests rotate round-robin over the keys usable now (ok, breaker allowing:
in half-open one request probes the key). A key refused before any output --
429, 401, 403 or a 5xx -- is tried no more for this request and the request
goes at once to the next usable key, each key at most once. A connection
failure counts on the key's breaker but is not retried with another key
(the server, not the key, is down). When no key is usable the request fails
fast with `Unavailable`, its data:

* `{"retry_safe": True, "retry_after": s, "reason": "upstream_keys_exhausted",
  "upstream_status": 429}` when a key waits for its reset (the gateway takes
  another model on a 429);
* `{"retry_safe": True, "reason": "upstream_keys_disabled"}` when every key
  is disabled;
* `{"retry_safe": True, "retry_after": s, "reason": "upstream_keys_failing"}`
  when the usable ones' breakers are open;

`retry_after` being the whole seconds until the soonest key is usable (at
least 1); `upstream_status` is also the last refusal's status when this
request was refused by the upstream. Its message names the model and, for
the last refusal, what the upstream said -- never a key.

A key is shown by its label, `key-<n> …<last 4 characters>` (n from 1; the
suffix only for keys of 12 characters or more, so a short key never shows
a third of itself). Each answer's `x-ratelimit-{remaining,limit}-{requests,tokens}`
(OpenAI) or `anthropic-ratelimit-{requests,tokens}-{remaining,limit}`
(Anthropic), success or error, updates what the key has left.

`view()` (what `Engine.keys_view()` of the openai and anthropic backends and
of the openai embedder returns) is one dict per key, in the configured order:

    {"key": "key-2 …c3f9", "state": "ok" | "exhausted" | "disabled" | "open",
     "until": epoch seconds (exhausted: the reset; open: the end of the cooldown) or None,
     "requests": attempts made with it, "failures": of those, the ones that failed,
     "prompt_tokens", "completion_tokens": the upstream's usage of the completed ones,
     "last_used": epoch seconds or None, "last_status": the last HTTP status or None,
     "remaining_requests", "remaining_tokens", "limit_requests", "limit_tokens":
         the upstream's last word on them, None until it said}
"""

from __future__ import annotations

import math
import re
import time
from contextlib import aclosing
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar

from shared.breaker import CLOSED, OPEN, Breaker
from shared.config import Secret
from shared.errors import MeshError, RemoteError, Unavailable
from shared.logging import get_logger
from services.inference.backends.base import Done, Event

__all__ = ["ApiKey", "KeyPool", "KeyState", "Lease", "label_of", "parse_duration", "rate_figures", "reset_delay"]

log = get_logger(__name__)

KeyState = Literal["ok", "exhausted", "disabled", "open"]
T = TypeVar("T")

DEFAULT_RESET = 1.0  #: a 429 that says nothing of its reset
MAX_RESET = 3600.0
REFUSALS = frozenset({401, 403, 429})  #: statuses that say "not this key"

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_RESETS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_ANTHROPIC_RESETS = tuple(f"anthropic-ratelimit-{kind}-reset"
                          for kind in ("requests", "tokens", "input-tokens", "output-tokens"))
#: view field -> the headers that carry it (OpenAI's, Anthropic's)
_FIGURES = {
    "remaining_requests": ("x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"),
    "remaining_tokens": ("x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"),
    "limit_requests": ("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"),
    "limit_tokens": ("x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit"),
}


# -- what the upstream's headers say -------------------------------------------------


def parse_duration(text: str) -> float | None:
    """Seconds of a Go duration as OpenAI sends them (`6m0s`, `1m30.5s`, `20ms`); None if not one."""
    text = text.strip()
    if text == "0":
        return 0.0
    total, position = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return total if text and position == len(text) else None


def _retry_after(text: str, now: float) -> float | None:
    """`Retry-After`: seconds, or an HTTP date."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - now


def _rfc3339(text: str, now: float) -> float | None:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - now


def reset_delay(headers: Mapping[str, str], now: float) -> float:
    """Seconds until a key refused with 429 may be used again (see the module doc)."""
    lower = {name.lower(): value for name, value in headers.items()}
    delay: float | None = None
    if "retry-after-ms" in lower:
        try:
            delay = float(lower["retry-after-ms"]) / 1000
        except ValueError:
            delay = None
    if delay is None and "retry-after" in lower:
        delay = _retry_after(lower["retry-after"], now)
    if delay is None:
        resets = [parse_duration(lower[name]) for name in _RESETS if name in lower]
        resets += [_rfc3339(lower[name], now) for name in _ANTHROPIC_RESETS if name in lower]
        known = [r for r in resets if r is not None]
        delay = max(known) if known else None
    if delay is None or math.isnan(delay):
        return DEFAULT_RESET
    return min(max(delay, 0.0), MAX_RESET)


def rate_figures(headers: Mapping[str, str]) -> dict[str, int]:
    """What the upstream says a key has left and may use, from the headers it sent."""
    lower = {name.lower(): value for name, value in headers.items()}
    figures: dict[str, int] = {}
    for field, names in _FIGURES.items():
        for name in names:
            value = lower.get(name, "").strip()
            if value.isdigit():
                figures[field] = int(value)
    return figures


def label_of(index: int, secret: Secret) -> str:
    """How operators see key number `index` (from 0): never the key, at most its last 4 characters."""
    key = secret.reveal()
    return f"key-{index + 1} …{key[-4:]}" if len(key) >= 12 else f"key-{index + 1}"


# -- the keys ---------------------------------------------------------------------------


class ApiKey:
    """One key of a pool and everything known about it."""

    def __init__(self, index: int, secret: Secret, *, model: str, breaker: Breaker) -> None:
        self.index = index
        self.secret = secret
        self.label = label_of(index, secret)
        self.model = model
        self.breaker = breaker
        self.until = 0.0  #: exhausted until then (epoch seconds)
        self.disabled = False
        self.requests = self.failures = self.prompt_tokens = self.completion_tokens = 0
        self.last_used: float | None = None
        self.last_status: int | None = None
        self.figures: dict[str, int] = {}

    def state(self, now: float) -> KeyState:
        if self.disabled:
            return "disabled"
        if now < self.until:
            return "exhausted"
        return "ok" if self.breaker.state == CLOSED else "open"  # half-open: one probe may go

    def ready(self, now: float) -> bool:
        """Not disabled nor exhausted, and the breaker not open (half-open: maybe, ask `breaker.allow`)."""
        return not self.disabled and now >= self.until and self.breaker.state != OPEN

    def wait(self, now: float) -> float:
        """Seconds until the key may be usable (infinite when disabled)."""
        if self.disabled:
            return math.inf
        return max(self.until - now, self.breaker.retry_after(), 0.0)

    def observe(self, status: int, headers: Mapping[str, str], now: float) -> None:
        """An answer to a request made with this key: its status and headers."""
        self.last_status = status
        self.figures.update(rate_figures(headers))
        if status == 429:
            self.until = max(self.until, now + reset_delay(headers, now))
        elif status in (401, 403):
            if not self.disabled:
                self.disabled = True
                log.error("upstream key disabled", model=self.model, upstream_key=self.label, status=status)
        elif status >= 500:
            self.breaker.failed()
        else:
            self.breaker.succeeded()

    def view(self, now: float) -> dict[str, Any]:
        state = self.state(now)
        until = {"exhausted": self.until, "open": now + self.breaker.retry_after()}.get(state)
        return {"key": self.label, "state": state, "until": None if until is None else round(until, 3),
                "requests": self.requests, "failures": self.failures, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "last_used": self.last_used,
                **{field: self.figures.get(field) for field in _FIGURES}, "last_status": self.last_status}


class Lease:
    """One attempt of one request with one key: the headers to send, what came back.

    It is what `http.HttpClient.request` takes as `credential`."""

    def __init__(self, key: ApiKey, headers: Mapping[str, str], clock: Callable[[], float]) -> None:
        self.key = key
        self.headers = headers
        self.status: int | None = None  #: the upstream's answer (None: none yet)
        self._clock = clock

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status
        self.key.observe(status, headers, self._clock())

    def used(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The usage the upstream reported for this request."""
        self.key.prompt_tokens += prompt_tokens
        self.key.completion_tokens += completion_tokens


class KeyPool:
    """The keys of one model on one upstream (see the module doc)."""

    def __init__(self, keys: Sequence[Secret], *, model: str, header: Callable[[str], Mapping[str, str]],
                 threshold: int = 5, cooldown: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        unique: dict[str, Secret] = {}
        for secret in keys:
            unique.setdefault(secret.reveal(), secret)  # the first of duplicates, order kept
        if not unique:
            raise ValueError("a key pool needs at least one key")
        self.model = model
        self.keys = [ApiKey(i, s, model=model, breaker=Breaker(threshold=threshold, cooldown=cooldown, clock=clock))
                     for i, s in enumerate(unique.values())]
        self._header = header
        self._clock = clock
        self._next = 0
        self._last: MeshError | None = None  #: the last refusal, what a request that finds no key is told

    def __len__(self) -> int:
        return len(self.keys)

    def view(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [key.view(now) for key in self.keys]

    def lease(self, tried: set[int]) -> Lease | None:
        """The next usable key not tried yet, round-robin, counted as used; None when there is none."""
        now = self._clock()
        count = len(self.keys)
        for step in range(count):
            key = self.keys[(self._next + step) % count]
            if key.index in tried or not key.ready(now) or not key.breaker.allow():
                continue
            self._next = key.index + 1
            key.requests += 1
            key.last_used = round(now, 3)
            return Lease(key, self._header(key.secret.reveal()), self._clock)
        return None

    async def stream(self, attempt: Callable[[Lease], AsyncGenerator[Event, None]]
                     ) -> AsyncGenerator[Event, None]:
        """The events of `attempt` made with a key, retried with the next key when one is refused
        before any event; the usage of its `Done` counted on the key."""
        tried: set[int] = set()
        last: MeshError | None = None
        while True:
            lease = self.lease(tried)
            if lease is None:
                raise self._none_left(last)
            tried.add(lease.key.index)
            produced = False
            try:
                async with aclosing(attempt(lease)) as events:  # closed at once when the caller stops
                    async for event in events:
                        produced = True
                        if isinstance(event, Done):
                            lease.used(event.prompt_tokens, event.completion_tokens)
                        yield event
                return
            except MeshError as exc:
                lease.key.failures += 1
                if produced or not self._refused(lease, exc):
                    raise self._redacted(exc) from None
                last = self._last = self._redacted(exc)

    async def call(self, attempt: Callable[[Lease], Awaitable[T]]) -> T:
        """`attempt` made with a key, as `stream` does (for requests with one answer)."""
        tried: set[int] = set()
        last: MeshError | None = None
        while True:
            lease = self.lease(tried)
            if lease is None:
                raise self._none_left(last)
            tried.add(lease.key.index)
            try:
                return await attempt(lease)
            except MeshError as exc:
                lease.key.failures += 1
                if not self._refused(lease, exc):
                    raise self._redacted(exc) from None
                last = self._last = self._redacted(exc)

    def _redacted(self, error: MeshError) -> MeshError:
        """`error` with any key in its message replaced by the key's label (an upstream may echo it;
        raised `from None`, so the original is not chained to it)."""
        message = error.message
        for key in self.keys:
            message = message.replace(key.secret.reveal(), key.label)
        if message == error.message or isinstance(error, RemoteError):
            return error
        return type(error)(message, dict(error.data))

    @staticmethod
    def _refused(lease: Lease, error: MeshError) -> bool:
        """Whether the upstream refused this key (try the next one); a connection failure
        is counted on the key's breaker, and not retried."""
        if lease.status is None:
            if isinstance(error, Unavailable) and error.data.get("retry_safe"):
                lease.key.breaker.failed()
            return False
        return lease.status in REFUSALS or lease.status >= 500

    def _none_left(self, last: MeshError | None) -> MeshError:
        """The error of a request that has no key left to try (see the module doc)."""
        now = self._clock()
        if last is not None and any(key.ready(now) for key in self.keys):
            return last  # a usable key refused this very request: its answer says why
        last = last or self._last
        said = f" (last answer: {last.message})" if last is not None else ""
        data: dict[str, Any] = {"retry_safe": True}
        if last is not None and "upstream_status" in last.data:
            data["upstream_status"] = last.data["upstream_status"]
        if all(key.disabled for key in self.keys):
            return Unavailable(f"{self.model}: every upstream API key is disabled{said}",
                               {**data, "reason": "upstream_keys_disabled"})
        retry_after = max(1, math.ceil(min(key.wait(now) for key in self.keys)))
        if any(key.state(now) == "exhausted" for key in self.keys):
            return Unavailable(f"{self.model}: every upstream API key is rate limited; retry in "
                               f"{retry_after} s{said}",
                               {**data, "retry_after": retry_after, "reason": "upstream_keys_exhausted",
                                "upstream_status": 429})
        return Unavailable(f"{self.model}: every upstream API key is failing (circuit open); retry in "
                           f"{retry_after} s{said}", {**data, "retry_after": retry_after,
                                                       "reason": "upstream_keys_failing"})
