"""Steps: planning order, guarded transitions, elapsed times, the context manager."""
from __future__ import annotations

import pytest

from vmlab import Env
from vmlab.errors import StateError
from vmlab.steps import StepPlan, StepStatus


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_framework_steps_come_before_test_steps_whatever_the_order_declared():
    plan = StepPlan()
    plan.add("ping alice")
    plan.add("Launch: alice", framework=True)
    plan.add("Image: appliance", framework=True)
    assert [s.name for s in plan] == ["Launch: alice", "Image: appliance", "ping alice"]


def test_same_name_is_the_same_step():
    plan = StepPlan()
    assert plan.add("x") is plan.add("x")
    assert len(plan) == 1


def test_transitions_and_elapsed():
    clock = Clock()
    changes = []
    plan = StepPlan(on_change=lambda s: changes.append(s.status), clock=clock)
    step = plan.add("boot")
    assert step.status is StepStatus.PENDING and step.elapsed_s is None
    step.begin()
    clock.t += 1.5
    assert step.status is StepStatus.RUNNING and step.elapsed_s == pytest.approx(1.5)
    step.end()
    clock.t += 10
    assert step.status is StepStatus.DONE and step.elapsed_s == pytest.approx(1.5)
    assert changes == [StepStatus.PENDING, StepStatus.RUNNING, StepStatus.DONE]


@pytest.mark.parametrize("misuse", ["begin twice", "end pending", "end twice", "begin done"])
def test_misuse_raises_state_error(misuse):
    step = StepPlan().add("s")
    if misuse == "end pending":
        with pytest.raises(StateError, match="pending"):
            step.end()
        return
    step.begin()
    if misuse == "begin twice":
        with pytest.raises(StateError, match="running"):
            step.begin()
        return
    step.end()
    with pytest.raises(StateError, match="done"):
        step.begin() if misuse == "begin done" else step.end()


def test_context_manager_fails_the_step_on_error():
    plan = StepPlan()
    with pytest.raises(ValueError):
        with plan.add("s"):
            raise ValueError("boom")
    step = plan.get("s")
    assert step.status is StepStatus.FAILED and step.error == "ValueError: boom"


def test_fail_running_ends_only_running_steps():
    plan = StepPlan()
    plan.add("a").begin()
    plan.add("b")
    plan.fail_running("start failed")
    assert [s.status for s in plan] == [StepStatus.FAILED, StepStatus.PENDING]


def test_env_step_declares_and_publishes():
    env = Env(name="t")
    with env.step("my check") as step:
        assert step.status is StepStatus.RUNNING
    kinds = [(e.kind.value, e.data["status"]) for e in env.dashboard.bus.history()]
    assert kinds == [("step_changed", "pending"), ("step_changed", "running"),
                     ("step_changed", "done")]
    assert env.dashboard.board.snapshot()["steps"][0]["status"] == "done"
