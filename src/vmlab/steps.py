"""Steps: the progress list of one Env, planned up front, then begun and ended.

`StepPlan` owns the list. `Env.start()` plans every framework step (image, snapshot, launch,
wait for agent, per node) before anything runs, so the dashboard shows the whole list from
the start; a test declares its own with `env.step("name")`, which are listed after the
framework's. Each `Step` goes pending -> running -> done or failed, once; any other
transition raises `StateError` (natlab's vmtest panics instead). A step is a context
manager: it begins on entry and ends on exit, failed if the block raised.

What a change means for the dashboard is not this module's concern: the plan calls
`on_change(step)` after every change, and the Env turns that into an EventBus event.
"""
from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from typing import Callable, Iterator

from .errors import ConfigError, StateError

__all__ = ["StepStatus", "Step", "StepPlan", "MAX_STEPS",
           "image_step", "snapshot_step", "launch_step", "agent_step"]

log = logging.getLogger("vmlab.steps")

#: A bound on one Env's list; a test adding steps in a loop is a bug the page could not show.
MAX_STEPS = 1000


# Names of the framework steps, in one place so planning and running agree.
def image_step(image: str) -> str:
    return f"Image: {image}"


def snapshot_step(image: str, nics: int = 1, memory_mb: int = 256) -> str:
    return f"Snapshot: {image} ({nics} NIC{'s' if nics != 1 else ''}, {memory_mb} MB)"


def launch_step(node: str) -> str:
    return f"Launch: {node}"


def agent_step(node: str) -> str:
    return f"Wait for agent: {node}"


class StepStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Step:
    """One entry of the progress list. ``with env.step("ping alice -> bob"): ...``"""

    def __init__(self, plan: "StepPlan", name: str, key: int, framework: bool,
                 clock: Callable[[], float]):
        self._plan = plan
        self.name = name
        self.key = key            # creation order; stable while test steps are added
        self.framework = framework
        self._clock = clock
        self.status = StepStatus.PENDING
        self.error: str | None = None
        self._began: float | None = None   # monotonic
        self._ended: float | None = None
        self.started_at: float | None = None  # Unix seconds, for the page's live timer

    def __repr__(self) -> str:
        return f"<Step {self.name!r} {self.status.value}>"

    @property
    def elapsed_s(self) -> float | None:
        """Seconds running so far (running) or in total (done, failed); None if pending."""
        if self._began is None:
            return None
        return (self._ended if self._ended is not None else self._clock()) - self._began

    def begin(self) -> "Step":
        with self._plan._lock:
            if self.status is not StepStatus.PENDING:
                raise StateError(f"step {self.name!r} is {self.status.value}; begin() is only "
                                 f"allowed once, on a pending step (declare a new step instead)")
            self.status = StepStatus.RUNNING
            self._began = self._clock()
            self.started_at = time.time()
        log.info("step %r began", self.name)
        self._plan._changed(self)
        return self

    def end(self, error: BaseException | str | None = None) -> None:
        """Finish the step: done, or failed with `error`."""
        with self._plan._lock:
            if self.status is not StepStatus.RUNNING:
                raise StateError(f"step {self.name!r} is {self.status.value}; end() is only "
                                 f"allowed on a running step (call begin() first, and end once)")
            self._ended = self._clock()
            if error is None:
                self.status = StepStatus.DONE
            else:
                self.status = StepStatus.FAILED
                self.error = error if isinstance(error, str) else (
                    f"{type(error).__name__}: {error}".splitlines()[0][:300])
        log.info("step %r %s in %.2f s%s", self.name, self.status.value, self.elapsed_s,
                 f": {self.error}" if self.error else "")
        self._plan._changed(self)

    def __enter__(self) -> "Step":
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(exc if exc is not None else None)

    def to_json(self) -> dict:
        return {"key": self.key, "name": self.name, "framework": self.framework,
                "status": self.status.value, "elapsed_s": self.elapsed_s,
                "started_at": self.started_at, "error": self.error}


class StepPlan:
    """The ordered steps of one Env: framework steps first, then the test's, each group in
    the order declared. Names are unique: asking for an existing name returns that step."""

    def __init__(self, on_change: Callable[[Step], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._lock = threading.RLock()
        self._steps: dict[str, Step] = {}
        self._keys = itertools.count(1)
        self._clock = clock
        self.on_change = on_change or (lambda step: None)

    def add(self, name: str, *, framework: bool = False) -> Step:
        """The step called `name`, created pending if new."""
        if not name or not isinstance(name, str):
            raise ConfigError(f"a step needs a non-empty name, got {name!r}")
        with self._lock:
            step = self._steps.get(name)
            if step is not None:
                return step
            if len(self._steps) >= MAX_STEPS:
                raise ConfigError(f"more than {MAX_STEPS} steps in one Env; reuse step names "
                                  f"instead of making one per iteration")
            step = self._steps[name] = Step(self, name, next(self._keys), framework, self._clock)
        self._changed(step)
        return step

    def get(self, name: str) -> Step:
        with self._lock:
            step = self._steps.get(name)
        if step is None:
            raise ConfigError(f"no step named {name!r}; steps: "
                              f"{', '.join(s.name for s in self)}")
        return step

    def begin(self, name: str) -> Step:
        """Begin the step `name`, planning it first if it was not (a framework step that only
        some code paths take)."""
        with self._lock:
            step = self._steps.get(name) or self.add(name, framework=True)
        return step.begin()

    def fail_running(self, error: BaseException | str) -> None:
        """End every running step as failed (an Env whose start() failed part-way)."""
        for step in self.steps():
            if step.status is StepStatus.RUNNING:
                try:
                    step.end(error)
                except StateError:  # ended by its own code meanwhile
                    pass

    def steps(self) -> list[Step]:
        with self._lock:
            return sorted(self._steps.values(), key=lambda s: (not s.framework, s.key))

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps())

    def __len__(self) -> int:
        return len(self._steps)

    def _changed(self, step: Step) -> None:
        try:
            self.on_change(step)
        except Exception:  # the dashboard must never break a test's step
            log.exception("step change listener failed for %r", step.name)
