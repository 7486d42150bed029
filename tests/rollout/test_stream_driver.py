"""One tree logic, two drivers: the round driver and the asynchronous (vLLM-style) driver on the same scripts.

A scripted model stands in at the generation seam of each driver: the same function of the prefix gives a batched
`Generator` (rounds) and a streaming engine (one request per trajectory, token by token), so both drivers see the
same segments and the same entropies for the same prefixes. Where the scenario is deterministic whatever the
order of events (no branching, or decisions that do not compete for the last slots), the trees must be equal;
elsewhere the invariants must hold. The real vLLM engine is exercised in tests/vllm_backend/.
"""

import asyncio
import math
import re
import threading
import time
import zlib

import pytest
from fakes import (
    Counter,
    ScriptedEngine,
    assert_forks_share_their_parents_prefix,
    both,
    canonical,
    same_slots,
    scripted_segment,
    settings,
)

from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.entropy import truncated_entropy
from arpo_trl.rollout.environments import environment_tools
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.rollout.vllm_engine import StreamUpdate
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor


@pytest.mark.parametrize("fill", ["fresh", "duplicate", "sequential"])
def test_without_branching_both_drivers_give_the_same_trees_slot_by_slot(tokenizer, fill):
    (rounds, r_stats), (asynchronous, a_stats) = both(tokenizer, m=4, n=2, rollout_fill=fill)
    same_slots(rounds, asynchronous)
    assert (r_stats.fresh, r_stats.duplicates, r_stats.tool_executions) == (
        a_stats.fresh,
        a_stats.duplicates,
        a_stats.tool_executions,
    )
    assert r_stats.tool_executions == 2 * len([t for t in rounds if t.kind != "duplicate"])


@pytest.mark.parametrize("timing, speculative", [("after_tool", False), ("after_tool", True), ("lagged", False)])
def test_threshold_branching_gives_the_same_trees_when_slots_are_not_contested(tokenizer, timing, speculative):
    """Deterministic decisions (paper's threshold rule on scripted entropies) and a budget M no tree can exhaust:
    the same trees, whichever order the asynchronous driver's decisions happen in, and with speculative forks too
    (a kept copy samples what a fork started at the decision would)."""
    (rounds, r_stats), (asynchronous, a_stats) = both(
        tokenizer, m=16, n=2, alpha=0.5, beta=1.0, rule="threshold", tau=0.5, entropy_timing=timing,
        speculative_forks=speculative,
    )  # fmt: skip
    assert r_stats.branches > 0 and r_stats.entropy_deltas  # the scenario branches
    assert canonical(rounds, 16) == canonical(asynchronous, 16)
    assert sorted(r_stats.entropy_deltas) == pytest.approx(sorted(a_stats.entropy_deltas))
    assert (r_stats.branches, r_stats.fresh) == (a_stats.branches, a_stats.fresh)


@pytest.mark.parametrize("fill", ["fresh", "speculative", "sequential"])
@pytest.mark.parametrize("m, n, z", [(4, 2, 1), (8, 1, 3), (6, 4, 2)])
def test_forced_branching_keeps_exactly_m_and_shares_prefixes(tokenizer, fill, m, n, z):
    _, (trajs, stats) = both(tokenizer, m=m, n=n, branch_factor=z, alpha=1.0, rollout_fill=fill)
    assert [t.slot for t in trajs] == list(range(2 * m)) and all(t.done for t in trajs)
    assert all(t.finish_reason != "discarded" for t in trajs)
    assert_forks_share_their_parents_prefix(tokenizer, trajs)
    if fill != "sequential":  # sequential roots may branch too: every free slot goes to the trees
        assert stats.branches + stats.fresh == 2 * (m - n)


def test_call_limit_budget_and_lengths_match_the_round_driver(tokenizer):
    (rounds, _), (asynchronous, _) = both(tokenizer, m=4, n=4, calls=4, max_tool_rounds=2, max_completion_length=60)
    same_slots(rounds, asynchronous)
    assert {t.finish_reason for t in asynchronous} == {"call_limit"}
    (rounds, _), (asynchronous, _) = both(tokenizer, m=4, n=4, calls=3, max_completion_length=25)
    same_slots(rounds, asynchronous)
    assert all(len(t.completion_ids) <= 25 for t in asynchronous)


