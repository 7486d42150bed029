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
import copy
import html
import random
import re

import pytest
import torch
from datasets import Dataset

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.advantages import hard_attribution
from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings, RoundDriver, Segment
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.rollout.tree import RolloutTree, prompt_keys
from arpo_trl.testing import calc, calc_dataset, chat_template_tokenizer
from arpo_trl.tools import ToolExecutor
from arpo_trl.viz import build_trees, tree_html

M, N = 4, 2


class GuessEnv:
    """A stateful game in TRL's environment format: `reset` draws a random secret (seeded) and returns it as the
    observation; `guess` acts on the state; `get_reward` reads it."""

    rng = random.Random(0)
    rewarded: list["GuessEnv"] = []  # every instance `get_reward` was called on, in order

    def reset(self, **kwargs) -> str:
        self.secret = GuessEnv.rng.randint(100, 999)
        self.guesses: list[int] = []
        return f" Secret: {self.secret}."

    def guess(self, n: int) -> str:
        """
        Guess the secret number.

        Args:
            n: the guess.

        Returns:
            correct, higher or lower.
        """
        self.guesses.append(n)
        return "correct" if n == self.secret else "higher" if n < self.secret else "lower"

    def get_reward(self) -> float:
        GuessEnv.rewarded.append(self)
        return self.guesses.count(self.secret) + 0.01 * len(self.guesses)


class Recorder:
    """A reward function keeping what TRL gave it."""

    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, environments=None, **kwargs):
        rewards = [float(sum(map(ord, str(c))) % 5) for c in completions]  # differs within a group
        # TRL resets the same pooled instances for the next batch: their state is read now.
        states = [(e.secret, list(e.guesses)) for e in environments]
        self.calls.append({"prompts": copy.deepcopy(prompts), "environments": environments, "states": states,
                           "rewards": rewards})  # fmt: skip
        return rewards


def tool_call_text(name, **arguments):
    import json

    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


class PromptScript:
    """Constrained decoding of every assistant turn, as a function of the whole prefix (prompt included): turn 0 and
    turn 1 guess the secret shown in the prompt, turn 2 a number of its own (so forks diverge), turn 3 ends. Scripted
    tokens have entropy 0 (ΔH = 0; α = 1 forks at every decision while slots remain)."""

    def __init__(self, inner, tokenizer, fixed_first_guess=None, final="Done."):
        self.inner, self.tok, self.count, self.fixed, self.final = inner, tokenizer, 0, fixed_first_guess, final

    def text(self, prefix: list[int]) -> str | None:
        """The turn's text; None: the model samples it (`final=None`, the last turn)."""
        decoded = self.tok.decode(prefix)
        secret = int(re.findall(r"Secret: (\d+)\.", decoded)[0])  # the prompt's (a completion never shows one)
        turn = decoded.count("<tool_response>")
        self.count += 1
        if turn == 0:
            return tool_call_text("guess", n=self.fixed if self.fixed is not None else secret)
        if turn == 1:
            return tool_call_text("guess", n=secret)
        if turn == 2:
            return tool_call_text("guess", n=1000 + self.count)
        return self.final

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        out = []
        for prefix, budget in zip(prefixes, max_new_tokens):
            ids = self.tok.encode(self.text(prefix), add_special_tokens=False) + [self.tok.eos_token_id]
            out.append(Segment(ids[:budget], [0.0] * min(len(ids), budget), "eos" if len(ids) <= budget else "length"))
        return out


class Recording(ARPOTrainer):
    """Keeps, per batch, what TRL passed to `_generate` (its prompts list and the freshly reset environments), what
    `_generate` returned, and TRL's output."""

    def _generate(self, prompts):
        before = {
            "prompts_list": prompts,  # TRL's own list: its reward functions read it after `_generate`
            "prompts": copy.deepcopy(prompts),
            "reset_envs": list(self.environments),
            "reset_secrets": [e.secret for e in self.environments],
            "reset_ids": self._tokenize_prompts(copy.deepcopy(prompts))[0],
        }
        result = super()._generate(prompts)
        self.batches = getattr(self, "batches", []) + [{**before, "result": result, "rollout": self.last_rollout}]
        return result

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.batches[-1]["out"] = out
        return out

    def _maybe_log_rollout_trees(self, advantages):
        self.batches[-1]["sequence_advantages"] = advantages.clone()  # (B,), before hard attribution
        return super()._maybe_log_rollout_trees(advantages)


