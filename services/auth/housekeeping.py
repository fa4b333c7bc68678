"""Background chores of an auth instance: `last_used_at` in batches, pruning.

`validate_key` answers from memory; writing `last_used_at` on every call would
put the database back on the hot path. Instead each use is noted in a dict
(one set insertion) and written every `flush_interval` seconds in one UPDATE.

Every `prune_interval` seconds (and at the first round) old rows go: those
`AuthStore.prune` knows, and all but the `dead_letters_max` newest dead letters
(INFERSWARM_DEAD_LETTERS_MAX; dead_letter_store.py). Every instance prunes;
two at once delete the same rows, harmlessly. The same round has `usage`'s
monthly partitions made ahead and those past INFERSWARM_USAGE_RETENTION_MONTHS
dropped (partitions.py; two instances take turns there).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from shared.logging import get_logger
from shared.tasks import Background
from services.auth.dead_letter_store import DeadLetterStore
from services.auth.partitions import UsagePartitions
from services.auth.store import AuthStore

__all__ = ["Housekeeper"]

log = get_logger(__name__)


class Housekeeper:
    """Flushes key use times and prunes old rows, until closed. `partitions`: those of `usage`
    (None: made ahead, none dropped)."""

    def __init__(
        self, store: AuthStore, *, flush_interval: float = 2.0, prune_interval: float = 600.0,
        keep_seconds: float = 86_400.0, dead_letters_max: int = 10_000,
        partitions: UsagePartitions | None = None,
    ) -> None:
        self._store = store
        self._dead_letters = DeadLetterStore(store.pool)
        self.partitions = partitions or UsagePartitions(store.pool)
        self._dead_letters_max = dead_letters_max
        self._flush_interval = flush_interval
        self._prune_interval = prune_interval
        self._keep_seconds = keep_seconds
        self._used: set[int] = set()
        self._background = Background()

    def touch(self, key_id: int) -> None:
        """Note that a key was used (the hot path: one set insertion).

        The time written is the flush's, so `last_used_at` may be up to
        `flush_interval` late -- fine for "last used" on a dashboard.
        """
        self._used.add(key_id)

    async def flush(self) -> None:
        used, self._used = self._used, set()
        if used:
            now = datetime.now(timezone.utc)
            try:
                await self._store.touch_keys(dict.fromkeys(used, now))
            except Exception:
                self._used |= used  # try again next time
                raise

    async def prune(self) -> None:
        """One pruning round: old rows of `AuthStore.prune`, dead letters past the bound, `usage`'s
        partitions (the months ahead made, those past the retention dropped)."""
        await self._store.prune(self._keep_seconds)
        dropped = await self._dead_letters.prune(self._dead_letters_max)
        if dropped:
            log.info("dead letters pruned", dropped=dropped, kept=self._dead_letters_max)
        await self.partitions.maintain()

    async def __aenter__(self) -> Housekeeper:
        self._background.start(self._run(), name="auth housekeeping")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        try:
            await self.flush()
        except Exception as exc:
            log.warning("could not flush key use times", error=str(exc))

    async def _run(self) -> None:
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self._prune_interval
                    await self.prune()
            except Exception as exc:
                log.warning("housekeeping failed", error=str(exc))