def test_fork_starts_as_soon_as_k_tokens_after_the_result_have_streamed(tokenizer):
    """The decision does not wait for the parent's segment to end: the fork's request starts before it."""
    engine = ScriptedEngine(tokenizer, calls=1, delay=0.01)
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        settings(2, 1), engine, protocol, ToolExecutor([calc], timeout=5), BranchPolicy(1.0, 0.0, seed=0),
        len(tokenizer), tokenizer.eos_token_id, stop=protocol.stop_strings,
    )  # fmt: skip
    prompt = tokenizer.encode("Add 1 and 2.")
    trajs, stats = rollout.run([prompt] * 2)
    assert stats.branches == 1
    fork = trajs[1]
    shared = prompt + fork.completion_ids[: fork.fork_position]  # through tool result 1
    from_shared = [r for r in engine.requests if r[1] == shared]
    assert len(from_shared) == 2  # the parent's continuation, then the fork's first segment
    (parent_id, _, k, _), (_, _, _, fork_started) = from_shared
    assert k == 4  # the parent's continuation opted in to its k = 4 entropies
    segment = len(tokenizer.encode(" The answer is \\boxed{3}.", add_special_tokens=False)) + 1
    assert segment > 2 * 4  # the segment is much longer than k
    assert fork_started < engine.finished_at[parent_id]  # the fork started while the parent still streamed


class CopyWatcher(ScriptedEngine):
    """Records, for each speculative copy's request, how many tokens every other request had streamed when it
    started, and the most copy requests streaming at once."""

    def __init__(self, tok, calls, delay=0.0):
        super().__init__(tok, calls, delay)
        self.streamed, self.seen_at_start, self.copies_live, self.most_copies_live = {}, {}, 0, 0

    async def stream(self, request_id, prompt_ids, *args, **kwargs):
        copy = "." in request_id  # a copy not yet placed is named after its parent: "<parent>.<i>"
        self.seen_at_start[request_id] = dict(self.streamed)
        self.streamed[request_id] = 0
        self.copies_live += copy
        self.most_copies_live = max(self.most_copies_live, self.copies_live)
        try:
            async for update in super().stream(request_id, prompt_ids, *args, **kwargs):
                self.streamed[request_id] += len(update.token_ids)
                yield update
        finally:
            self.copies_live -= copy


def speculative_rollout(tok, engine, m, n, z=1, alpha=1.0, beta=0.0, **kw):
    protocol = TagProtocol(tok, ["calc"])
    rollout = StreamDriver(
        settings(m, n, branch_factor=z, speculative_forks=True, **kw), engine, protocol,
        ToolExecutor([calc], timeout=5), BranchPolicy(alpha, beta, seed=0), len(tok), tok.eos_token_id,
        stop=protocol.stop_strings,
    )  # fmt: skip
    return rollout.run([tok.encode("Add 1 and 2.")] * m)


