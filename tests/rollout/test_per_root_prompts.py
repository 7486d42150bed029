"""Rows of one group that start from different prompts: TRL environments whose `reset` is random.

TRL's environment examples (grpo_2048.py, Wordle, Sudoku) draw a random state per row in `reset`, and TRL appends each
row's observation to that row's prompt, so the M rows of a dataset prompt differ. Each root and each fresh rollout
starts from its own row's prompt and environment; a branch continues its parent's prompt with a copy of its parent's
environment (its own row's freshly reset one is set aside). Whatever TRL reads for row i afterwards (prompt ids, the
`prompts` and `environments` its reward functions get, `get_reward`) is what row i's completion was generated from.

The game: `reset` draws a secret from a seeded RNG and shows it in the observation; the scripted player guesses the
number shown in its own prompt. A guess answered "correct" proves that the prompt the trajectory was generated from
and the environment its tool acted on belong together.
"""

import asyncio
import html
import re

import pytest
import torch
from datasets import Dataset
from fakes import (
    GuessEnv,
    M,
    N,
    assert_rows_are_what_their_completions_came_from,
    train_guessing,
)

from arpo_trl.advantages import hard_attribution
from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings, RoundDriver, Segment
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.rollout.tree import RolloutTree, prompt_keys
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor
from arpo_trl.viz import build_trees, tree_html


def test_random_reset_environment_trains_with_forks_and_consistent_reward_inputs(tool_model, tmp_path):
    trainer, recorder = train_guessing(tool_model, tmp_path)
    assert_rows_are_what_their_completions_came_from(trainer, recorder)
    # Group advantages stay TRL's: over the M rows of the dataset prompt, whatever prompt each continued.
    for batch, seen in zip(trainer.batches, recorder.calls):
        rewards = (torch.tensor(seen["rewards"]) + 2.03).view(-1, M)
        expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        torch.testing.assert_close(batch["out"]["advantages"], expected.flatten())
    # The tree pages: one prompt box per root, each with its own reset observation, its rows under it.
    batch = trainer.batches[-1]
    trajs = batch["rollout"].trajectories
    trees = build_trees(trajs, batch["rollout"].prompt_ids, [0.0] * 8, batch["out"]["advantages"])
    page = tree_html(trees, trainer.processing_class)
    for g, tree in enumerate(trees):
        assert tree.prompts == [batch["reset_ids"][g * M], batch["reset_ids"][g * M + 1]]  # the roots' own
        assert [leaf.prompt for leaf in tree.leaves] == [trajs[g * M + j].origin - g * M for j in range(M)]
        assert {node.prompt for node in tree.roots} == {0, 1} and len(tree.roots) == 2
        for p in (0, 1):
            assert html.escape(batch["prompts"][g * M + p][-1]["content"]) in page
    assert page.count('<g class="prompt"') == 4


def test_speculative_fill_and_forks_keep_each_rows_prompt(tool_model, tmp_path):
    """Speculative fresh rollouts start in the free slots from those rows' prompts; the forks that reclaim the slots
    continue their parents'."""
    trainer, recorder = train_guessing(tool_model, tmp_path, rollout_fill="speculative", speculative_forks=True)
    assert_rows_are_what_their_completions_came_from(trainer, recorder)


def test_hard_attribution_shares_a_prefix_only_between_rows_of_one_prompt(tool_model, tmp_path):
    """Every trajectory's first turn is the same guess, whatever its prompt: the rows of a group agree on their first
    segment token for token, yet only a root and its branch (one prompt) share it."""
    trainer, recorder = train_guessing(tool_model, tmp_path, fixed_first_guess=500, advantage_attribution="hard")
    for batch in trainer.batches:
        record, out, sequence = batch["rollout"], batch["out"], batch["sequence_advantages"]
        ids, hard = out["completion_ids"], out["advantages"]
        lengths = torch.tensor([len(t.completion_ids) for t in record.trajectories])
        valid = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        expected = torch.zeros_like(hard)
        for g in range(0, len(ids), M):
            for key in set(prompt_keys(record.prompt_ids[g : g + M], M)):  # each prompt's rows on their own
                rows = [g + j for j, k in enumerate(prompt_keys(record.prompt_ids[g : g + M], M)) if k == key]
                expected[rows] = hard_attribution(ids[rows], valid[rows], sequence[rows], len(rows))
            first = record.trajectories[g].completion_ids
            assert all(t.completion_ids[:20] == first[:20] for t in record.trajectories[g : g + M])
        torch.testing.assert_close(hard, expected)
        pooled = hard_attribution(ids, valid, sequence, M)  # what ignoring the prompts would give
        assert not torch.allclose(pooled, expected)


def test_multi_environment_dataset_without_a_prompt_column(tool_model, tmp_path):
    """TRL's multi-environment mode (a dict of factories, routed by an `environment` column) where the environment
    owns the data: no `prompt` column, each prompt is the reset observation alone."""

    class OtherGuessEnv(GuessEnv):  # a second environment with its own reward column
        pass

    dataset = Dataset.from_dict({"environment": ["first", "second"] * 4})
    factories = {"first": GuessEnv, "second": OtherGuessEnv}
    trainer, recorder = train_guessing(tool_model, tmp_path, environment_factory=factories, dataset=dataset)
    kinds = set()
    for batch in trainer.batches:
        assert [p for p in batch["prompts"] if not re.fullmatch(r" Secret: \d+\.", p[-1]["content"])] == []
        for g in range(0, 8, M):  # a branch's copy is of its parent's class: the group's environment
            kinds.add(type(batch["reset_envs"][g]))
            assert {type(t.env) for t in batch["rollout"].trajectories[g : g + M]} == {type(batch["reset_envs"][g])}
    assert kinds == {GuessEnv, OtherGuessEnv}
    assert_rows_are_what_their_completions_came_from(trainer, recorder, env_rewards=("GuessEnv", "OtherGuessEnv"))


