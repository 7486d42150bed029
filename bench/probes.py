"""The benchmark's measurement layer: per-step records, ARPO's rollout results, and wrappers where nothing else gives
a figure.

ARPO's rollout is read from its result, not timed by patching ARPO: `observe_rollouts` adds an observer to the
trainer's `on_rollout` seam, which receives each finished `RolloutResult` (trajectories, `RolloutStats`, wall
time). From it: rollout wall time (`result.seconds`), the time inside the generator's calls and the tool rounds
(`stats.generation_seconds`, `stats.tool_seconds`), sampled and completion tokens, completions, groups, tool calls
and executions, branches, fresh rollouts, rounds, and who ran each call.

Wrappers remain (`install_probes`, once, process-wide; each adds to the `StepRecord` of the `Probe` active on the
calling thread and does nothing outside a step) only where no result, metric or public hook gives the figure:

- transformers: `GenerationMixin.generate` (the model's own decoding time, its calls, rows × steps; both
  trainers), `StopStringCriteria.__call__` (stop-string checks inside generate; the criterion ARPO's generator
  hands to generate) and `StopStringCriteria.__init__` (its construction);
- TRL's `GRPOTrainer`: `_generate` (its rollout, completions, tokens), `_generate_single_turn` (its sampled
  tokens), `_tool_call_loop` (its tool calls) and `_calculate_rewards` (the reward, both trainers: ARPO scores
  with TRL's). TRL returns no result object and its `profiling_context` timers go only to wandb / MLflow /
  Trackio;
- ARPO, two figures its result does not carry: `EntropyRecorder.__call__` (the entropy hook's time while armed:
  `entropy_s`) and `RolloutTree.fill` (`tree_rounds`: the rounds until the last root or branch finished, the
  rest being the fresh fill). A `RolloutStats` field for each would retire these two.

`timed_tool` wraps a tool function (TRL calls tools one by one: its tool time). The figures are defined in the
docstring of `arpo_vs_grpo.py`.
"""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationMixin, StopStringCriteria
from trl import GRPOTrainer

from arpo_trl import ARPOTrainer
from arpo_trl.rollout.backends import RolloutResult
from arpo_trl.rollout.entropy import EntropyRecorder
from arpo_trl.rollout.tree import RolloutTree


@dataclass
class StepRecord:
    """What one trainer did in one optimizer step (sums over the step's generation batch)."""

    step: int = 0
    step_s: float = 0.0
    rollout_s: float = 0.0
    generate_s: float = 0.0
    generate_calls: int = 0
    decode_work: int = 0  # rows × decoding steps over every generate call
    decode_steps: int = 0  # decoding steps over every generate call (the rollout's critical path, in tokens)
    entropy_s: float = 0.0
    stop_check_s: float = 0.0
    stop_init_s: float = 0.0
    tools_s: float = 0.0
    engine_s: float = 0.0  # ARPO: the rollout's wall time (`RolloutResult.seconds`: the driver's run)
    generator_s: float = 0.0  # ARPO: inside the generator's calls (`RolloutStats.generation_seconds`)
    sampled_tokens: int = 0
    completions: int = 0
    groups: int = 0
    tool_calls: int = 0  # calls contained in the completions (shared prefixes counted per completion)
    tool_executions: int = 0  # calls actually run
    model_tokens: int = 0  # tool_mask == 1 tokens in the completions (shared prefixes counted per completion)
    completion_tokens: int = 0  # all completion tokens, tool results included
    branches: int = 0
    fresh: int = 0
    rounds: int = 0
    tree_rounds: int = 0  # ARPO: rounds until the last root or branch finished (the rest is the fresh fill)
    reward: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def derived(self) -> dict[str, float]:
        c, g = max(self.completions, 1), max(self.groups, 1)
        bookkeeping = self.rollout_s - self.generate_s - self.tools_s
        return {
            "tool_executions_per_completion": self.tool_executions / c,
            "tool_calls_per_completion": self.tool_calls / c,
            "sampled_tokens_per_completion": self.sampled_tokens / c,
            "decode_work_per_completion": self.decode_work / c,
            "model_tokens_per_completion": self.model_tokens / c,
            "rollout_s": self.rollout_s,
            "step_s": self.step_s,
            "train_s": self.step_s - self.rollout_s,
            "generate_s": self.generate_s,
            "entropy_s": self.entropy_s,
            "tools_s": self.tools_s,
            "bookkeeping_s": bookkeeping,
            "stop_check_s": self.stop_check_s,
            "stop_init_s": self.stop_init_s,
            "engine_overhead_s": self.engine_s - self.generator_s - self.tools_s if self.engine_s else 0.0,
            "generator_overhead_s": self.generator_s - self.generate_s if self.generator_s else 0.0,
            "entropy_pct_of_generate": 100 * self.entropy_s / self.generate_s if self.generate_s else 0.0,
            "bookkeeping_pct_of_rollout": 100 * bookkeeping / self.rollout_s if self.rollout_s else 0.0,
            "generate_calls": self.generate_calls,
            "tree_rounds": self.tree_rounds if self.rounds else self.generate_calls,
            "decode_steps": self.decode_steps,
            "branches_per_group": self.branches / g,
            "fresh_per_group": self.fresh / g,
            **(
                {
                    f"executions_by_{k}_per_completion": self.extra.get(f"executions_by_{k}", 0) / c
                    for k in ("root", "branch", "fresh")
                }
                if self.rounds  # ARPOTrainer only
                else {}
            ),
            "reward": self.reward,
        }