def test_speculative_forks_start_with_the_parents_continuation_not_k_tokens_later(tokenizer):
    engine = CopyWatcher(tokenizer, calls=1, delay=0.002)
    trajs, stats = speculative_rollout(tokenizer, engine, m=2, n=1)
    assert stats.branches == 1 and stats.discarded_forks == 0
    fork = trajs[1]
    shared = tokenizer.encode("Add 1 and 2.") + fork.completion_ids[: fork.fork_position]
    (parent_id, _, k, _), (copy_id, _, copy_k, _) = [r for r in engine.requests if r[1] == shared]
    assert copy_id == f"arpo-{copy_id.split('-')[1]}-0.1-branch-{fork.fork_position}"  # parent slot 0, copy 1
    assert (k, copy_k) == (4, 0)  # the parent measures its k = 4 tokens; the copy's window is never read
    assert engine.seen_at_start[copy_id][parent_id] == 0  # started before the parent sampled a token
    # The kept copy is the fork: its first segment is what the copy's request streamed.
    assert len(fork.completion_ids) == fork.fork_position + engine.streamed[copy_id]
    assert fork.slot == 1 and fork.parent == 0 and fork.finish_reason == "eos"


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.0), (0.5, 0.3), (1.0, 0.0)])
def test_speculative_copies_are_kept_iff_the_decision_forks_and_the_others_aborted(tokenizer, alpha, beta):
    m, n = 8, 2
    engine = CopyWatcher(tokenizer, calls=2, delay=0.001)
    trajs, stats = speculative_rollout(tokenizer, engine, m=m, n=n, alpha=alpha, beta=beta)
    assert [t.slot for t in trajs] == list(range(m)) and all(t.done and t.slot >= 0 for t in trajs)
    assert stats.branches + stats.fresh == m - n
    copies = [r[0] for r in engine.requests if "." in r[0]]
    kept = [t for t in trajs if t.kind == "branch" and any(c.endswith(f"-branch-{t.fork_position}") for c in copies)]
    assert stats.discarded_forks == len(copies) - len(kept) and len(copies) >= len(kept)
    # A discarded copy's request was closed before it ended (its segment is longer than the parent's k tokens).
    discarded = [c for c in copies if c not in engine.finished_at]
    assert len(discarded) == stats.discarded_forks
    assert_forks_share_their_parents_prefix(tokenizer, trajs, results=2)
    if alpha == 0.0:
        assert stats.branches == 0 and stats.discarded_forks == len(copies) == len(stats.branch_probabilities) > 0
    if alpha == 1.0:
        assert stats.branches == m - n and stats.fresh == 0


@pytest.mark.parametrize("m, z", [(2, 1), (3, 2)])
def test_a_speculative_copy_never_measures_nor_freezes_an_initial_entropy(tokenizer, m, z):
    """initial_entropy='frozen_per_slot' keys H_initial by slot: a copy not yet placed has none, so it must not
    measure a window (nor freeze one under its placeholder slot), however many copies the decision has."""
    engine, frozen = CopyWatcher(tokenizer, calls=1), {}
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        settings(m, 1, branch_factor=z, speculative_forks=True, initial_entropy="frozen_per_slot"), engine, protocol,
        ToolExecutor([calc], timeout=5), BranchPolicy(1.0, 0.0, seed=0), len(tokenizer), tokenizer.eos_token_id,
        stop=protocol.stop_strings, frozen_initial=frozen,
    )  # fmt: skip
    _, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * m)
    assert stats.branches == z and sorted(frozen) == [0]
    assert [r[2] for r in engine.requests if "." in r[0]] == [0] * z


def test_a_groups_speculative_copies_never_outnumber_its_free_slots(tokenizer):
    """M = 3, N = 2, Z = 2: one free slot. Both roots reach their first result together (the same script); only
    the first gets a copy, and the other decides (and forks) without one."""
    engine = CopyWatcher(tokenizer, calls=1, delay=0.001)
    trajs, stats = speculative_rollout(tokenizer, engine, m=3, n=2, z=2, alpha=1.0)
    assert engine.most_copies_live == 1
    assert stats.branches == 1 and stats.discarded_forks == 0 and [t.kind for t in trajs] == ["root", "root", "branch"]


def test_a_copy_that_ends_its_segment_first_waits_for_the_decision_before_its_tool_runs(tokenizer):
    """Copies stream at once, parents slowly: each copy has its whole segment (ending in a call) before its parent
    has the k tokens to decide. It must wait: α = 0 discards every copy, so no copy's call may have run."""

    class FastCopies(CopyWatcher):
        def delay_for(self, request_id):
            return 0.0 if "." in request_id else 0.02  # a copy's ~10 tokens long before the parent's 4

    engine = FastCopies(tokenizer, calls=2)
    trajs, stats = speculative_rollout(tokenizer, engine, m=4, n=2, alpha=0.0)
    copies = [r[0] for r in engine.requests if "." in r[0]]
    assert stats.discarded_forks == len(copies) == 4 and stats.branches == 0  # 2 roots × 2 results
    # Only the kept trajectories' calls ran: 2 per root, 2 per fresh rollout.
    assert stats.tool_executions == sum(tokenizer.decode(t.completion_ids).count("<result>") for t in trajs) == 8


