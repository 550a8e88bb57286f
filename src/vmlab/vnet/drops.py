"""Drop counters: why vnet dropped packets, by reason, in a bounded table.

Reasons often name addresses ("no route to 9.9.9.9"), so a guest scanning the address space
would grow a plain dict without end. `count_drop` keeps at most MAX_DROP_REASONS entries
per table, the last being OVERFLOW_REASON, which counts every other reason. Logging the drop stays
the caller's business.
"""
from __future__ import annotations

__all__ = ["count_drop", "MAX_DROP_REASONS", "OVERFLOW_REASON"]

#: Distinct reasons kept per table; enough for every reason a test looks for.
MAX_DROP_REASONS = 256
OVERFLOW_REASON = "other reasons (too many distinct reasons to count separately)"


def count_drop(table: dict[str, int], reason: str) -> None:
    if reason not in table and len(table) >= MAX_DROP_REASONS - 1:  # one slot for OVERFLOW
        reason = OVERFLOW_REASON
    table[reason] = table.get(reason, 0) + 1
