"""EventBus: the timestamped facts of one Env's run, for the dashboard.

The bus owns the event record (`Event`), the replay history and fan-out to subscribers. It
does not know what an event means for a node or a step: a `reducer` given to the bus (the
dashboard's `StatusBoard`) applies each event to the current state, under the bus's lock, so
that a new subscriber gets a state snapshot and a history that agree with each other.

Rules (the dashboard depends on them; tests/test_web_eventbus.py pins them):

- `publish` stamps the event with the wall-clock time and a sequence number.
- History keeps the newest `HISTORY_SIZE` (500) events, **except screenshots**: they are
  large and only the latest matters, and that one is kept in the node's status.
- `subscribe` returns a `Subscription` whose queue starts with the history, oldest first,
  then receives live events in publication order.
- Publishers never block: a subscriber whose queue holds `QUEUE_SIZE` events misses new
  ones (counted in `Subscription.missed`) until it catches up.

Thread-safety: `publish` may be called from any thread (the Env's loop, the test thread at
teardown); `Subscription.get` is awaited on the loop the subscription was made on.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import StateError

__all__ = ["EventKind", "Event", "EventBus", "Subscription", "HISTORY_SIZE", "QUEUE_SIZE"]

#: Events a new subscriber is given first (screenshots excluded).
HISTORY_SIZE = 500
#: Events one subscriber may have waiting; past that it misses events rather than slowing
#: every publisher (a stalled browser tab must not stall vnet or a boot).
QUEUE_SIZE = 1000


class EventKind(str, enum.Enum):
    """What happened. The values are the `kind` strings the page's script switches on."""
    STEP_CHANGED = "step_changed"
    CONSOLE = "console_output"
    DHCP_DISCOVER = "dhcp_discover"
    DHCP_OFFER = "dhcp_offer"
    DHCP_REQUEST = "dhcp_request"
    DHCP_ACK = "dhcp_ack"
    DHCP_NAK = "dhcp_nak"
    AGENT_CONNECTED = "agent_connected"
    AGENT_DISCONNECTED = "agent_disconnected"
    NIC_STATIC = "nic_static"      # the host channel gave a restored node its address
    NODE_STATE = "node_state"
    SCREENSHOT = "screenshot"
    TEST_STATUS = "test_status"


@dataclass(frozen=True)
class Event:
    """One fact. `node` is "" for Env-wide events; `message` is human text; `data` holds the
    structured details the page needs (an IP, a step record, a thumbnail data URI)."""
    kind: EventKind
    node: str = ""
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0  # Unix seconds, set by publish
    seq: int = 0       # 1-based publication order, set by publish

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "node": self.node, "message": self.message,
                "data": self.data, "time": self.time, "seq": self.seq}


class Subscription:
    """A subscriber's bounded queue. Made by `EventBus.subscribe`; `close()` when done."""

    def __init__(self, bus: "EventBus", loop: asyncio.AbstractEventLoop, capacity: int,
                 snapshot: Any):
        self._bus = bus
        self._loop = loop
        self._capacity = capacity
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()
        #: What the bus's `snapshot` function returned at subscription time, taken under the
        #: same lock as the history copy (so: state as of the last replayed event).
        self.snapshot = snapshot
        #: Events this subscriber missed because its queue was full.
        self.missed = 0
        self.closed = False

    def _offer(self, event: Event) -> None:
        # Called with the bus lock held, from any thread.
        if len(self._queue) >= self._capacity:
            self.missed += 1
            return
        self._queue.append(event)
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def pending(self) -> int:
        return len(self._queue)

    def get_nowait(self) -> Event | None:
        with self._bus._lock:
            return self._queue.popleft() if self._queue else None

    async def get(self) -> Event:
        """The next event, waiting for one if none is queued."""
        while True:
            if self.closed:
                raise StateError("Subscription.get after close(); subscribe again")
            with self._bus._lock:
                if self._queue:
                    return self._queue.popleft()
                self._wake.clear()
            await self._wake.wait()

    def close(self) -> None:
        self.closed = True
        self._bus._unsubscribe(self)
        self._wake.set()


class EventBus:
    """Timestamps events, keeps the replay history, fans out to subscribers.

    ``bus.publish(Event(EventKind.CONSOLE, "alice", "vmlab-init: starting agent"))``
    """

    def __init__(self, *, history_size: int = HISTORY_SIZE, queue_size: int = QUEUE_SIZE,
                 reducer: Callable[[Event], None] | None = None,
                 snapshot: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.time):
        self._lock = threading.Lock()
        self._history: deque[Event] = deque(maxlen=history_size)
        self._subs: list[Subscription] = []
        self._queue_size = queue_size
        self._reducer = reducer
        self._snapshot = snapshot
        self._clock = clock
        self._seq = itertools.count(1)

    def publish(self, event: Event) -> Event:
        """Stamp `event`, apply it to the state, record it and hand it to every subscriber.
        Never blocks on a subscriber. Returns the stamped event."""
        with self._lock:
            event = Event(event.kind, event.node, event.message, event.data,
                          self._clock(), next(self._seq))
            if self._reducer is not None:
                self._reducer(event)
            if event.kind is not EventKind.SCREENSHOT:
                self._history.append(event)
            for sub in self._subs:
                sub._offer(event)
        return event

    def history(self) -> list[Event]:
        with self._lock:
            return list(self._history)

    def subscribe(self, *, capacity: int | None = None) -> Subscription:
        """A new subscription on the running loop, its queue pre-filled with the history.
        Must be called from a coroutine (it binds to the running loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            snap = self._snapshot() if self._snapshot is not None else None
            sub = Subscription(self, loop, capacity or self._queue_size, snap)
            for event in self._history:
                sub._offer(event)
            self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subs)