@pytest.mark.parametrize("m, n, calls, most, copies", [(5, 3, 1, 2, 2), (2, 1, 2, 1, 2)])
def test_the_groups_copy_budget_counts_every_copy_still_waiting_and_frees_them_at_the_decision(
    tokenizer, m, n, calls, most, copies
):
    """M = 5, N = 3: three roots reach their first result together with 2 free slots; the third gets no copy.
    M = 2, N = 1, α = 0: the root decides at two results in turn; the first decision frees its copy's share of the
    budget, so the second gets a copy too."""
    engine = CopyWatcher(tokenizer, calls=calls, delay=0.001)
    _, stats = speculative_rollout(tokenizer, engine, m=m, n=n, alpha=0.0)
    assert engine.most_copies_live == most
    assert len([r for r in engine.requests if "." in r[0]]) == copies == stats.discarded_forks


def test_a_slow_tool_does_not_stall_other_trajectories(tokenizer):
    """One trajectory's tool blocks until every other trajectory has streamed its whole answer: with rounds (or any
    wait on that tool) the rollout would deadlock; here the others keep generating, so it finishes."""
    answered = threading.Event()
    others = 3
    lock, first = threading.Lock(), [True]

    def slow(expression: str) -> str:
        with lock:
            mine, first[0] = first[0] and expression.startswith("1+"), first[0] and not expression.startswith("1+")
        if mine:  # the first second call to arrive waits for the other three answers
            assert answered.wait(timeout=20), "the other trajectories stalled while this tool ran"
        return calc(expression)

    slow.__name__ = "calc"
    slow.thread_safe = True  # concurrent with the other trajectories' calls (a main-thread tool runs one at a time)

    class Recording(ScriptedEngine):
        finished_answers = 0

        async def stream(self, request_id, prompt_ids, *args, **kwargs):
            async for update in super().stream(request_id, prompt_ids, *args, **kwargs):
                yield update
            if self.tok.decode(prompt_ids).count("<result>") == 2:  # an answer after the second result
                Recording.finished_answers += 1
                if Recording.finished_answers == others:
                    answered.set()

    engine = Recording(tokenizer, calls=2, delay=0.001)
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        settings(4, 4), engine, protocol, ToolExecutor([slow], timeout=30), BranchPolicy(0.0, 0.0, seed=0),
        len(tokenizer), tokenizer.eos_token_id, stop=protocol.stop_strings,
    )  # fmt: skip
    trajs, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert answered.is_set() and stats.tool_executions == 8 and stats.tool_errors == 0
    assert all(t.finish_reason == "eos" for t in trajs)


def test_top_k_estimator_reads_the_streamed_logprobs(tokenizer):
    assert truncated_entropy({1: math.log(0.5), 2: math.log(0.25)}) == pytest.approx(
        -(0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    )
    engine = ScriptedEngine(tokenizer, calls=1)
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        settings(2, 1), engine, protocol, ToolExecutor([calc], timeout=5), BranchPolicy(1.0, 0.0, seed=0),
        len(tokenizer), tokenizer.eos_token_id, stop=protocol.stop_strings, entropy_estimator="top_k",
    )  # fmt: skip
    trajs, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 2)
    root = trajs[0]
    first = root.token_entropies[:4]
    # The scripted top list is {sampled: -e, other: -1}: Σ −p ln p over those two candidates.
    prompt = tokenizer.encode("Add 1 and 2.")
    _, script_entropies, _ = scripted_segment(tokenizer, prompt, 200, 1)
    want = [truncated_entropy({0: -e, 1: -1.0}) for e in script_entropies[:4]]
    assert first == pytest.approx(want)
    assert all(r[2] == 0 for r in engine.requests)  # no exact-entropy opt-in with the top-k estimator


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


