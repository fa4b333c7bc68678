"""The operator's routing settings as this gateway applies them (auth's `settings_table`).

    settings = RoutingSettings(auth_client)
    async with settings:                                 # loads now, then polls (polled.py)
        settings.candidates("default")                   # ["llama3", "smollm2"]: the models to try, in order
        settings.cache_ttl                               # seconds for the workers' cache, or None

Set by admins on the dashboard or with `inferswarm admin settings`, stored in
auth's PostgreSQL (services/auth/README.md, "Routing settings"), applied here
within a second:

* `default_model`: the model a request naming `default` is served by (none
  set: such a request is `NOT_FOUND`);
* `fallback_models`: tried in order when the model asked for has no worker, or
  none that can take a request now -- decided before anything is held; a
  request a worker failed once admitted is not moved to another model;
* `cache_ttl`: passed to the workers with each request (their own
  `INFERSWARM_CACHE_TTL` when none is set; 0: nothing cached).

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
        self.cache_ttl: int | None = None
        self._table = Polled("routing settings", self._fetch, self._apply, interval=interval)

    async def __aenter__(self) -> Self:
        await self._table.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._table.__aexit__(*exc_info)

    async def refresh(self) -> None:
        await self._table.refresh()

    def candidates(self, model: str) -> list[str]:
        """The models to try for a request naming `model`, in order: it (or the default
        model for `default`), then the fallbacks."""
        first = self.default_model if model == DEFAULT_MODEL else model
        if first is None:
            raise NotFound("no default model is set: name a model", {"param": "model", "model": model})
        return [first, *(m for m in self.fallback_models if m != first)]

    async def _fetch(self, since: int | None) -> tuple[int, Any]:
        answer = await self._auth.settings_table(since=since, timeout=self._timeout)
        return answer["version"], answer["settings"]

    def _apply(self, settings: dict[str, Any]) -> None:
        self.default_model = settings.get("default_model")
        self.fallback_models = tuple(settings.get("fallback_models") or ())
        self.cache_ttl = settings.get("cache_ttl")
