"""The operator's routing settings as this gateway applies them (auth's `settings_table`).

    settings = RoutingSettings(auth_client)
    async with settings:                                 # loads now, then polls (polled.py)
        settings.candidates("default")                   # ["llama3", "smollm2"]: the models to try, in order
        settings.candidates("fast", fallback=False)      # ["llama3"]: the first only
        settings.cache_ttl                               # seconds for the workers' cache, or None

Set by admins on the dashboard or with `inferswarm admin settings`, stored in
auth's PostgreSQL (services/auth/README.md, "Routing settings"), applied here
within a second:

* `default_model`: the model a request naming `default` is served by (none
  set: such a request is `NOT_FOUND`);
* `fallback_models`: the chain of every model asked by name (or `default`):
  tried in order after it, before anything is held when it has no worker that
  can take the request, and after admission when it fails (fallback.py);
* `aliases`: a name -> its own chain (`"fast" -> ["llama3", "smollm2"]`): a
  request naming the alias is served by the first model that answers, and
  the global fallbacks do not apply to it;
* `first_token_timeout`: seconds a model gets to send its first token while
  the chain has another to try (None: the caller's deadline only);
* `cache_ttl`: passed to the workers with each request (their own
  `INFERSWARM_CACHE_TTL` when none is set; 0: nothing cached).

A request that opts out of fallbacks (`fallback: false`) gets the chain's
first model only.

Until auth has answered once: no default, no fallbacks, the workers' own TTL.
"""

from __future__ import annotations

from typing import Any, Self

from shared.errors import NotFound
from services.auth.client import AuthClient
from services.gateway.polled import Polled

__all__ = ["DEFAULT_MODEL", "RoutingSettings"]

DEFAULT_MODEL = "default"  #: the name a request gives to mean "the default model"


class RoutingSettings:
    """The routing settings in force (see the module doc)."""

    def __init__(self, auth: AuthClient, *, interval: float = 1.0, timeout: float = 2.0) -> None:
        self._auth = auth
        self._timeout = timeout
        self.default_model: str | None = None
        self.fallback_models: tuple[str, ...] = ()
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.first_token_timeout: float | None = None
        self.cache_ttl: int | None = None
        self._table = Polled("routing settings", self._fetch, self._apply, interval=interval)

    async def __aenter__(self) -> Self:
        await self._table.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._table.__aexit__(*exc_info)

    async def refresh(self) -> None:
        await self._table.refresh()

    def candidates(self, model: str, *, fallback: bool = True) -> list[str]:
        """The models to try for a request naming `model`, in order: an alias's chain, else
        the model (or the default model for `default`) then the fallbacks; the first
        only without `fallback`."""
        chain = self.aliases.get(model)
        if chain is None:
            first = self.default_model if model == DEFAULT_MODEL else model
            if first is None:
                raise NotFound("no default model is set: name a model", {"param": "model", "model": model})
            chain = (first, *(m for m in self.fallback_models if m != first))
        return list(chain if fallback else chain[:1])

    async def _fetch(self, since: int | None) -> tuple[int, Any]:
        answer = await self._auth.settings_table(since=since, timeout=self._timeout)
        return answer["version"], answer["settings"]

    def _apply(self, settings: dict[str, Any]) -> None:
        self.default_model = settings.get("default_model")
        self.fallback_models = tuple(settings.get("fallback_models") or ())
        aliases = settings.get("aliases") or {}
        self.aliases = {name: tuple(chain) for name, chain in aliases.items() if chain}
        timeout = settings.get("first_token_timeout")
        self.first_token_timeout = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None
        self.cache_ttl = settings.get("cache_ttl")