def test_truncated_entropy_skips_impossible_candidates():
    """A -inf logprob (p = 0) contributes 0, not NaN (0 · -inf)."""
    value = truncated_entropy({1: -math.inf, 2: math.log(0.5), 3: math.log(0.25)})
    assert value == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(4))


class Recording(ScriptedEngine):
    """The scripted engine, recording each request's stop strings."""

    def __init__(self, tok, calls, delay=0.0):
        super().__init__(tok, calls, delay)
        self.stops = []

    async def stream(self, request_id, prompt_ids, max_tokens, stop, **kw):
        self.stops.append(stop)
        async for update in super().stream(request_id, prompt_ids, max_tokens, stop, **kw):
            yield update


def async_rollout(tok, m=2, n=2, calls=2, tools=(calc,), engine=None, max_workers=16, alpha=0.0, protocol=None, **kw):
    protocol = protocol or TagProtocol(tok, ["calc"])
    options = {
        k: kw.pop(k)
        for k in ("stop", "entropy_estimator", "toolset", "frozen_initial", "measure_every_token")
        if k in kw
    }
    options.setdefault("stop", protocol.stop_strings)
    rollout = StreamDriver(
        settings(m, n, **kw), engine or Recording(tok, calls), protocol,
        ToolExecutor(list(tools), timeout=5, max_workers=max_workers), BranchPolicy(alpha, 0.0, seed=0),
        len(tok), tok.eos_token_id, **options,
    )  # fmt: skip
    return rollout


def test_the_async_driver_refuses_unknown_estimators_with_a_clear_message(tokenizer):
    with pytest.raises(ValueError, match=re.escape("entropy_estimator must be 'exact' or 'top_k', got 'top_p'")):
        async_rollout(tokenizer, entropy_estimator="top_p")


@pytest.mark.parametrize("stop, sent", [(None, None), ([], None), (["</calc>"], ["</calc>"])])
def test_the_async_driver_sends_its_stop_strings_with_every_request(tokenizer, stop, sent):
    engine = Recording(tokenizer, calls=1)
    async_rollout(tokenizer, engine=engine, stop=stop).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert engine.stops and all(s == sent for s in engine.stops)


def test_the_async_driver_runs_each_trajectorys_calls_on_its_own_environment(tokenizer):
    envs = [Counter("a"), Counter("b")]
    seen = []

    def toolset(traj):
        seen.append(traj.slot)
        return environment_tools(traj.env, [])

    rollout = async_rollout(tokenizer, calls=2, toolset=toolset)
    trajs, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 2, environments=envs)
    for t, name in zip(trajs, "ab", strict=True):
        assert t.env is envs[t.slot]
        text = tokenizer.decode(t.completion_ids)
        assert f"{name}0" in text and f"{name}1" in text  # its own state: the second call sees the first
    assert sorted(seen) == [0, 0, 1, 1] and [e.count for e in envs] == [2, 2]


def test_the_async_driver_keeps_the_callers_frozen_initial_entropies(tokenizer):
    frozen = {}
    rollout = async_rollout(tokenizer, frozen_initial=frozen, initial_entropy="frozen_per_slot", alpha=1.0, m=4)
    trajs, _ = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert {0, 1} <= set(frozen) and all(t.h_initial == frozen[t.slot] for t in trajs if t.slot in (0, 1))


def test_measure_every_token_records_the_entropy_of_every_sampled_token(tokenizer):
    trajs, _ = async_rollout(tokenizer, measure_every_token=True).run([tokenizer.encode("Add 1 and 2.")] * 2)
    for t in trajs:
        sampled = [h for h, mask in zip(t.token_entropies, t.tool_mask, strict=True) if mask]
        assert len(sampled) > 4 and not any(math.isnan(h) for h in sampled)


