"""Checking the usage records a gateway sends (`auth.record_usage`).

A batch is a list of maps; every field is checked for type, range and length
before anything reaches SQL, and a bad record is `INVALID_PARAMS` naming its
index and field. Duplicates inside one batch are dropped here (the first
wins); duplicates of stored records are dropped by the database.

Two fields are diagnostics, not accounting, and are treated more leniently:
`asked` (the model the caller named, when another one served) and `tried`
(the models that failed before the last, each with its error code). A
malformed one is dropped from its record, with a warning, and the record is
stored without it: a gateway newer or buggier than this auth must not lose
anyone's usage over what only an operator reads. A record that failed
(`status` not ok) with a `tried` becomes a dead letter (usage_store.py).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from shared.errors import InvalidParams
from shared.logging import get_logger
from services.auth.dead_letter_store import Attempt
from services.auth.usage_store import UsageRecord

__all__ = ["MAX_AGE_S", "MAX_BATCH", "MAX_TRIED", "parse_batch"]

log = get_logger(__name__)

MAX_BATCH = 1000
MAX_TRIED = 10  #: attempts a record may list as failed before its last
_MAX_INT32 = 2**31 - 1
_MAX_ID = 2**63 - 1
_TEXT = re.compile(r"[\x20-\x7e]+")  # ids, models, statuses: printable ASCII
_HEX = re.compile(r"[0-9a-f]{16,128}")
_STATUS = re.compile(r"[a-z_]{1,32}")
_FIELDS = frozenset({
    "request_id", "user_id", "key_id", "model", "prompt_hash", "prompt_tokens",
    "completion_tokens", "cached", "latency_ms", "status", "worker", "at", "cost", "currency", "asked", "tried",
})
_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # an error code: UNAVAILABLE, TIMEOUT, RATE_LIMITED
_COST = re.compile(r"\d{1,10}(?:\.\d{1,10})?")  # NUMERIC(20,10)
_CURRENCY = re.compile(r"[A-Z]{3}")
#: Records from further back than this (or from the future) are refused. partitions.py keeps
#: the months this reaches back to made, and INFERSWARM_USAGE_RETENTION_MONTHS (at least 2)
#: never drops them.
MAX_AGE_S = 35 * 86_400
_MAX_AHEAD_S = 300


def parse_batch(batch: list[Any]) -> list[UsageRecord]:
    """Typed records from the wire batch, in order, without in-batch duplicates."""
    if len(batch) > MAX_BATCH:
        raise InvalidParams(f"at most {MAX_BATCH} records per batch", {"param": "batch"})
    records: dict[str, UsageRecord] = {}
    for index, item in enumerate(batch):
        record = _parse(index, item)
        records.setdefault(record.request_id, record)
    return list(records.values())


def _fail(index: int, field: str, why: str) -> InvalidParams:
    return InvalidParams(f"batch[{index}].{field}: {why}", {"param": "batch", "index": index, "field": field})


def _text(index: int, item: dict[str, Any], field: str, limit: int, *, optional: bool = False) -> str | None:
    value = item.get(field)
    if value is None and optional:
        return None
    if type(value) is not str or not 0 < len(value) <= limit or not _TEXT.fullmatch(value):
        raise _fail(index, field, f"expected printable ASCII text of 1-{limit} characters")
    return value


def _int(index: int, item: dict[str, Any], field: str, limit: int, *, optional: bool = False,
         default: int | None = None) -> int | None:
    value = item.get(field, default)
    if value is None and optional:
        return None
    if type(value) is not int or not 0 <= value <= limit:
        raise _fail(index, field, f"expected an integer from 0 to {limit}")
    return value


def _parse(index: int, item: Any) -> UsageRecord:
    if type(item) is not dict:
        raise InvalidParams(f"batch[{index}]: expected a map", {"param": "batch", "index": index})
    unknown = [str(k) for k in item if k not in _FIELDS]
    if unknown:
        raise _fail(index, unknown[0], "unknown field")
    prompt_hash = item.get("prompt_hash")
    if prompt_hash is not None and (type(prompt_hash) is not str or not _HEX.fullmatch(prompt_hash)):
        raise _fail(index, "prompt_hash", "expected 16-128 lowercase hex digits (a hash, never the prompt)")
    status = item.get("status", "ok")
    if type(status) is not str or not _STATUS.fullmatch(status):
        raise _fail(index, "status", "expected a short lowercase word such as ok, error, cancelled")
    cached = item.get("cached", False)
    if type(cached) is not bool:
        raise _fail(index, "cached", "expected a boolean")
    return UsageRecord(
        request_id=_text(index, item, "request_id", 128),  # type: ignore[arg-type]
        user_id=_int(index, item, "user_id", _MAX_ID),  # type: ignore[arg-type]
        key_id=_int(index, item, "key_id", _MAX_ID, optional=True),
        model=_text(index, item, "model", 200),  # type: ignore[arg-type]
        prompt_hash=prompt_hash,
        prompt_tokens=_int(index, item, "prompt_tokens", _MAX_INT32, default=0),  # type: ignore[arg-type]
        completion_tokens=_int(index, item, "completion_tokens", _MAX_INT32, default=0),  # type: ignore[arg-type]
        cached=cached,
        latency_ms=_int(index, item, "latency_ms", _MAX_INT32, optional=True),
        status=status,
        worker=_text(index, item, "worker", 256, optional=True),
        created_at=_timestamp(index, item.get("at")),
        asked=_asked(index, item),
        tried=_tried(index, item),
        **_charged(index, item),
    )


def _dropped(index: int, item: dict[str, Any], field: str, why: str) -> None:
    log.warning("usage record field dropped", index=index, request_id=item.get("request_id"), field=field, why=why)


def _asked(index: int, item: dict[str, Any]) -> str | None:
    """`asked`: the model the caller named (an alias, `default`, a model); None when absent,
    malformed (dropped) or the model that served anyway."""
    value = item.get("asked")
    if value is None:
        return None
    if type(value) is not str or not 0 < len(value) <= 200 or not _TEXT.fullmatch(value):
        _dropped(index, item, "asked", "expected printable ASCII text of 1-200 characters")
        return None
    return None if value == item.get("model") else value


def _tried(index: int, item: dict[str, Any]) -> tuple[Attempt, ...] | None:
    """`tried`: the attempts that failed before the last, in order, each `{model, code}`; None
    when absent, empty or malformed (then dropped whole: a chain with a hole would mislead)."""
    value = item.get("tried")
    if value is None or value == []:
        return None
    if type(value) is not list or len(value) > MAX_TRIED:
        _dropped(index, item, "tried", f"expected a list of at most {MAX_TRIED} attempts")
        return None
    attempts = []
    for attempt in value:
        if type(attempt) is not dict or set(attempt) != {"model", "code"}:
            _dropped(index, item, "tried", "expected each attempt as {model, code}")
            return None
        model, code = attempt["model"], attempt["code"]
        if type(model) is not str or not 0 < len(model) <= 200 or not _TEXT.fullmatch(model):
            _dropped(index, item, "tried", "expected each attempt's model as printable ASCII text of 1-200 characters")
            return None
        if type(code) is not str or not _CODE.fullmatch(code):
            _dropped(index, item, "tried", "expected each attempt's code as an error code such as UNAVAILABLE")
            return None
        attempts.append(Attempt(model, code))
    return tuple(attempts)


def _charged(index: int, item: dict[str, Any]) -> dict[str, Any]:
    """`cost` and `currency`, given together or not at all: what the gateway charged."""
    cost, currency = item.get("cost"), item.get("currency")
    if cost is None and currency is None:
        return {}
    if type(cost) is not str or not _COST.fullmatch(cost):
        raise _fail(index, "cost", "expected a decimal string with at most 10 decimals, with currency")
    if type(currency) is not str or not _CURRENCY.fullmatch(currency):
        raise _fail(index, "currency", "expected an ISO 4217 code such as USD, with cost")
    return {"cost": Decimal(cost), "currency": currency}


def _timestamp(index: int, value: Any) -> datetime | None:
    """`at`: when the request happened, epoch seconds; None means now."""
    if value is None:
        return None
    if type(value) not in (int, float) or value != value:  # NaN
        raise _fail(index, "at", "expected epoch seconds")
    now = time.time()
    if not now - MAX_AGE_S <= value <= now + _MAX_AHEAD_S:
        raise _fail(index, "at", "too far in the past or the future")
    return datetime.fromtimestamp(value, timezone.utc)
