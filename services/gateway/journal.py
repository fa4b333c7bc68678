"""An append-only log of JSON entries that outlives the gateway process.

    journal = Journal(directory, shipping=Shipping(b'{"t":"D"', "rec"))
    journal.open()                       # lock the directory, start a new segment
    for entry in journal.earlier(): ...  # what earlier runs appended (before appending)
    journal.append({"t": "D", "rec": {...}})
    journal.begin(tag) ... journal.end(tag)
    batch = journal.pending(500); ...; journal.shipped(batch[-1][0], len(batch))

Entries are JSON objects, one a line, in segment files `00000001.jsonl`, ...;
each run appends to a segment of its own. An append is one `write()` to the
page cache: it survives the process, not a power loss -- `fsync=True` adds
`fdatasync` to every append for that, at the cost of a disk flush per entry.

Some entries carry a record to ship elsewhere (`Shipping`: the line starts
with `prefix`, the record is `entry[field]`). `pending` hands them out in
order, `shipped` moves the `shipped` mark past them (written at most once a
second: a lost mark only sends again), across restarts. A segment is
deleted once every record in it was shipped and nothing that began in it or
before it (`begin(tag)` until `end(tag)`) is still live.

What the entries mean is their writers' business: for the gateway, the
usage records and the lease and request entries of recovery.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import deque
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from shared.logging import get_logger

__all__ = ["Journal", "Position", "Shipping"]

log = get_logger(__name__)

Position = tuple[int, int]  #: (segment, byte offset just after an entry)
_READ_CHUNK = 1 << 16
_MEMORY_RECORDS = 10_000
_MARK_EVERY = 1.0  #: seconds between writes of the shipped mark


class Shipping(NamedTuple):
    """Which entries carry a record to ship: those whose line starts with
    `prefix` (a test on bytes, so lines are parsed only for their records:
    the writer puts the distinguishing key first), the record in `field`."""

    prefix: bytes
    field: str


def _dump(entry: dict[str, Any]) -> bytes:
    """One JSON line, compact, keys in the order given (orjson: a twentieth of `json`'s time,
    and two entries are written per request)."""
    return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)


class Journal:
    """Segments of JSON lines in `directory`, a `shipped` mark, retention by liveness."""

    def __init__(
        self, directory: Path, *, shipping: Shipping | None = None, segment_bytes: int = 16 << 20,
        fsync: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.shipping = shipping
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._fd = -1
        self._lock_fd = -1
        self._segment = 0
        self._first = 0  #: the first segment of this run
        self._size = 0
        self._live: dict[Hashable, int] = {}  #: tag -> segment it began in
        self._mark: Position = (0, 0)
        self._read: Position = (0, 0)
        self._pending: deque[tuple[Position, dict[str, Any]]] = deque()
        self._mark_written = 0.0
        self.appended = 0  #: records to ship appended by this process
        self.shipped_count = 0
        self.torn = 0  #: unreadable lines met by `earlier` (writes cut by a crash)

    # -- opening, and the entries of earlier runs ----------------------------------

    def open(self) -> None:
        """Lock the directory (one process per journal) and start a new segment."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.directory} is in use by another gateway process") from None
        self._mark = self._read_mark()
        segments = self._segments()
        self._segment = self._first = (segments[-1] if segments else 0) + 1
        if self._mark < (segments[0] if segments else self._segment, 0):
            self._mark = (segments[0] if segments else self._segment, 0)
        self._read = self._mark
        self._open_segment()

    def earlier(self) -> Iterator[dict[str, Any]]:
        """The entries earlier runs appended, oldest first (read them before
        anything is shipped: shipped segments go). A line that is not a JSON
        object (a write cut by a crash) is skipped and counted in `torn`."""
        for segment in self._segments():
            if segment >= self._first:
                break
            with open(self._path(segment), "rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        entry = None
                    if not isinstance(entry, dict):
                        self.torn += 1
                        continue
                    yield entry

    def close(self) -> None:
        if self._lock_fd >= 0:
            self._write_mark()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- appending -------------------------------------------------------------

    def append(self, entry: dict[str, Any]) -> None:
        """Write one entry now (one `write()`; `fdatasync` too with `fsync`).

        While the shipper's reader is caught up, a record to ship is also kept
        in memory for it, so the file is read back only after a restart or
        when more than `_MEMORY_RECORDS` wait."""
        data = _dump(entry)
        if self._size + len(data) > self.segment_bytes and self._size > 0:
            caught_up = self._read == (self._segment, self._size)
            self._rotate()
            if caught_up:
                self._read = (self._segment, 0)
        before = (self._segment, self._size)
        os.write(self._fd, data)
        self._size += len(data)
        if self.fsync:
            os.fdatasync(self._fd)
        after = (self._segment, self._size)
        shipping = self.shipping
        record = shipping is not None and data.startswith(shipping.prefix)
        if record:
            self.appended += 1
        if self._read == before and (not record or len(self._pending) < _MEMORY_RECORDS):
            self._read = after
            if shipping is not None and record:
                self._pending.append((after, entry[shipping.field]))

    def begin(self, tag: Hashable) -> None:
        """Something that must be recoverable from this segment on is live."""
        self._live[tag] = self._segment

    def end(self, tag: Hashable) -> None:
        self._live.pop(tag, None)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._segment += 1
        self._open_segment()
        self._delete_shipped()

    def _open_segment(self) -> None:
        self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    # -- shipping --------------------------------------------------------------

    @property
    def unshipped(self) -> int:
        """Records appended by this process and not shipped yet (an estimate
        across restarts: earlier runs' records are not counted)."""
        return max(0, self.appended - self.shipped_count)

    def pending(self, limit: int) -> list[tuple[Position, dict[str, Any]]]:
        """Up to `limit` records to ship after the shipped mark, oldest first."""
        while len(self._pending) < limit and self._read_more():
            pass
        return [self._pending[i] for i in range(min(limit, len(self._pending)))]

    def shipped(self, position: Position, count: int) -> None:
        """Everything up to `position` reached auth: move the mark, forget, tidy."""
        while self._pending and self._pending[0][0] <= position:
            self._pending.popleft()
        self._mark = max(self._mark, position)
        self.shipped_count += count
        if time.monotonic() - self._mark_written >= _MARK_EVERY:  # a lost mark only resends
            self._write_mark()
        self._delete_shipped()

    def drop(self, position: Position) -> None:
        """Skip one pending record (auth refused it as invalid): never sent again."""
        self._pending = deque(p for p in self._pending if p[0] != position)

    def _read_more(self) -> bool:
        segment, offset = self._read
        path = self._path(segment)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(_READ_CHUNK)
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n")
        if end < 0:
            if segment < self._segment:  # a finished segment (its end may be torn): next one
                self._read = (segment + 1, 0)
                return True
            return False  # nothing yet, or an entry being written: wait for its newline
        position = offset
        shipping = self.shipping
        for line in data[: end + 1].splitlines(keepends=True):
            position += len(line)
            if shipping is not None and line.startswith(shipping.prefix):
                try:
                    self._pending.append(((segment, position), json.loads(line)[shipping.field]))
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable record to ship skipped", segment=segment, offset=position)
        self._read = (segment, position)
        return True

    def _read_mark(self) -> Position:
        try:
            segment, offset = (self.directory / "shipped").read_text().split()
            return int(segment), int(offset)
        except (FileNotFoundError, ValueError):
            return (0, 0)

    def _write_mark(self) -> None:
        self._mark_written = time.monotonic()
        path = self.directory / "shipped"
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{self._mark[0]} {self._mark[1]}\n".encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)

    # -- segments ----------------------------------------------------------------

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.jsonl") if p.stem.isdigit())

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:08d}.jsonl"

    def _delete_shipped(self) -> None:
        oldest_live = min(self._live.values(), default=self._segment)
        for segment in self._segments():
            if segment >= min(oldest_live, self._segment, self._mark[0]):
                break
            self._path(segment).unlink(missing_ok=True)
