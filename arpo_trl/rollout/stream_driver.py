"""The asynchronous driver of ARPO's tree rollout: one vLLM request stream per trajectory, no rounds.

Same tree logic as the round driver (`tree.RolloutTree`), driven event by event on the engine's asyncio
loop (`vllm_engine.VLLMEngine`):

- Every trajectory is its own coroutine: stream a segment (a token-id prompt, the prefix so far), append it, run its
  tool calls in a worker thread (the `ToolExecutor`: bounded, timeouts, errors as results) while every other
  trajectory keeps generating, append the results, repeat. No trajectory waits for another.
- The branching decision at tool result t is taken as soon as the k tokens after it have streamed in
  (``entropy_timing="after_tool"``), or when the result is appended (``"lagged"``); the Z forks start at once as new
  coroutines whose prompts share the parent's prefix token for token, so vLLM's prefix cache serves their prefill.
- ``speculative_forks`` removes even that lag of k tokens: right after tool result t is appended, Z copies of the
  state start their own requests beside the parent's continuation; the decision at t then keeps them (they take
  their slots with what they have sampled so far) or aborts them. A copy's continuation does not depend on the
  parent's, nor the decision on the copy's, so a kept copy has the distribution of a fork started at the decision.
  The copies of one group never outnumber its free slots.
- Fresh top-ups start as soon as a group's tree can no longer use its slots. With speculative fill, a branch that
  reclaims a fresh rollout's slot aborts that rollout's request.

Entropies: ``entropy_estimator="exact"`` reads the engine's exact full-vocabulary entropy of each opted-in token
(computed in vLLM's worker at the sampling temperature); ``"top_k"`` is the official code's truncated entropy from
the top-10 logprobs plus the sampled token's (docs/reproduction.md), computed here from the stream.

Nothing in here is a collective: ranks whose trees branch differently never wait for each other.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..tools import ToolCall, ToolExecutor
from .branching import BranchPolicy
from .entropy import TOP_K_CANDIDATES, truncated_entropy
from .trajectory import BRANCH, Trajectory
from .tree import RolloutSettings, RolloutStats, RolloutTree, Segment, ToolProtocol, TreeDriver


@dataclass
class _Batch:
    """What every trajectory coroutine of one batch shares."""

    tree: RolloutTree
    pool: ThreadPoolExecutor  # the tool calls' threads
    seed: int | None
    number: int  # makes request ids unique across batches
    launch: Callable[..., None]  # start coroutines for new trajectories
    speculating: dict[int, int] = field(default_factory=dict)  # group → speculative copies awaiting a decision
    streaming: int = 0  # requests in flight
    streaming_since: float = 0.0  # since when that count was > 0


@dataclass
class _Copies:
    """Speculative forks of a trajectory at its pending tool result, and the decision they wait for."""

    copies: list[Trajectory]
    decided: asyncio.Future


class StreamDriver(TreeDriver):
    """Runs ARPO's rollout for a batch of groups on a `VLLMEngine`; see the module docstring."""

    _batches = itertools.count()

    def __init__(
        self,
        settings: RolloutSettings,
        engine: Any,  # vllm_engine.VLLMEngine (or anything with its `run`, `stream` and `entropies`)
        protocol: ToolProtocol,
        executor: ToolExecutor,
        policy: BranchPolicy,
        vocab_size: int,
        eos_token_id: int,
        stop: list[str] | None = None,
        entropy_estimator: str = "exact",
        toolset: Callable[[Trajectory], Mapping[str, Any] | None] | None = None,
        frozen_initial: dict[int, float] | None = None,
        measure_every_token: bool = False,
    ) -> None:
        if entropy_estimator not in ("exact", "top_k"):
            raise ValueError(f"entropy_estimator must be 'exact' or 'top_k', got {entropy_estimator!r}")
        super().__init__(settings, protocol, executor, policy, vocab_size, eos_token_id, toolset, frozen_initial)
        self.engine = engine
        self.stop = stop or None
        self.entropy_estimator = entropy_estimator
        # The entropy analyser reads every sampled token's entropy, not only the k of the windows ARPO decides on.
        self.measure_every_token = measure_every_token

    def run(
        self, prompt_ids: Sequence[list[int]], environments: Sequence[Any] | None = None, seed: int | None = None
    ) -> tuple[list[Trajectory], RolloutStats]:
        """Roll out `prompt_ids` (len B = groups × M, groups contiguous); return B finished trajectories in slot
        order and the statistics (blocks the calling thread while the engine's loop runs the rollout). As in
        `engine.RoundDriver.run`, a root or fresh rollout in slot i starts from `prompt_ids[i]` and `environments[i]`
        (the rows of a group may differ); a branch continues its parent's prompt and environment copy.

        `seed`: each request samples from its own stream, seeded by (seed, slot, position), so a segment's tokens do
        not depend on what else the engine is batching. Which decisions claim the last slots still depends on
        timing: unlike the round driver, the trees of two runs may differ."""
        tree = self.new_tree(prompt_ids, environments)
        # Tool calls wait in threads, bounded by the executor's worker count, while the loop keeps streaming.
        pool = ThreadPoolExecutor(max_workers=self.executor.max_workers, thread_name_prefix="arpo-tools")
        try:
            # This thread serves the main-thread tool calls (user tools, run as TRL runs them) while the rollout runs.
            return self.executor.serve(lambda: self.engine.run(self._run(tree, pool, seed))), tree.stats
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the batch
    async def _run(self, tree: RolloutTree, pool: ThreadPoolExecutor, seed: int | None) -> list[Trajectory]:
        tasks: set[asyncio.Task] = set()

        def launch(trajs: Sequence[Trajectory], decided: asyncio.Future | None = None) -> None:
            for traj in trajs:
                tasks.add(asyncio.create_task(self._trajectory(batch, traj, decided)))

        batch = _Batch(tree, pool, seed, next(self._batches), launch)
        started = asyncio.get_running_loop().time()
        launch(tree.start())
        try:
            while tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                tasks.difference_update(done)
                for task in done:
                    task.result()  # a driver bug surfaces here, not as a silent hang
        finally:
            for task in tasks:
                task.cancel()
        wall = asyncio.get_running_loop().time() - started
        tree.stats.wait_seconds = max(0.0, wall - tree.stats.generation_seconds)
        return tree.finish()

    @staticmethod
    def _streams(batch: _Batch, change: int) -> None:
        """Count a request starting (+1) or ending (-1); the time with at least one in flight is generation time."""
        now = asyncio.get_running_loop().time()
        if change > 0 and batch.streaming == 0:
            batch.streaming_since = now
        batch.streaming += change
        if change < 0 and batch.streaming == 0:
            batch.tree.stats.generation_seconds += now - batch.streaming_since

    # ------------------------------------------------------------------ one trajectory
    async def _trajectory(self, batch: _Batch, traj: Trajectory, decided: asyncio.Future | None = None) -> None:
        """Run `traj` to its end. `decided`: `traj` is a speculative copy, kept or discarded when that resolves."""
        tree, copies = batch.tree, None
        while not traj.done:
            # Unique per trajectory and position (the kind tells a fresh rollout from the branch that may later take
            # its slot; a speculative copy not yet placed is named after its parent): the request's seed depends on
            # the rollout's seed and on nothing else, not even the batch.
            owner = traj.slot if traj.slot >= 0 else f"{traj.parent}.{-traj.slot}"
            key = f"{owner}-{traj.kind}-{len(traj.completion_ids)}"
            request_seed = None if batch.seed is None else zlib.crc32(f"{batch.seed}-{key}".encode()) & 0x7FFFFFFF
            self._streams(batch, +1)
            try:
                segment, window = await self._segment(
                    batch, traj, f"arpo-{batch.number}-{key}", request_seed, copies, decided
                )
            finally:
                self._streams(batch, -1)
            copies, decided = None, None
            if segment is None:  # discarded while streaming: its slot went to a branch, or no fork was decided
                return
            calls = tree.absorb(traj, segment)
            if calls and tree.admit(traj, calls):
                results = await self._run_tools(traj, calls, batch)
                batch.launch(tree.apply_results(traj, calls, results, window))
                copies = self._speculate(batch, traj)
            # Only this trajectory changed (finished, or can no longer branch): its group's tree may no longer be
            # able to use its free slots. The other groups are filled when their own trajectories change.
            batch.launch(tree.fill([traj.group]))

    def _speculate(self, batch: _Batch, traj: Trajectory) -> _Copies | None:
        """Start the speculative copies of `traj` at the tool result it now ends with (``speculative_forks``)."""
        group = traj.group
        budget = {group: batch.tree.pool.free(group) - batch.speculating.get(group, 0)}
        copies = batch.tree.speculate(traj, budget)
        if not copies:
            return None
        batch.speculating[group] = batch.speculating.get(group, 0) + len(copies)
        speculation = _Copies(copies, asyncio.get_running_loop().create_future())
        batch.launch(copies, speculation.decided)
        return speculation

    def _decide(self, batch: _Batch, traj: Trajectory, window: float | None, speculation: _Copies | None) -> None:
        """Decide at `traj`'s pending tool result; start the forks, keep the speculative copies it took, and let the
        others go (their requests are aborted)."""
        copies = speculation.copies if speculation else []
        forks = batch.tree.decide(traj, window, copies)
        batch.launch([f for f in forks if all(f is not c for c in copies)])  # beyond the copies: start them now
        if speculation is None:
            return
        for copy in copies:
            if copy.slot < 0:  # not taken by the decision
                copy.finish_reason = "discarded"
                batch.tree.stats.discarded_forks += 1
        batch.speculating[traj.group] -= len(copies)
        speculation.decided.set_result(None)

    async def _run_tools(self, traj: Trajectory, calls: list[ToolCall], batch: _Batch):
        toolsets = [self.toolset(traj)] * len(calls) if self.toolset else None
        loop = asyncio.get_running_loop()
        start = loop.time()
        results = await loop.run_in_executor(batch.pool, self.executor.run, calls, toolsets)
        batch.tree.stats.tool_seconds += loop.time() - start  # summed over calls: they overlap each other
        return results

    async def _segment(
        self,
        batch: _Batch,
        traj: Trajectory,
        request_id: str,
        seed: int | None,
        copies: _Copies | None,
        decided: asyncio.Future | None,
    ) -> tuple[Segment | None, float | None]:
        """Stream one segment of `traj`; decide at its pending tool result as soon as k tokens are in. `copies`:
        the speculative forks of that decision; `decided`: `traj` is such a copy, waiting for its parent's."""
        tree, k = batch.tree, self.s.entropy_window
        need = tree.needs_entropy(traj)
        measured = tree.room(traj) if self.measure_every_token else k  # tokens whose entropy is recorded
        exact = (need or self.measure_every_token) and self.entropy_estimator == "exact"
        top = TOP_K_CANDIDATES if (need or self.measure_every_token) and self.entropy_estimator == "top_k" else 0
        tree.stats.rounds += 1
        ids: list[int] = []
        logprobs: list[float] = []
        estimates: list[float] = []
        finish = "length"
        cached = 0
        decision_pending = traj.awaiting_entropy
        window: float | None = None
        prefix = tree.prefix(traj)
        stream = self.engine.stream(
            request_id,
            prefix,
            tree.room(traj),
            self.stop,
            entropy_tokens=measured if exact else 0,
            top_logprobs=top,
            seed=seed,
        )
        async for update in stream:
            if traj.done:  # a branch reclaimed this speculative fresh rollout's slot, or this copy was not kept
                await stream.aclose()
                if exact:
                    self.engine.forget([request_id])
                return None, None
            ids += update.token_ids
            logprobs += update.logprobs
            if top:
                estimates += [truncated_entropy(c) for c in update.top_logprobs]
            cached = max(cached, update.num_cached_tokens)  # reported with every update, not as a delta
            if update.finished:
                finish = update.finish_reason or "length"
            if need and decision_pending and (len(ids) >= k or update.finished):
                window = tree.window(await self._entropies(request_id, exact, estimates, len(ids)))
                self._decide(batch, traj, window, copies)
                decision_pending = False
        if decided is not None:  # a speculative copy that sampled its segment before its parent's decision
            await decided
            if traj.done:
                return None, None
        tree.stats.prompt_tokens += len(prefix)
        tree.stats.cached_tokens += cached
        if traj.kind == BRANCH and traj.fork_position == len(traj.completion_ids):
            tree.stats.fork_prefills.append((len(prefix), cached))
        if finish == "abort":
            raise RuntimeError(f"vLLM aborted request {request_id} (engine shut down?)")
        entropies = [math.nan] * len(ids)
        if need or self.measure_every_token:
            read = await self._entropies(request_id, exact, estimates, min(measured, len(ids)))
            entropies[: len(read)] = read
        if need:
            window = tree.window(entropies[: min(k, len(ids))])
            tree.record_initial(traj, window)
        if decision_pending:  # awaiting a decision but nothing to measure (no free slot): record that it passed
            self._decide(batch, traj, None, copies)
        return Segment(ids, entropies, finish, logprobs), window

    async def _entropies(self, request_id: str, exact: bool, estimates: list[float], count: int) -> list[float]:
        if not exact:
            return estimates[:count]
        return (await self.engine.entropies([request_id]))[request_id][:count]
