"""A tool written for TRL (bounded by ``signal.alarm``, so main thread only) under the asynchronous vLLM driver: its
calls run on the main thread, which serves them while the engine's loop keeps streaming the other trajectories.

Runs on the folder's shared engine (the tool-calling tiny model), with the real `ToolExecutor` and tag protocol.
"""

import signal
import threading

from vllm_helpers import prompt_ids

from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor, execution_mode


class CountingEngine:
    """The real engine, counting the tokens it streams."""

    def __init__(self, engine):
        self.engine, self.streamed = engine, 0
        self.changed = threading.Condition()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def stream(self, request_id, *args, **kwargs):
        async for update in self.engine.stream(request_id, *args, **kwargs):
            with self.changed:
                self.streamed += len(update.token_ids)
                self.changed.notify_all()
            yield update


def test_an_alarm_bounded_tool_runs_on_the_main_thread_while_vllm_streams(engine, tokenizer):
    counting = CountingEngine(engine)
    ran_on = []

    def alarm_calc(expression: str) -> list:
        """
        Add numbers, within 30 s.

        Args:
            expression: numbers joined by +.
        """
        ran_on.append(threading.current_thread() is threading.main_thread())
        second = len(ran_on) == 2

        def give_up(signum, frame):
            raise TimeoutError("too slow")

        previous = signal.signal(signal.SIGALRM, give_up)  # ValueError anywhere but the main thread
        signal.alarm(30)
        try:
            if second:  # holds the main thread until the first call's trajectory has streamed on after its result
                with counting.changed:
                    start = counting.streamed
                    assert counting.changed.wait_for(lambda: counting.streamed >= start + 4, timeout=60), "stalled"
            return [calc(expression)]
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    alarm_calc.__name__ = "calc"
    assert execution_mode(alarm_calc) == "main_thread"
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        RolloutSettings(group_size=4, initial_rollouts=4, entropy_window=4, max_completion_length=64),
        counting, protocol, ToolExecutor([alarm_calc]), BranchPolicy(0.0, 0.0, seed=0), len(tokenizer),
        tokenizer.eos_token_id, stop=protocol.stop_strings,
    )  # fmt: skip
    trajs, stats = rollout.run([prompt_ids(tokenizer, 3, 4, 5)] * 4, seed=1)
    assert len(ran_on) >= 2 and all(ran_on)  # every call on the main thread, the second one held it
    # Every call that reached the tool succeeded (the alarm could be set); the others are malformed calls the sampled
    # model wrote, answered without running.
    assert stats.tool_errors == stats.tool_executions - len(ran_on)
    texts = [tokenizer.decode(t.completion_ids) for t in trajs]
    assert not any("main thread" in text for text in texts) and all(t.done for t in trajs)
