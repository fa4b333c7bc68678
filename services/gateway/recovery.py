"""The usage journal's entries, and what a restarted gateway makes of them.

Entries of the usage journal (journal.py), written by accounts.py:

    {"t":"L","l":17}                                 lease 17 opened
    {"t":"A","r":"gw-…","p":[[17,1],[18,300]],"u":{…}} request admitted, holding units of leases
    {"t":"D","r":"gw-…","p":[[17,1],[18,42]],"rec":{…}}  request done: units kept, its usage record

`D` entries carry the usage records the shipper sends to auth. `A` and `L`
entries let a restarted gateway give back exactly what its leases did not
use (README.md, "Limits", "Accounting"):

    journal = usage_journal(directory)
    journal.open()
    replay = replay_journal(journal, Accounts.interrupted)  # cut requests get their `D`
    ...                                                    # once the quota runs:
    await close_earlier_leases(store, await store.prior_leases(gateway, incarnation),
                               replay.used, replay.leases)

The usage records carry a hash of the prompt, never the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.logging import get_logger
from services.gateway.journal import Journal, Shipping
from services.gateway.store import PriorLease, QuotaStore

__all__ = [
    "USAGE_RECORDS",
    "Replay",
    "admitted_entry",
    "close_earlier_leases",
    "done_entry",
    "lease_entry",
    "replay_journal",
    "usage_journal",
]

log = get_logger(__name__)

USAGE_RECORDS = Shipping(b'{"t":"D"', "rec")  #: the `D` entries' records are shipped


def usage_journal(directory: Path, *, segment_bytes: int = 16 << 20, fsync: bool = False) -> Journal:
    """The journal of these entries in `directory`, shipping the usage records."""
    return Journal(directory, shipping=USAGE_RECORDS, segment_bytes=segment_bytes, fsync=fsync)


def lease_entry(lease_id: int) -> dict[str, Any]:
    return {"t": "L", "l": lease_id}


def admitted_entry(request_id: str, held: list[list[int]], stub: dict[str, Any]) -> dict[str, Any]:
    return {"t": "A", "r": request_id, "p": held, "u": stub}


def done_entry(request_id: str, kept: list[list[int]], record: dict[str, Any]) -> dict[str, Any]:
    return {"t": "D", "r": request_id, "p": kept, "rec": record}


@dataclass
class Replay:
    """What the journal of earlier runs says (see `replay_journal`)."""

    leases: set[int] = field(default_factory=set)  #: leases whose whole history is here
    used: dict[int, int] = field(default_factory=dict)  #: lease id -> units its requests kept
    interrupted: list[dict[str, Any]] = field(default_factory=list)  #: records written for cut requests
    entries: int = 0
    torn: int = 0  #: unreadable lines (a write cut by a crash)


def replay_journal(
    journal: Journal, interrupted_record: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> Replay:
    """Read what earlier runs wrote to `journal` (just opened, nothing shipped yet).

    `interrupted_record(admitted_entry) -> record` makes the usage record of a
    request that was admitted but never finished (the process died); those
    records are appended as `D` entries, so they are shipped like any other.
    """
    replay = Replay()
    admitted: dict[str, dict[str, Any]] = {}
    for entry in journal.earlier():
        if "t" not in entry:
            replay.torn += 1
            continue
        kind = entry["t"]
        replay.entries += 1
        if kind == "L":
            replay.leases.add(entry["l"])
        elif kind == "A":
            admitted[entry["r"]] = entry
        elif kind == "D":
            admitted.pop(entry["r"], None)
            for lease_id, units in entry.get("p", []):
                replay.used[lease_id] = replay.used.get(lease_id, 0) + units
    replay.torn += journal.torn
    if replay.torn:
        log.warning("journal lines unreadable (cut by a crash?)", lines=replay.torn)
    for request_id, entry in admitted.items():
        record = interrupted_record(entry) if interrupted_record is not None else None
        held = entry.get("p", [])
        for lease_id, units in held:
            replay.used[lease_id] = replay.used.get(lease_id, 0) + units
        if record is not None:
            journal.append(done_entry(request_id, held, record))
            replay.interrupted.append(record)
    return replay  # old segments go once shipped, after the caller used `replay`


async def close_earlier_leases(
    store: QuotaStore, prior: list[PriorLease], used: Mapping[int, int], known: set[int]
) -> int:
    """Close this gateway's leases from an earlier run (`prior`); the units given back.

    A lease the journal knows (`known`) keeps exactly what its requests
    `used`; one it does not know keeps its `claimed` mark (what was possibly
    used), as a janitor would."""
    if not prior:
        return 0
    ids = [p.lease_id for p in prior]
    kept = [used.get(p.lease_id, 0) if p.lease_id in known else p.claimed for p in prior]
    answers = await store.release(ids, kept, [True] * len(ids))
    total = sum(a.returned for a in answers)
    log.info("leases of an earlier run closed", leases=len(answers), returned=total)
    return total