def test_tool_seconds_sum_the_calls_and_tools_run_in_the_bounded_pool(tokenizer):
    running, most, lock = [0], [0], threading.Lock()

    def slow(expression: str) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return "3"

    slow.__name__ = "calc"
    rollout = async_rollout(tokenizer, m=4, n=4, calls=2, tools=(slow,), max_workers=1)
    _, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert most[0] == 1  # max_workers=1: one call at a time, across trajectories
    assert 8 * 0.05 <= stats.tool_seconds < 30  # 8 calls, each timed from submission (queued ones wait longer)


class Observed(ScriptedEngine):
    """The script, two tokens per update, each token its own logprob; records every request's arguments, the
    tokens each stream has delivered when a request arrives, and what is forgotten. `cached(prompt)` is what the
    engine reports as read from its prefix cache; `finish` replaces the script's last finish reason."""

    def __init__(self, tok, calls, cached=lambda prompt: 0, no_reason=False, unfinished=False, delay=0.0):
        super().__init__(tok, calls, delay)
        self.cached, self.no_reason, self.unfinished = cached, no_reason, unfinished
        self.args, self.delivered, self.forgotten, self.arrivals = {}, {}, [], {}

    async def stream(self, request_id, prompt_ids, max_tokens, stop, entropy_tokens=0, top_logprobs=0, seed=None):
        self.args[request_id] = dict(prompt=list(prompt_ids), seed=seed, top=top_logprobs, entropy=entropy_tokens)
        self.arrivals[request_id] = dict(self.delivered)
        self.delivered[request_id] = 0
        ids, entropies, finish = scripted_segment(self.tok, list(prompt_ids), max_tokens, self.calls)
        if entropy_tokens:
            self.entropy[request_id] = entropies[:entropy_tokens]
        cached = self.cached(list(prompt_ids))
        for i in range(0, len(ids), 2):
            await asyncio.sleep(self.delay)
            chunk = ids[i : i + 2]
            last = i + 2 >= len(ids) and not self.unfinished
            reason = finish if last and not self.no_reason else None
            top = [{t: -entropies[i + j], t + 1: -1.0} for j, t in enumerate(chunk)] if top_logprobs else []
            self.delivered[request_id] += len(chunk)
            yield StreamUpdate(chunk, [-0.01 * (i + j + 1) for j in range(len(chunk))], last, reason, cached, top)

    def forget(self, request_ids):
        self.forgotten.extend(request_ids)
        super().forget(request_ids)


def test_the_async_driver_seeds_each_request_from_the_rollout_seed_slot_kind_and_position(tokenizer):
    engine = Observed(tokenizer, calls=2)
    async_rollout(tokenizer, engine=engine, m=4, n=2, alpha=1.0).run([tokenizer.encode("Add 1 and 2.")] * 4, seed=11)
    for request_id, args in engine.args.items():
        batch, key = request_id.removeprefix("arpo-").split("-", 1)
        assert args["seed"] == zlib.crc32(f"11-{key}".encode()) & 0x7FFFFFFF
    unseeded = Observed(tokenizer, calls=2)
    async_rollout(tokenizer, engine=unseeded).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert all(args["seed"] is None for args in unseeded.args.values())
    # Request ids name the batch: two rollouts on one engine never reuse an id (entropy tables are keyed by it).
    assert not set(engine.args) & set(unseeded.args)
    assert {r.split("-")[1] for r in engine.args} != {r.split("-")[1] for r in unseeded.args}


