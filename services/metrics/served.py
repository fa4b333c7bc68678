"""What inference workers say of their models: each one's circuit breaker and upstream keys.

The health monitor asks a worker `inference.models` (services/inference/service.py)
and keeps, per model, a `ModelState`: the breaker's view (`shared/breaker.py`
`Breaker.view()`: state, failures, retry_after, opened) and the backend's
upstream API keys (`Engine.keys_view()`: a list of small maps -- a masked
label, a `state`, usage counts, what the upstream says is left -- or None for
a backend without a key pool). A worker is another process: whatever it sends
is checked and bounded here (known states only, scalars only, at most
`MAX_KEYS` keys), so the report and the metrics built on it stay small.

`tally` turns the states of several workers into counts per model and state:
workers per breaker state (`BREAKER_STATES`) and keys per key state
(`KEY_STATES`), the figures behind `inferswarm_breaker_state` and
`inferswarm_upstream_keys`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["BREAKER_STATES", "KEY_STATES", "MAX_KEYS", "ModelState", "parse_models", "tally"]

BREAKER_STATES = ("closed", "open", "half_open")
KEY_STATES = ("ok", "exhausted", "disabled", "open")
MAX_KEYS = 64  #: keys kept per model; more are dropped
_MAX_MODELS = 64
_MAX_TEXT = 128


@dataclass(frozen=True, slots=True)
class ModelState:
    """One model of one worker: its name, its breaker's view and its upstream keys."""

    name: str
    breaker: dict[str, Any] | None = None  #: {state, failures, retry_after, opened}; None: not said
    keys: tuple[dict[str, Any], ...] | None = None  #: None: the backend has no key pool

    @property
    def breaker_state(self) -> str | None:
        return None if self.breaker is None else self.breaker["state"]

    def view(self) -> dict[str, Any]:
        return {"breaker": self.breaker, "keys": None if self.keys is None else list(self.keys)}


def parse_models(answer: Any) -> list[ModelState]:
    """The models of an `inference.models` answer; entries without a sane name are skipped."""
    listed = answer.get("models") if isinstance(answer, dict) else None
    states = []
    for entry in (listed if isinstance(listed, list) else [])[:_MAX_MODELS]:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name")
        if isinstance(name, str) and 0 < len(name) <= _MAX_TEXT:
            states.append(ModelState(name, _breaker(entry.get("breaker")), _keys(entry.get("keys"))))
    return states


def _breaker(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or raw.get("state") not in BREAKER_STATES:
        return None
    return {"state": raw["state"], **{k: raw[k] for k in ("failures", "retry_after", "opened")
                                      if _number(raw.get(k))}}


def _keys(raw: Any) -> tuple[dict[str, Any], ...] | None:
    if not isinstance(raw, list):
        return None
    keys = []
    for entry in raw[:MAX_KEYS]:
        if isinstance(entry, dict) and entry.get("state") in KEY_STATES:
            keys.append({str(k)[:32]: v for k, v in list(entry.items())[:32] if _scalar(v)})
    return tuple(keys)


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _scalar(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float) or (isinstance(value, str) and len(value) <= _MAX_TEXT)


def tally(models: Iterable[ModelState]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Per model name: (workers per breaker state, keys per key state), every state present.

    A model appears in the first only when a breaker was said, in the second
    only when it has a key pool."""
    breakers: dict[str, dict[str, int]] = {}
    keys: dict[str, dict[str, int]] = {}
    for model in models:
        if model.breaker_state is not None:
            into = breakers.setdefault(model.name, dict.fromkeys(BREAKER_STATES, 0))
            into[model.breaker_state] += 1
        if model.keys is not None:
            counts = keys.setdefault(model.name, dict.fromkeys(KEY_STATES, 0))
            for key in model.keys:
                counts[key["state"]] += 1
    return breakers, keys
