"""The journal's entries for requests and leases (README.md, "Accounting";
their vocabulary and their replay after a crash: recovery.py).

`Accounts` writes, for the request that owns them (request.py):

* `admitted`: the units the request holds (an `A` entry), so a crash mid-
  request is still billed and its leases settled on restart;
* `recorded`: the usage record (a `D` entry) -- success, error, refusal,
  cancellation, or a stream cut after some text was delivered;
* `opened` / `closed`: the leases (`L` entries), as the quota's `LeaseLog`;

and reads back `interrupted`: the record of a request the process died in.
A record holds a SHA-256 of the prompt, never the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from services.gateway.journal import Journal
from services.gateway.quota import Admission
from services.gateway.recovery import admitted_entry, done_entry, lease_entry

__all__ = ["Accounts", "safe_model"]

_MODEL = re.compile(r"[\x20-\x7e]{1,200}")


def safe_model(model: str) -> str:
    """`model` as a record may keep it: printable ASCII, at most 200 characters."""
    return model if _MODEL.fullmatch(model) else "invalid"


class Accounts:
    """Journal entries for requests and leases (see the module doc)."""

    def __init__(self, journal: Journal, *, on_record: Callable[[], None] | None = None) -> None:
        self._journal = journal
        self._on_record = on_record or (lambda: None)

    # -- leases (the quota's LeaseLog) -------------------------------------------

    def opened(self, lease_id: int) -> None:
        self._journal.append(lease_entry(lease_id))
        self._journal.begin(("lease", lease_id))

    def closed(self, lease_id: int) -> None:
        self._journal.end(("lease", lease_id))

    # -- requests -------------------------------------------------------------------

    def admitted(self, request_id: str, stub: dict[str, Any], admission: Admission) -> None:
        """The request holds its quota and goes to a worker (an `A` entry, even
        with no limit to hold: a crash from here on is billed on restart).
        `stub` is what bills it then (see `interrupted`)."""
        self._journal.append(admitted_entry(request_id, admission.reserved(), stub))
        self._journal.begin(("request", request_id))

    def recorded(self, record: dict[str, Any], admission: Admission | None) -> None:
        """The request's usage record (a `D` entry), with what its leases keep."""
        request_id = record["request_id"]
        self._journal.append(done_entry(request_id, admission.finals() if admission else [], record))
        self._journal.end(("request", request_id))  # none begun for a request refused before admission
        self._on_record()

    @staticmethod
    def interrupted(entry: dict[str, Any]) -> dict[str, Any]:
        """The record of a request the process died in the middle of (from its `A` entry).

        What it delivered is unknown: it is billed no tokens, while its quota
        units stay counted (the safe side of the limit)."""
        stub = entry.get("u", {})
        return {
            "request_id": entry["r"], "user_id": stub.get("user_id"), "key_id": stub.get("key_id"),
            "model": stub.get("model") or "invalid", "prompt_hash": stub.get("prompt_hash"),
            "prompt_tokens": 0, "completion_tokens": 0, "cached": False, "latency_ms": None,
            "status": "interrupted", "worker": None, "at": stub.get("at"),
        }
