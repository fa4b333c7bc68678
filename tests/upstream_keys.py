"""The API keys of a hosted API, as the OpenAI and Anthropic test servers play them.

A server given `keys` (key -> behaviour) accepts only those keys (another one
is its 401) and answers each as told:

* `None`: serves;
* `429`: the key's quota is spent: refused with 429 and the reset headers
  of the API, until `reset_after` seconds after its first refusal, when the
  quota is back and the key serves again (its behaviour becomes None);
* `401` / `403`: the key is refused (revoked, or without access);
* any 5xx: the server fails with that status for this key.

It counts the requests made with each key (`requests_by_key`) and the
tokens spent with it, from which every answer's rate-limit headers say what
the key has left of `limit_requests` and `limit_tokens`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import datetime, timezone

__all__ = ["KeyedLimits", "go_duration", "rfc3339", "whole_seconds"]


class KeyedLimits:
    """Per-key behaviour and usage of a test server (see the module doc)."""

    def __init__(self) -> None:
        #: key -> None (serves), 429 (spent until its reset), 401/403 (refused), 5xx (fails); None: keys off.
        self.keys: dict[str, int | None] | None = None
        self.reset_after = 30.0  #: seconds from a key's first 429 to its quota coming back
        self.limit_requests = 500
        self.limit_tokens = 200_000
        self.requests_by_key: Counter[str] = Counter()
        self.tokens_by_key: Counter[str] = Counter()
        self._refill: dict[str, float] = {}  #: a spent key's quota is back at this time

    def behaviour(self, key: str) -> int | None:
        """What the answer to a request made with `key` is (counting the request); 401 for a stranger."""
        assert self.keys is not None
        if key not in self.keys:
            return 401
        self.requests_by_key[key] += 1
        behaviour = self.keys[key]
        if behaviour == 429:
            now = time.time()
            refill = self._refill.setdefault(key, now + self.reset_after)
            if now >= refill:
                self.keys[key] = behaviour = None
                del self._refill[key]
        return behaviour

    def reset_in(self, key: str) -> float:
        """Seconds until the key's quota is back (0 when it is not spent)."""
        return max(0.0, self._refill.get(key, 0.0) - time.time())

    def spent(self, key: str) -> bool:
        return self.keys is not None and self.keys.get(key) == 429

    def remaining_requests(self, key: str) -> int:
        return 0 if self.spent(key) else max(0, self.limit_requests - self.requests_by_key[key])

    def remaining_tokens(self, key: str) -> int:
        return 0 if self.spent(key) else max(0, self.limit_tokens - self.tokens_by_key[key])


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's headers write it (Go's `time.Duration`): `1m30s`, `6m0s`, `500ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def rfc3339(seconds_from_now: float) -> str:
    """A time as Anthropic's reset headers write it."""
    when = datetime.fromtimestamp(time.time() + seconds_from_now, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def whole_seconds(seconds: float) -> str:
    """`retry-after`: whole seconds, rounded up (at least 1 on a refusal)."""
    return str(max(1, math.ceil(seconds)))
