"""A trajectory's state (`arpo_trl/rollout/trajectory.py`): a duplicate's slot and completion, a fork's copy of
every field and of its environment, the slot pool."""

from fakes import Counter

from arpo_trl.rollout.trajectory import DUPLICATE, SlotPool, ToolEvent, Trajectory


def test_a_duplicate_takes_its_slot_and_shares_the_whole_completion():
    last = Trajectory(slot=1, group=0, completion_ids=[5, 6, 7], tool_mask=[1, 0, 1], finish_reason="eos")
    twin = last.duplicate(3)
    assert (twin.slot, twin.parent, twin.kind, twin.finish_reason) == (3, 1, DUPLICATE, "eos")
    assert (
        twin.fork_position == 3 and twin.completion_ids == [5, 6, 7] and twin.completion_ids is not last.completion_ids
    )


def test_a_fork_copies_every_field_of_the_state_and_forks_the_environment():
    parent = Trajectory(slot=0, group=0, can_branch=False, h_initial=0.5, env=Counter("a"))
    parent.extend([1, 2], sampled=True, entropies=[0.1, 0.2], logprobs=[-0.1, -0.2])
    parent.messages.append({"role": "assistant", "content": "x"})
    parent.tool_rounds = 2
    parent.tool_events.append(ToolEvent(1, "calc", True, False))
    parent.tool_events.append(ToolEvent(2, "search", False, True))
    child = parent.fork(5)
    assert (child.slot, child.group, child.parent, child.fork_position) == (5, 0, 0, 2)
    assert (child.logprobs, child.tool_rounds, child.can_branch, child.h_initial) == ([-0.1, -0.2], 2, False, 0.5)
    assert child.messages == parent.messages
    child.messages[0]["content"] = "changed"
    assert parent.messages[0]["content"] == "x"  # a deep copy: the parent's turns are untouched
    assert isinstance(child.env, Counter) and child.env is not parent.env and child.env.name == "a"
    assert [(e.position, e.name, e.error, e.timed_out, e.inherited) for e in child.tool_events] == [
        (1, "calc", True, False, True),
        (2, "search", False, True, True),
    ]
    assert parent.tool_events[0].inherited is False
    assert Trajectory(slot=0, group=0).fork(1).env is None


def test_slot_pool_reclaims_only_as_many_lent_slots_as_asked():
    pool = SlotPool(1, 4, 1)
    assert pool.lend(0) == [1, 2, 3]
    assert pool.take(0, 1) == [3] and pool.free(0) == 2
