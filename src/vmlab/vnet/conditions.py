"""Link conditions: latency, jitter, loss and bandwidth on delivery to a network's NICs.

Owns: `LinkConditions` (the user's frozen spec, validated when built) and `Shaper`, which
turns "deliver this frame to that port now" into "deliver it at time T", "deliver it now"
or "drop it", and hands back due frames when asked. Sans-I/O: every call gets `now`, and
the runtime arms its timer on `next_deadline()` (via `VNet.next_deadline`).

Leaves to others: which frames are conditioned (VNet applies a network's shaper to every
frame it delivers to a NIC of that network, whether switched on the LAN, routed from
another network or sent by a VIP; frames a node sends are not delayed on the way in, as in
natlab's `conditionedWrite`, so a round trip between two networks pays both latencies),
cutting links and blackholing WANs (`Port.link_up`, `Router.blackholed`).

Model, per NIC: a frame first waits for the link to be free (`bandwidth_kbit`, a FIFO
serialiser like a real link), then travels `latency_ms` plus a uniform `jitter_ms` in
[-jitter, +jitter] (clamped at 0). Delivery order per NIC is kept (a frame never overtakes
an earlier one), because reordering is a different impairment from delay variation and
makes guest TCP misbehave in ways a test rarely wants; netem reorders with jitter, we don't.
Loss is an independent uniform drop per frame, decided on arrival at the shaper.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .switch import Emit, Port

__all__ = ["LinkConditions", "Shaper", "MAX_QUEUED_FRAMES"]

#: Frames held per network (delayed or waiting for bandwidth) beyond which new ones are
#: dropped, like a router's full buffer: a guest flooding a slow link cannot grow memory.
MAX_QUEUED_FRAMES = 20_000


@dataclass(frozen=True)
class LinkConditions:
    """How a network's links behave. ``LinkConditions(latency_ms=50, loss=0.01)``.

    latency_ms: one-way delay added to every frame delivered to a NIC of the network.
    jitter_ms: uniform variation in [-jitter_ms, +jitter_ms] around the latency.
    loss: probability (0.0 to 1.0) that a frame is dropped.
    bandwidth_kbit: per-NIC link rate in kbit/s (None: unlimited).
    """
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    bandwidth_kbit: float | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v > 60_000:
                raise ConfigError(f"link conditions: {name}={v!r} must be a number of "
                                  f"milliseconds in [0, 60000]")
        if not isinstance(self.loss, (int, float)) or not 0.0 <= self.loss <= 1.0:
            raise ConfigError(f"link conditions: loss={self.loss!r} is a probability; give a "
                              f"number in [0.0, 1.0] (0.01 is 1 %)")
        bw = self.bandwidth_kbit
        if bw is not None and (not isinstance(bw, (int, float)) or not math.isfinite(bw)
                               or bw <= 0):
            raise ConfigError(f"link conditions: bandwidth_kbit={bw!r} must be a positive "
                              f"number of kbit/s, or None for unlimited")

    @property
    def is_ideal(self) -> bool:
        return (self.latency_ms == 0 and self.jitter_ms == 0 and self.loss == 0
                and self.bandwidth_kbit is None)


class Shaper:
    """Applies one network's `LinkConditions` to frames on their way to its NICs."""

    def __init__(self, conditions: LinkConditions, rng: random.Random):
        self.conditions = conditions
        self._rng = rng
        #: (deliver_at, tiebreak, port, frame), earliest first
        self._heap: list[tuple[float, int, "Port", bytes]] = []
        self._tiebreak = itertools.count()
        #: per port: (link free at, last delivery time); ports are bounded by the network's
        #: NICs, and entries go when the port is forgotten
        self._ports: dict["Port", tuple[float, float]] = {}
        self.drops: dict[str, int] = {}

    def set_conditions(self, conditions: LinkConditions) -> None:
        """Change the conditions; frames already in flight keep their delivery times."""
        self.conditions = conditions

    def forget(self, port: "Port") -> None:
        self._ports.pop(port, None)

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def submit(self, port: "Port", frame: bytes, now: float) -> bool:
        """Take a frame for `port`. True: deliver it now. False: dropped or scheduled (it
        comes out of `due` later)."""
        c = self.conditions
        if c.loss and self._rng.random() < c.loss:
            self._drop("loss (link conditions)")
            return False
        free_at, last_at = self._ports.get(port, (0.0, 0.0))
        if c.is_ideal and last_at <= now:
            return True
        if len(self._heap) >= MAX_QUEUED_FRAMES:
            self._drop(f"shaper queue full ({MAX_QUEUED_FRAMES} frames)")
            return False
        start = max(now, free_at)
        done = start
        if c.bandwidth_kbit is not None:
            done = start + len(frame) * 8 / (c.bandwidth_kbit * 1000.0)
        delay = c.latency_ms
        if c.jitter_ms:
            delay += self._rng.uniform(-c.jitter_ms, c.jitter_ms)
        at = max(done + max(delay, 0.0) / 1000.0, last_at)  # FIFO per port: no overtaking
        self._ports[port] = (done, at)
        if at <= now:
            return True
        heapq.heappush(self._heap, (at, next(self._tiebreak), port, frame))
        return False

    def due(self, now: float) -> list["Emit"]:
        """Frames whose time has come, in delivery order."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _at, _, port, frame = heapq.heappop(heap)
            out.append((port, frame))
        return out

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    @property
    def queued(self) -> int:
        return len(self._heap)
