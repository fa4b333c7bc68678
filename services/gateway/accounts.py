"""Exactly one usage record per request, in the journal before the reply.

`Job` is one `gateway.infer` call as it will be billed. `Accounts` writes
its journal entries (README.md, "Accounting"):

* `admitted`: the units the request holds (an `A` entry), so a crash mid-
  request is still billed and its leases settled on restart;
* `finished`: the usage record (a `D` entry) -- success, error, refusal,
  cancellation, or a stream cut after some text was delivered;
* `opened` / `closed`: the leases (`L` entries), as the quota's `LeaseLog`.

A record holds a SHA-256 of the prompt, never the prompt.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.gateway.journal import Journal
from services.gateway.quota import Admission

__all__ = ["Job", "Accounts"]

_MODEL = re.compile(r"[\x20-\x7e]{1,200}")


@dataclass(slots=True)
class Job:
    """One `gateway.infer` call, as it will be billed."""

    request_id: str
    user_id: int
    key_id: int | None
    model: str
    started: float = field(default_factory=time.monotonic)
    at: float = field(default_factory=time.time)
    prompt_hash: str | None = None
    admission: Admission | None = None
    recorded: bool = False
    #: A worker took the request (its stream opened, or it was working on it
    #: when the caller's deadline passed or the caller left): it consumes its
    #: request counts even if no text was delivered (README.md, "Accounting").
    reached: bool = False
    #: The worker that had it when it was cut before its stream opened (its record names it).
    worker: str | None = None
    #: The prompt's tokens as the worker reported them with its first text chunk.
    prompt_tokens: int = 0

    def stub(self) -> dict[str, Any]:
        """What an `A` entry keeps to bill the request if the process dies."""
        return {"user_id": self.user_id, "key_id": self.key_id, "model": _model(self.model),
                "prompt_hash": self.prompt_hash, "at": round(self.at, 3)}


def _model(model: str) -> str:
    return model if _MODEL.fullmatch(model) else "invalid"


class Accounts:
    """Journal entries for requests and leases (see the module doc)."""

    def __init__(self, journal: Journal, *, on_record: Callable[[], None] | None = None) -> None:
        self._journal = journal
        self._on_record = on_record or (lambda: None)

    # -- leases (the quota's LeaseLog) -------------------------------------------

    def opened(self, lease_id: int) -> None:
        self._journal.append({"t": "L", "l": lease_id})
        self._journal.begin(("lease", lease_id))

    def closed(self, lease_id: int) -> None:
        self._journal.end(("lease", lease_id))

    # -- requests -------------------------------------------------------------------

    def admitted(self, job: Job, admission: Admission) -> None:
        """The request holds its quota and goes to a worker (an `A` entry, even
        with no limit to hold: a crash from here on is billed on restart)."""
        job.admission = admission
        self._journal.append({"t": "A", "r": job.request_id, "p": admission.reserved(), "u": job.stub()})
        self._journal.begin(("request", job.request_id))

    def finished(
        self, job: Job, status: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
        cached: bool = False, worker: str | None = None,
    ) -> dict[str, Any] | None:
        """Write the request's usage record (once; later calls do nothing)."""
        if job.recorded:
            return None
        job.recorded = True
        record: dict[str, Any] = {
            "request_id": job.request_id, "user_id": job.user_id, "key_id": job.key_id,
            "model": _model(job.model), "prompt_hash": job.prompt_hash,
            "prompt_tokens": max(0, int(prompt_tokens)), "completion_tokens": max(0, int(completion_tokens)),
            "cached": bool(cached), "latency_ms": int((time.monotonic() - job.started) * 1000),
            "status": status, "worker": worker if worker and len(worker) <= 256 else None,
            "at": round(job.at, 3),
        }
        admission = job.admission
        self._journal.append({"t": "D", "r": job.request_id, "p": admission.finals() if admission else [],
                              "rec": record})
        if admission is not None:
            self._journal.end(("request", job.request_id))
        self._on_record()
        return record

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