def env_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=M,
        initial_rollouts=N,
        max_completion_length=256,
        max_tool_calling_iterations=3,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        tool_format="chat_template",
        branch_base_probability=1.0,  # α = 1, β = 0: every decision forks while the group has a free slot
        branch_entropy_weight=0.0,
    )
    values.update(overrides)
    return ARPOConfig(**values)


def train_guessing(
    model, tmp_path, environment_factory=GuessEnv, dataset=None, fixed_first_guess=None, script=None, **overrides
):
    """Train `max_steps` steps on the guessing game. `script(trainer, tokenizer)` installs the scripted turns (default:
    around the transformers generator)."""
    GuessEnv.rng, GuessEnv.rewarded = random.Random(0), []
    recorder = Recorder()
    tok = chat_template_tokenizer()
    trainer = Recording(
        model=model,
        reward_funcs=[recorder],
        args=env_args(tmp_path, **overrides),
        train_dataset=calc_dataset(8) if dataset is None else dataset or None,
        processing_class=tok,
        environment_factory=environment_factory,
    )
    if script is None:
        trainer.generator = PromptScript(trainer.generator, tok, fixed_first_guess)
    else:
        script(trainer, tok)
    trainer.train()
    return trainer, recorder


def tool_results(traj):
    return [m["content"] for m in traj.messages if m["role"] == "tool"]


def assert_rows_are_what_their_completions_came_from(trainer, recorder, steps=2, env_rewards=("GuessEnv",)):
    """The heart of it, for every batch and row: see the module docstring."""
    assert len(trainer.batches) == steps and len(recorder.calls) == steps
    rewarded = iter(GuessEnv.rewarded)
    for batch, seen in zip(trainer.batches, recorder.calls):
        trajs, out = batch["rollout"].trajectories, batch["out"]
        prompt_ids, *_ = batch["result"]
        for g in range(len(trajs) // M):  # the draw really differs within each group
            assert len({tuple(batch["reset_ids"][i]) for i in range(g * M, (g + 1) * M)}) == M
        assert sum(t.kind == "branch" for t in trajs) == 2 * (M - N)  # forks forced into every free slot
        for i, t in enumerate(trajs):
            origin = i if t.kind in ("root", "fresh") else trajs[t.parent].origin
            assert t.origin == origin and trajs[origin].kind == "root"
            # prompt ids: returned to TRL, in its padded output, and in the last rollout's record
            assert prompt_ids[i] == t.prompt_ids == batch["reset_ids"][origin]
            row = out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist()
            assert row == batch["reset_ids"][origin] and batch["rollout"].prompt_ids[i] == t.prompt_ids
            # prompts and environments as the reward functions saw them (TRL's list, updated in place)
            assert (
                seen["prompts"][i] == batch["prompts"][origin] and batch["prompts_list"][i] == batch["prompts"][origin]
            )
            assert seen["environments"][i] is t.env
            assert next(rewarded) is t.env  # get_reward read this row's own environment
            secret, guesses = seen["states"][i]
            if t.kind == "branch":
                parent, (parent_secret, parent_guesses) = trajs[t.parent], seen["states"][t.parent]
                assert t.prompt_ids is parent.prompt_ids  # one shared list
                assert t.env is not parent.env and t.env is not batch["reset_envs"][i]  # a copy; its row's set aside
                assert secret == parent_secret == batch["reset_secrets"][origin] != batch["reset_secrets"][i]
                assert guesses[:2] == parent_guesses[:2] and guesses[2] != parent_guesses[2]  # diverged after the fork
            else:
                assert t.env is batch["reset_envs"][i] and secret == batch["reset_secrets"][i]
            # the secret in its prompt is its environment's: both guesses of it were answered "correct"
            assert f"Secret: {secret}." in batch["prompts"][origin][-1]["content"]
            assert tool_results(t) == ["correct", "correct", "lower"] and len(guesses) == 3
        assert len(seen["environments"]) == len(trajs)
    assert trainer.environments == [t.env for t in trainer.batches[-1]["rollout"].trajectories]
    assert next(rewarded, None) is None
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert trainer.state.global_step == steps and len(logs) == steps
    for entry in logs:  # 2 correct guesses + 3 × 0.01 on every row (an environment absent from a step logs None)
        means = [entry[f"rewards/{name}/mean"] for name in env_rewards if entry[f"rewards/{name}/mean"] is not None]
        assert means and means == [pytest.approx(2.03)] * len(means)


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