def test_the_async_driver_counts_requests_prompt_and_cached_tokens_and_forks_prefills(tokenizer):
    prompt = tokenizer.encode("Add 1 and 2.")
    engine = Observed(tokenizer, calls=2, cached=lambda p: 0 if len(p) == len(prompt) else len(p) // 2)
    rollout = async_rollout(tokenizer, engine=engine, m=4, n=2, alpha=1.0)
    trajs, stats = rollout.run([prompt] * 4)
    prompts = [len(a["prompt"]) for a in engine.args.values()]
    assert stats.rounds == len(engine.args)  # one request per segment
    assert stats.prompt_tokens == sum(prompts)
    assert stats.cached_tokens == sum(n // 2 for n in prompts if n != len(prompt)) > 0
    # One entry per fork, for its first request (the parent's prefix): (its prompt tokens, of those cached).
    forks = [t for t in trajs if t.kind == "branch"]
    assert stats.branches == len(forks) > 0
    expected = sorted((len(prompt) + t.fork_position, (len(prompt) + t.fork_position) // 2) for t in forks)
    assert sorted(stats.fork_prefills) == expected


def test_the_async_driver_keeps_every_tokens_sampling_logprob(tokenizer):
    engine = Observed(tokenizer, calls=2)
    trajs, _ = async_rollout(tokenizer, engine=engine).run([tokenizer.encode("Add 1 and 2.")] * 2)
    for t in trajs:
        assert len(t.logprobs) == len(t.completion_ids)
        sampled = [lp for lp, mask in zip(t.logprobs, t.tool_mask, strict=True) if mask]
        assert all(lp < 0 for lp in sampled) and len(set(sampled)) > 2  # the engine's own, token by token
        assert all(lp == 0.0 for lp, mask in zip(t.logprobs, t.tool_mask, strict=True) if not mask)


@pytest.mark.parametrize("ending", ["no_reason", "unfinished"])
def test_a_stream_that_ends_without_a_reason_ends_on_the_budget(tokenizer, ending):
    engine = Observed(tokenizer, calls=0, **{ending: True})
    trajs, _ = async_rollout(tokenizer, engine=engine, calls=0).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert [t.finish_reason for t in trajs] == ["length", "length"]


def test_no_trajectory_is_left_awaiting_a_decision(tokenizer):
    """Fresh rollouts (never branchable) also reach tool results: the driver records that no decision is made
    there, so none is left waiting for one."""
    trajs, stats = async_rollout(tokenizer, m=4, n=2, calls=2).run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert stats.fresh == 2 and any(t.kind == "fresh" and t.tool_rounds for t in trajs)
    assert not any(t.awaiting_entropy for t in trajs)


def test_tool_seconds_are_zero_without_tool_calls(tokenizer):
    _, stats = async_rollout(tokenizer, calls=0).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert stats.tool_seconds == 0.0


def test_an_aborted_request_stops_the_rollout_at_once_with_its_id(tokenizer):
    """vLLM aborts requests when it shuts down: the rollout raises, naming the request, without waiting for the
    tools other trajectories are running."""
    finished, started = threading.Event(), []

    def slow(expression: str) -> str:
        started.append(expression)
        time.sleep(3)
        finished.set()
        return "3"

    slow.__name__ = "calc"
    slow.thread_safe = True  # in a worker thread, so the failing rollout need not wait for it

    class AbortsOne(Observed):
        async def stream(self, request_id, prompt_ids, max_tokens, stop, **kw):
            abort = request_id.endswith("-1-root-0")
            if abort:  # let slot 0 reach its tool first
                await asyncio.sleep(0.5)
            async for update in super().stream(request_id, prompt_ids, max_tokens, stop, **kw):
                yield StreamUpdate(update.token_ids, update.logprobs, update.finished,
                                   "abort" if abort and update.finished else update.finish_reason, 0, [])  # fmt: skip

    # One tool at a time: slot 0's call runs, slot 2's waits behind it.
    rollout = async_rollout(tokenizer, engine=AbortsOne(tokenizer, calls=1), m=3, n=3, calls=1, tools=(slow,),
                            max_workers=1)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^vLLM aborted request arpo-\d+-1-root-0 \(engine shut down\?\)$"):
        rollout.run([tokenizer.encode("Add 1 and 2.")] * 3)
    assert not finished.is_set()  # slot 0's tool was still running
    finished.wait(timeout=10)
    time.sleep(0.5)
    assert len(started) == 1  # the queued call was cancelled, not run after the failure


def test_the_decision_is_taken_when_exactly_k_tokens_have_streamed(tokenizer):
    """Forks start the moment the k-th token after the result is in: their first request arrives while the
    parent's stream has delivered k tokens, not k + 1 (k = 4; the engine delivers two tokens per update)."""
    engine = Observed(tokenizer, calls=2, delay=0.01)
    trajs, _ = async_rollout(tokenizer, engine=engine, m=4, n=1, alpha=1.0).run([tokenizer.encode("Add 1 and 2.")] * 4)
    forks = [t for t in trajs if t.kind == "branch"]
    assert forks
    for fork in forks:
        first = next(r for r in engine.args if r.endswith(f"-{fork.slot}-branch-{fork.fork_position}"))
        parent = next(r for r in engine.args if re.search(f"-{fork.parent}-[a-z]+-{fork.fork_position}$", r))
        assert engine.arrivals[first][parent] == 4


def test_top_logprobs_are_asked_only_to_measure_a_window_with_the_top_k_estimator(tokenizer):
    for estimator in ("exact", "top_k"):
        engine = Observed(tokenizer, calls=2)
        async_rollout(tokenizer, engine=engine, m=4, n=2, alpha=1.0, entropy_estimator=estimator).run(
            [tokenizer.encode("Add 1 and 2.")] * 4
        )
        measuring = [a for a in engine.args.values() if a["entropy"] or a["top"]]
        assert measuring and len(measuring) < len(engine.args)  # some segments have no window to measure
        for a in engine.args.values():
            if estimator == "exact":
                assert a["top"] == 0
            else:
                assert a["entropy"] == 0 and a["top"] in (0, 10)
        if estimator == "top_k":
            assert {a["top"] for a in engine.args.values()} == {0, 10}


def test_top_k_entropies_are_kept_for_the_window_only(tokenizer):
    trajs, _ = async_rollout(tokenizer, engine=Observed(tokenizer, calls=2), entropy_estimator="top_k",
                             alpha=1.0, m=4).run([tokenizer.encode("Add 1 and 2.")] * 4)  # fmt: skip
    root = next(t for t in trajs if t.kind == "root")
    first = root.token_entropies[: root.tool_mask.index(0)]  # the root's first segment: its H_initial window
    assert not any(math.isnan(h) for h in first[:4]) and all(math.isnan(h) for h in first[4:])


def test_tool_calls_wait_in_threads_named_for_them(tokenizer):
    """While a tool runs, the driver's waiting thread is named for what it does (thread dumps of a stalled run)."""
    names = []

    def named(expression: str) -> str:
        names.append({t.name.split("_")[0] for t in threading.enumerate()})
        return "3"

    named.__name__ = "calc"
    async_rollout(tokenizer, calls=1, tools=(named,)).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert names and all("arpo-tools" in n for n in names)


def test_a_fresh_rollout_discarded_while_streaming_releases_its_entropy_entries(tokenizer):
    engine = Observed(tokenizer, calls=2, delay=0.01)
    rollout = async_rollout(tokenizer, engine=engine, m=4, n=1, alpha=1.0, rollout_fill="speculative",
                            measure_every_token=True)  # fmt: skip
    _, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert stats.discarded > 0
    assert {r for r in engine.forgotten if "-fresh-" in r}  # the discarded rollouts' requests


def test_the_async_driver_hands_the_calls_over_the_limit_to_the_notice(tokenizer):
    """The chat-template notice answers each call by name: the protocol is given the calls it answers."""

    class Noting(TagProtocol):
        noted = []

        def limit_notice_ids(self, traj, calls, limit):
            self.noted.append([c.name for c in calls])
            return super().limit_notice_ids(traj, calls, limit)

    protocol = Noting(tokenizer, ["calc"])
    async_rollout(tokenizer, calls=3, protocol=protocol, max_tool_rounds=1, call_limit_action="message").run(
        [tokenizer.encode("Add 1 and 2.")] * 2
    )
    assert protocol.noted and all(names == ["calc"] for names in protocol.noted)
