"""The snapshot cache: boot each image once, save it with its agent waiting, and restore
clones of it for every test. `ensure_snapshot` is the entry point; see cache.py for the
key and layout, prepare.py and restore.py for the two halves."""
from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Callable

from .cache import (SNAPSHOT_CODE_VERSION, SnapshotEntry, SnapshotSpec, find, lock, new_tmp_dir,
                    publish, remove_stale)
from .prepare import prepare
from .restore import RestoreFailed, restore

__all__ = ["ensure_snapshot", "SnapshotSpec", "SnapshotEntry", "SNAPSHOT_CODE_VERSION",
           "restore", "RestoreFailed", "SnapshotUnusable"]

log = logging.getLogger("vmlab.snapshot")


class SnapshotUnusable(Exception):
    """The entry is broken; it is now marked so the next run rebuilds it. Nodes cold-boot."""


def _first_sighting(entry: SnapshotEntry, problem: str) -> None:
    """A broken entry seen for the first time is marked and the nodes cold-boot: the test goes
    on at once, and the next run (which finds the mark) pays for the rebuild."""
    if not entry.marked_bad():
        entry.mark_bad(problem)
        raise SnapshotUnusable(f"snapshot {entry.key} is unusable ({problem}); cold-booting "
                               f"this time, it is rebuilt on the next run")


async def ensure_snapshot(spec: SnapshotSpec, progress: Callable[[str], None]) -> SnapshotEntry:
    """The usable entry for `spec`, preparing it on a miss (once across processes)."""
    key = spec.key
    entry = find(key)
    if entry is not None:
        problem = entry.problem()
        if problem is None:
            return entry
        _first_sighting(entry, problem)
    held = lock(key)
    # flock blocks; take it off the loop so the other nodes' work goes on meanwhile.
    await asyncio.to_thread(held.__enter__)
    try:
        entry = find(key)  # another process may have prepared it while we waited
        if entry is not None:
            problem = entry.problem()
            if problem is None:
                return entry
            _first_sighting(entry, problem)
            progress(f"snapshot {spec.image.name}: rebuilding entry {key} ({problem})")
            shutil.rmtree(entry.path, ignore_errors=True)
        for stale in remove_stale(spec, key):
            log.info("removed stale snapshot entry %s", stale)
        tmp = new_tmp_dir(key)
        try:
            await prepare(spec, tmp, progress)
            return publish(tmp, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        held.__exit__(None, None, None)
