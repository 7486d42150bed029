"""ARPO's asynchronous tree rollout on the real engine: tools overlap generation, and the tree logic's results.

Runs on the folder's shared engine (the tool-calling tiny model), with the real `ToolExecutor` and tag protocol.
"""

import threading

from vllm_helpers import prompt_ids

from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor


class CountingEngine:
    """The real engine, counting the tokens it streams to requests other than `watched`."""

    def __init__(self, engine):
        self.engine, self.watched, self.others = engine, set(), 0
        self.changed = threading.Condition()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def stream(self, request_id, *args, **kwargs):
        async for update in self.engine.stream(request_id, *args, **kwargs):
            if request_id not in self.watched:
                with self.changed:
                    self.others += len(update.token_ids)
                    self.changed.notify_all()
            yield update


def test_a_blocked_tool_does_not_stop_the_other_trajectories(engine, tokenizer):
    """The first tool call blocks until the engine has streamed 8 more tokens to other trajectories: rounds (or
    any driver that waits on the tool) would never get them; the asynchronous driver does."""
    counting = CountingEngine(engine)
    lock, state = threading.Lock(), {"blocked": False}

    def blocking(expression: str) -> str:
        with lock:
            first, state["blocked"] = not state["blocked"], True
        if first:
            with counting.changed:
                start = counting.others
                assert counting.changed.wait_for(lambda: counting.others >= start + 8, timeout=60), "generation stalled"
        return calc(expression)

    blocking.__name__ = "calc"
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        RolloutSettings(group_size=4, initial_rollouts=4, entropy_window=4, max_completion_length=64),
        counting, protocol, ToolExecutor([blocking], timeout=90), BranchPolicy(0.0, 0.0, seed=0), len(tokenizer),
        tokenizer.eos_token_id, stop=protocol.stop_strings,
    )  # fmt: skip
    trajs, stats = rollout.run([prompt_ids(tokenizer, 3, 4, 5)] * 4, seed=1)
    assert state["blocked"] and stats.tool_executions >= 1
    assert all(t.done for t in trajs) and not any(t.tool_events[0].timed_out for t in trajs if t.tool_events)


def test_real_rollout_forks_share_prefixes_and_keep_exactly_m(engine, tokenizer):
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        RolloutSettings(group_size=4, initial_rollouts=2, entropy_window=4, max_completion_length=64),
        engine, protocol, ToolExecutor([calc], timeout=10), BranchPolicy(1.0, 0.0, seed=0), len(tokenizer),
        tokenizer.eos_token_id, stop=protocol.stop_strings,
    )  # fmt: skip
    prompts = [prompt_ids(tokenizer, 3, 4, 5)] * 4 + [prompt_ids(tokenizer, 7, 1, 9)] * 4
    trajs, stats = rollout.run(prompts, seed=2)
    assert [t.slot for t in trajs] == list(range(8)) and all(t.done for t in trajs)
    assert stats.branches + stats.fresh == 4
    for t in trajs:
        assert len(t.completion_ids) <= 64
        if t.kind == "branch":
            cut = t.fork_position
            assert t.completion_ids[:cut] == trajs[t.parent].completion_ids[:cut]
            assert tokenizer.decode(t.completion_ids[:cut]).endswith("</result>")
    assert len(stats.fork_prefills) == stats.branches > 0
    for prompt_tokens, cached in stats.fork_prefills:
        assert cached == (prompt_tokens - 1) // engine.block_size * engine.block_size  # every cacheable block


def test_speculative_forks_on_the_real_engine_are_kept_or_aborted(engine, tokenizer):
    """α = 1: every decision keeps its copy, which prefilled from the cache like any fork; α = 0: every copy is
    aborted in the engine (no request left behind) and the group still ends with M trajectories."""
    protocol = TagProtocol(tokenizer, ["calc"])
    for alpha in (1.0, 0.0):
        rollout = StreamDriver(
            RolloutSettings(group_size=4, initial_rollouts=2, entropy_window=4, max_completion_length=64,
                            speculative_forks=True),
            engine, protocol, ToolExecutor([calc], timeout=10), BranchPolicy(alpha, 0.0, seed=0), len(tokenizer),
            tokenizer.eos_token_id, stop=protocol.stop_strings,
        )  # fmt: skip
        trajs, stats = rollout.run([prompt_ids(tokenizer, 3, 4, 5)] * 4, seed=3)
        assert [t.slot for t in trajs] == list(range(4)) and all(t.done for t in trajs)
        assert stats.branches + stats.fresh == 2
        assert engine._engine.output_processor.get_num_unfinished_requests() == 0
        decisions = len(stats.branch_probabilities)
        assert decisions > 0
        if alpha == 1.0:
            assert stats.branches == 2 and stats.discarded_forks == 0
            for t in trajs[2:]:
                assert t.completion_ids[: t.fork_position] == trajs[t.parent].completion_ids[: t.fork_position]
            assert len(stats.fork_prefills) == 2
        else:
            assert stats.branches == 0 and stats.discarded_forks == decisions and stats.fresh == 2