def test_environment_without_a_dataset(tool_model, tmp_path):
    """TRL's other environment-owns-the-data mode: no train_dataset at all (TRL builds empty placeholder prompts)."""
    trainer, recorder = train_guessing(tool_model, tmp_path, dataset=False, max_steps=1)
    assert_rows_are_what_their_completions_came_from(trainer, recorder, steps=1)


# ---------------------------------------------------------------------------------------------- the two drivers


def marked_segment(tok, prefix, budget):
    """The scripted model: the marker of the prompt it is given ("Row k"), in each of its two calls, then an answer.
    A segment thus names the prompt it was sampled after."""
    text = tok.decode(prefix)
    marker = int(re.findall(r"Row (\d+)", text)[0])
    done = text.count("<result>")
    if done < 2:
        ids, finish = tok.encode(f" step<calc>{done}+{marker}</calc>", add_special_tokens=False), "stop"
    else:
        ids, finish = tok.encode(" The answer is \\boxed{3}.", add_special_tokens=False) + [tok.eos_token_id], "eos"
    if len(ids) > budget:
        ids, finish = ids[:budget], "length"
    return ids, [0.5 + done for _ in ids], finish


class MarkedGenerator:
    def __init__(self, tok):
        self.tok = tok

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        return [Segment(*marked_segment(self.tok, p, b)) for p, b in zip(prefixes, max_new_tokens)]


class MarkedEngine:
    """The `VLLMEngine` interface over the same script, one token per update."""

    def __init__(self, tok):
        self.tok, self.entropy = tok, {}

    def run(self, coro):
        return asyncio.run(asyncio.wait_for(coro, timeout=60))

    async def stream(self, request_id, prompt_ids, max_tokens, stop, entropy_tokens=0, top_logprobs=0, seed=None):
        from arpo_trl.rollout.vllm_engine import StreamUpdate

        ids, entropies, finish = marked_segment(self.tok, list(prompt_ids), max_tokens)
        self.entropy[request_id] = entropies[:entropy_tokens]
        for i, token in enumerate(ids):
            await asyncio.sleep(0)
            last = i == len(ids) - 1
            yield StreamUpdate([token], [-0.5], last, finish if last else None, 0, [])

    async def entropies(self, request_ids):
        return {r: list(self.entropy[r]) for r in request_ids}

    def forget(self, request_ids):
        for r in request_ids:
            self.entropy.pop(r, None)


def marked_prompts(tok, markers):
    return [tok.encode(f"Add 1 and 2. Row {k}", add_special_tokens=False) for k in markers]


@pytest.mark.parametrize("driver", ["rounds", "async"])
@pytest.mark.parametrize("fill", ["fresh", "speculative", "sequential"])
def test_each_trajectory_continues_the_prompt_it_started_from(tokenizer, driver, fill):
    """Rows 0..3 and 4..7 are two groups whose rows differ (rows 1 and 3 share a prompt); α = 1 forks after the first
    result while slots remain. Every segment, a branch's after its fork included, names the prompt its trajectory
    carries: its own row's for a root or fresh rollout, its parent's for a branch."""
    markers = [10, 11, 12, 11, 20, 21, 22, 23]
    prompts = marked_prompts(tokenizer, markers)
    protocol = TagProtocol(tokenizer, ["calc"])
    settings = RolloutSettings(group_size=M, initial_rollouts=N, entropy_window=2, max_completion_length=200,
                               entropy_normalization="mean", rollout_fill=fill,
                               speculative_forks=fill == "speculative")  # fmt: skip
    common = (protocol, ToolExecutor([calc], timeout=5), BranchPolicy(1.0, 0.0, seed=0), len(tokenizer),
              tokenizer.eos_token_id)  # fmt: skip
    if driver == "rounds":
        trajs, stats = RoundDriver(settings, MarkedGenerator(tokenizer), *common).run(prompts)
    else:
        rollout = StreamDriver(settings, MarkedEngine(tokenizer), *common, stop=protocol.stop_strings)
        trajs, stats = rollout.run(prompts, seed=0)
    assert [t.slot for t in trajs] == list(range(8)) and stats.branches > 0
    for t in trajs:
        origin = t.slot if t.kind in ("root", "fresh") else trajs[t.parent].origin
        assert t.origin == origin and t.prompt_ids == prompts[origin]
        calls = re.findall(r"<calc>\d\+(\d+)</calc>", tokenizer.decode(t.completion_ids))
        assert calls == [str(markers[origin])] * 2
        if t.kind == "branch":
            assert t.prompt_ids is trajs[t.parent].prompt_ids


def test_equal_rows_share_one_prompt_and_keys_name_each_distinct_prompt():
    tree = RolloutTree(RolloutSettings(group_size=4, initial_rollouts=2), [[1], [2], [1], [3], [5], [5], [5], [5]],
                       None, BranchPolicy(1.0, 0.0, seed=0), 10, 0)  # fmt: skip
    assert tree.row_prompts == [[1], [2], [1], [3], [5], [5], [5], [5]]
    assert tree.row_prompts[0] is tree.row_prompts[2] and len({id(p) for p in tree.row_prompts[4:]}) == 1
    assert prompt_keys(tree.row_prompts, 4) == [0, 1, 0, 3, 0, 0, 0, 0]
    roots = tree.start()
    assert [(t.slot, t.prompt_ids, t.origin) for t in roots] == [(0, [1], 0), (1, [2], 1), (4, [5], 4), (5, [5], 5)]
    assert tree.prefix(roots[1]) == [2] and tree.room(roots[1]) == 256
