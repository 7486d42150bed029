"""One tree logic, two drivers: the round driver and the asynchronous (vLLM-style) driver on the same scripts.

A scripted model stands in at the generation seam of each driver: the same function of the prefix gives a batched
`Generator` (rounds) and a streaming engine (one request per trajectory, token by token), so both drivers see the
same segments and the same entropies for the same prefixes. Where the scenario is deterministic whatever the
order of events (no branching, or decisions that do not compete for the last slots), the trees must be equal;
elsewhere the invariants must hold. The real vLLM engine is exercised in tests/vllm_backend/.
"""

import math
import threading

import pytest
from fakes import (
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
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.stream_driver import StreamDriver
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