class Probe:
    """Accumulates the current step's figures of one trainer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current = StepRecord()
        self.steps: list[StepRecord] = []


_ACTIVE = threading.local()  # the probe of the trainer running on this thread


def active() -> Probe | None:
    return getattr(_ACTIVE, "probe", None)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed(attr: str):
    """Adds the wall time of the block to the active probe's `attr` (GPU work synchronised on both ends)."""
    probe = active()
    if probe is None:
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        rec = probe.current
        setattr(rec, attr, getattr(rec, attr) + time.perf_counter() - start)


def _patch(cls: type, name: str, make) -> None:
    original = getattr(cls, name)
    if getattr(original, "_bench_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._bench_wrapped = True
    setattr(cls, name, wrapper)


def add_rollout(rec: StepRecord, result: RolloutResult, num_generations: int) -> None:
    """Add one ARPO rollout's figures, read from its result, to `rec`."""
    trajs, stats = result.trajectories, result.stats
    rec.rollout_s += result.seconds
    rec.engine_s += result.seconds
    rec.generator_s += stats.generation_seconds
    rec.tools_s += stats.tool_seconds  # the rounds' tool executions (each round's calls run concurrently)
    rec.completions += len(trajs)
    rec.groups += len(trajs) // num_generations
    rec.completion_tokens += sum(len(t.completion_ids) for t in trajs)
    rec.model_tokens += sum(sum(t.tool_mask) for t in trajs)
    # Sampled and kept: a branch's tokens after its fork (its prefix is its parent's; a duplicate has none).
    rec.sampled_tokens += sum(sum(t.tool_mask[t.fork_position or 0 :]) for t in trajs)
    rec.tool_calls += sum(len(t.tool_events) for t in trajs)
    rec.tool_executions += stats.tool_executions
    rec.branches += stats.branches
    rec.fresh += stats.fresh
    rec.rounds += stats.rounds
    for t in trajs:  # who ran the calls: a call in a shared prefix is inherited
        own = sum(not e.inherited for e in t.tool_events)
        key = f"executions_by_{t.kind}"
        rec.extra[key] = rec.extra.get(key, 0) + own


def observe_rollouts(trainer: ARPOTrainer) -> None:
    """Hand each training rollout of `trainer` to the probe active on its thread, through the trainer's
    `on_rollout` seam (the observer already there still runs first)."""
    previous = trainer.on_rollout

    def on_rollout(mode: str, result: RolloutResult) -> None:
        previous(mode, result)
        probe = active()
        if probe is not None and mode == "train":
            add_rollout(probe.current, result, trainer.num_generations)

    trainer.on_rollout = on_rollout


def install_probes() -> None:
    """Wrap (once, process-wide) the methods whose figures no result or public hook gives (module docstring);
    inactive outside a step. ARPO's rollout itself is read with `observe_rollouts`."""

    def generate(original):
        def wrapper(self, *args, **kwargs):
            probe = active()
            if probe is None:
                return original(self, *args, **kwargs)
            with timed("generate_s"):
                out = original(self, *args, **kwargs)
            inputs = kwargs.get("input_ids", args[0] if args else None)
            seq = out.sequences if hasattr(out, "sequences") else out
            if inputs is not None and torch.is_tensor(seq):
                probe.current.decode_work += seq.shape[0] * (seq.shape[1] - inputs.shape[1])
                probe.current.decode_steps += seq.shape[1] - inputs.shape[1]
            probe.current.generate_calls += 1
            return out

        return wrapper

    _patch(GenerationMixin, "generate", generate)

    def entropy_hook(original):  # ARPO: no result or metric holds the hook's time
        def wrapper(self, *args, **kwargs):
            if self._steps is None or active() is None:  # disarmed: a training forward, or a row not measured
                return original(self, *args, **kwargs)
            with timed("entropy_s"):
                return original(self, *args, **kwargs)

        return wrapper

    _patch(EntropyRecorder, "__call__", entropy_hook)

    def simple(attr):
        def make(original):
            def wrapper(*args, **kwargs):
                with timed(attr):
                    return original(*args, **kwargs)

            return wrapper

        return make

    _patch(StopStringCriteria, "__call__", simple("stop_check_s"))
    _patch(StopStringCriteria, "__init__", simple("stop_init_s"))

    def fill(original):  # ARPO: the round driver calls it once per round, after the round's results are in
        def wrapper(self, *args, **kwargs):
            probe = active()
            if probe is not None and not getattr(self, "_bench_tree_done", False):
                if not any(t is not None and not t.done and t.kind != "fresh" for t in self.slots):
                    self._bench_tree_done = True
                    probe.current.tree_rounds += self.stats.rounds
            return original(self, *args, **kwargs)

        return wrapper

    _patch(RolloutTree, "fill", fill)

    def single_turn(original):  # TRL's GRPOTrainer: every generate of its rollout and tool loop goes through here
        def wrapper(self, *args, **kwargs):
            completion_ids, logprobs = original(self, *args, **kwargs)
            probe = active()
            if probe is not None and not isinstance(self, ARPOTrainer):
                probe.current.sampled_tokens += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

        return wrapper

    _patch(GRPOTrainer, "_generate_single_turn", single_turn)

    def tool_loop(original):
        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            probe = active()
            if probe is not None:
                probe.current.tool_calls += out[4]
                probe.current.tool_executions += out[4]
            return out

        return wrapper

    _patch(GRPOTrainer, "_tool_call_loop", tool_loop)

    def rollout(original):  # TRL's GRPOTrainer (ARPOTrainer's rollout comes through `observe_rollouts`)
        def wrapper(self, prompts):
            probe = active()
            if probe is None or isinstance(self, ARPOTrainer):
                return original(self, prompts)
            with timed("rollout_s"):
                out = original(self, prompts)
            rec = probe.current
            _, completion_ids, tool_mask, *_ = out
            rec.completions += len(completion_ids)
            rec.groups += len(completion_ids) // self.num_generations
            rec.completion_tokens += sum(len(ids) for ids in completion_ids)
            rec.model_tokens += sum(
                sum(mask) if mask is not None else len(ids)
                for ids, mask in zip(completion_ids, tool_mask or [None] * len(completion_ids))
            )
            return out

        return wrapper

    _patch(GRPOTrainer, "_generate", rollout)

    def rewards(original):  # TRL's, which ARPOTrainer scores with too
        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            probe = active()
            if probe is not None:
                probe.current.reward = float(torch.nansum(out, dim=1).mean())
            return out

        return wrapper

    _patch(GRPOTrainer, "_calculate_rewards", rewards)


def timed_tool(fn):
    """The tool with its own time added to the active probe (TRL calls tools one by one: this is its tool time)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        probe = active()
        if probe is None or isinstance(getattr(_ACTIVE, "trainer", None), ARPOTrainer):
            return fn(*args, **kwargs)  # ARPO's tool time is its result's: each round's concurrent calls, wall time
        with timed("tools_s"):
            return fn(*args, **kwargs)

    return wrapper
