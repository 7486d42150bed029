"""The scripted stand-ins the tests share: one module, imported as `fakes` (setup.cfg puts tests/ on the path).

- The scripted model at the generation seam of both drivers (`scripted_segment`): a batched `ScriptedGenerator` for
  the round driver and a streaming `ScriptedEngine` (the `VLLMEngine` interface) for the asynchronous one, with the
  same segments and entropies for the same prefixes; `both` runs one scenario on both drivers; `canonical`,
  `same_slots` and `assert_forks_share_their_parents_prefix` compare and check their trees.
- `CountingGenerator` and `rollout`: the round driver's own scripted generator (random but seeded entropies; it logs
  each call's rows and which of them needed entropies) and a round-driver rollout over it.
- `ScriptedTurns` and `tool_call`: chosen assistant turns in the chat-template tool format, for trainer tests.
- `Counter`: a stateful environment whose tool answers with its name and its call count.
- The guessing game of tests/rollout/test_per_root_prompts.py (`GuessEnv`, `PromptScript`, `train_guessing`, ...),
  which the vLLM variant of those tests reuses.
- `fake_trainer`: what TRL's tool-suffix code reads from a `GRPOTrainer`; `chat_protocol`: a chat-template protocol
  over it.
- `launch_two_ranks`: the 2-rank `accelerate launch` of tests/scripts/distributed_train.py.
"""

import asyncio
import copy
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import types
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings, RoundDriver, Segment
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.rollout.vllm_engine import StreamUpdate
from arpo_trl.testing import calc, calc_dataset, chat_template_tokenizer
from arpo_trl.tools import ToolExecutor

# -------------------------------------------------------------------------------- the scripted model, on both drivers


def scripted_segment(tok, prefix, budget, calls):
    """What the scripted model samples after `prefix`: `calls` tool calls, then an answer; entropies are a
    function of the prefix and the position (so both drivers see the same ones)."""
    done = tok.decode(prefix).count("<result>")
    if done < calls:
        ids, finish = tok.encode(f" step<calc>{done}+{len(prefix) % 7}</calc>", add_special_tokens=False), "stop"
    else:
        ids = tok.encode(" The answer is \\boxed{3}.", add_special_tokens=False) + [tok.eos_token_id]
        finish = "eos"
    if len(ids) > budget:
        ids, finish = ids[:budget], "length"
    # Higher after each tool result (so ΔH is mostly positive), varied by the prefix (so not always).
    seed = zlib.crc32(bytes(str(prefix), "utf8"))
    entropies = [0.6 * done + ((seed >> (i % 24)) % 1000) / 1000.0 for i in range(len(ids))]
    return ids, entropies, finish


class ScriptedGenerator:
    def __init__(self, tok, calls):
        self.tok, self.calls = tok, calls

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        return [Segment(*scripted_segment(self.tok, p, b, self.calls)) for p, b in zip(prefixes, max_new_tokens)]


class ScriptedEngine:
    """The `VLLMEngine` interface over the script: streams one token per update, `delay` seconds apart."""

    def __init__(self, tok, calls, delay=0.0):
        self.tok, self.calls, self.delay = tok, calls, delay
        self.entropy = {}
        self.requests = []  # (request id, prompt ids, entropy_tokens, start time)
        self.finished_at = {}

    def run(self, coro):
        # A driver bug that leaves a coroutine waiting forever fails the test instead of hanging it (and a mutant
        # that does so is killed, not left for a limit that counts CPU seconds).
        return asyncio.run(asyncio.wait_for(coro, timeout=60))

    async def stream(self, request_id, prompt_ids, max_tokens, stop, entropy_tokens=0, top_logprobs=0, seed=None):
        self.requests.append((request_id, list(prompt_ids), entropy_tokens, time.monotonic()))
        ids, entropies, finish = scripted_segment(self.tok, list(prompt_ids), max_tokens, self.calls)
        if entropy_tokens:
            self.entropy[request_id] = []
        for i, token in enumerate(ids):
            await asyncio.sleep(self.delay_for(request_id))
            if entropy_tokens and i < entropy_tokens:
                self.entropy[request_id].append(entropies[i])
            last = i == len(ids) - 1
            top = [{token: -entropies[i], token + 1: -1.0}] if top_logprobs else []
            yield StreamUpdate([token], [-0.5], last, finish if last else None, 0, top)
        self.finished_at[request_id] = time.monotonic()

    def delay_for(self, request_id):
        return self.delay

    async def entropies(self, request_ids):
        return {r: list(self.entropy[r]) for r in request_ids}

    def forget(self, request_ids):
        for r in request_ids:
            self.entropy.pop(r, None)


def settings(m, n, **kw):
    values = dict(group_size=m, initial_rollouts=n, entropy_window=4, max_completion_length=200)
    values.update(entropy_normalization="mean", **kw)
    return RolloutSettings(**values)


def both(tok, m=4, n=2, calls=2, alpha=0.0, beta=0.0, rule="bernoulli", tau=0.5, tools=(calc,), groups=2, **kw):
    prompt = tok.encode("Add 1 and 2.")
    out = []
    for driver in ("rounds", "async"):
        protocol = TagProtocol(tok, [t.__name__ for t in tools])
        executor = ToolExecutor(list(tools), timeout=5)
        policy = BranchPolicy(alpha, beta, rule, tau, seed=0)
        args = (settings(m, n, **kw), None, protocol, executor, policy, len(tok), tok.eos_token_id)
        if driver == "rounds":
            rollout = RoundDriver(*(args[:1] + (ScriptedGenerator(tok, calls),) + args[2:]))
        else:
            rollout = StreamDriver(*(args[:1] + (ScriptedEngine(tok, calls),) + args[2:]), stop=protocol.stop_strings)
        out.append(rollout.run([prompt] * (m * groups)))
    return out


def canonical(trajs, m):
    """Per group, the sorted contents: what a tree is, whichever slot each trajectory landed in."""
    groups = {}
    for t in trajs:
        parent = None if t.parent is None else trajs[t.parent].completion_ids[: t.fork_position]
        groups.setdefault(t.slot // m, []).append(
            (t.kind, tuple(t.completion_ids), tuple(t.tool_mask), t.fork_position, tuple(parent or ()), t.finish_reason)
        )
    return [sorted(g) for _, g in sorted(groups.items())]


def assert_forks_share_their_parents_prefix(tok, trajs, results=None):
    """Every branch holds its parent's tokens exactly up to its fork, which follows a tool result; with `results`,
    it ended with EOS after that many results."""
    by_slot = {t.slot: t for t in trajs}
    for t in trajs:
        if t.kind == "branch":
            parent, cut = by_slot[t.parent], t.fork_position
            assert t.completion_ids[:cut] == parent.completion_ids[:cut]
            assert tok.decode(t.completion_ids[:cut]).endswith("</result>")
            if results is not None:
                assert t.finish_reason == "eos" and tok.decode(t.completion_ids).count("<result>") == results


def same_slots(a, b):
    assert [(t.slot, t.kind, t.completion_ids, t.tool_mask, t.finish_reason) for t in a] == [
        (t.slot, t.kind, t.completion_ids, t.tool_mask, t.finish_reason) for t in b
    ]


# ------------------------------------------------------------------------------ the round driver's counting generator


class CountingGenerator:
    """The round driver's own scripted generator (tests/rollout/test_round_driver.py): calls <calc>i+1</calc> until
    the completion holds `calls` results, then answers and ends with EOS.

    The entropy of each sampled token is random but reproducible, so ΔH varies.
    """

    def __init__(self, tokenizer, calls=2, seed=0, prompt_len=None):
        self.tok, self.calls, self.rng = tokenizer, calls, random.Random(seed)
        self.call_log = []
        self.need_log = []  # per call: which rows the engine asked entropies for

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        self.call_log.append(len(prefixes))
        self.need_log.append(list(need_entropy) if need_entropy is not None else [True] * len(prefixes))
        out = []
        for prefix, budget in zip(prefixes, max_new_tokens):
            done = self.tok.decode(prefix).count("<result>")
            if done < self.calls:
                ids, finish = self.tok.encode(f" step<calc>{done}+1</calc>", add_special_tokens=False), "stop"
            else:
                ids, finish = (
                    self.tok.encode(" The answer is \\boxed{3}.", add_special_tokens=False) + [self.tok.eos_token_id],
                    "eos",
                )
            if len(ids) > budget:
                ids, finish = ids[:budget], "length"
            out.append(Segment(ids, [self.rng.uniform(0, 3) for _ in ids], finish))
        return out


def rollout(
    tokenizer,
    m=4,
    n=2,
    z=1,
    alpha=1.0,
    beta=0.0,
    calls=2,
    fill="fresh",
    timing="after_tool",
    max_len=200,
    tools=(calc,),
    generator=None,
    any_active=None,
    groups=2,
    **kw,
):
    settings = RolloutSettings(
        group_size=m,
        initial_rollouts=n,
        branch_factor=z,
        entropy_window=4,
        entropy_timing=timing,
        rollout_fill=fill,
        max_completion_length=max_len,
        **kw,
    )
    engine = RoundDriver(
        settings,
        generator or CountingGenerator(tokenizer, calls),
        TagProtocol(tokenizer, [t.__name__ for t in tools]),
        ToolExecutor(list(tools), timeout=5),
        BranchPolicy(alpha, beta, seed=0),
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        **({"any_active": any_active} if any_active else {}),
    )
    prompt = tokenizer.encode("Add 1 and 2.")
    return engine.run([prompt] * (m * groups))


# ------------------------------------------------------------------------------------------------ chat-template turns


class ScriptedTurns:
    """`script(turn, row)` gives the text of assistant turn `turn` (the number of tool responses already in the
    prefix) of the `row`-th trajectory segment generated so far. Scripted tokens get entropy 0."""

    def __init__(self, tokenizer, script: Callable[[int, int], str]) -> None:
        self.tok, self.script, self.rows = tokenizer, script, 0

    def __call__(self, prefixes, max_new_tokens, need_entropy=None) -> list[Segment]:
        out = []
        for prefix in prefixes:
            text = self.script(self.tok.decode(prefix).count("<tool_response>"), self.rows)
            self.rows += 1
            ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
            out.append(Segment(ids, [0.0] * len(ids), "eos"))
        return out


def tool_call(name: str, **arguments) -> str:
    """A tool call in the Qwen2.5 template's format (`arpo_trl.testing.chat_template_tokenizer`)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


# --------------------------------------------------------------------------------------------- a stateful environment


class Counter:
    """A stateful environment: its tool answers with its name and how often it was called."""

    limit = 3  # a class attribute, not a tool

    def __init__(self, name):
        self.name, self.count = name, 0

    def calc(self, expression: str) -> str:
        """Count a call."""
        self.count += 1
        return f"{self.name}{self.count - 1}"

    def reset(self, **kwargs):
        return None

    def get_reward(self):
        return 0.0

    def _private(self):
        return None


# ------------------------------------------------------------------------------- the guessing game (per-root prompts)


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
            return tool_call("guess", n=self.fixed if self.fixed is not None else secret)
        if turn == 1:
            return tool_call("guess", n=secret)
        if turn == 2:
            return tool_call("guess", n=1000 + self.count)
        return self.final

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        out = []
        for prefix, budget in zip(prefixes, max_new_tokens):
            ids = self.tok.encode(self.text(prefix), add_special_tokens=False) + [self.tok.eos_token_id]
            out.append(Segment(ids[:budget], [0.0] * min(len(ids), budget), "eos" if len(ids) <= budget else "length"))
        return out


class ResetRecording(ARPOTrainer):
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
        self.batches = getattr(self, "batches", []) + [{**before, "result": result, "rollout": self.observed_rollout}]
        return result

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.batches[-1]["out"] = out
        return out

    def _maybe_log_rollout_trees(self, result, rewards_per_func, advantages):
        self.batches[-1]["sequence_advantages"] = advantages.clone()  # (B,), before hard attribution
        return super()._maybe_log_rollout_trees(result, rewards_per_func, advantages)


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
    trainer = ResetRecording(
        model=model,
        reward_funcs=[recorder],
        args=env_args(tmp_path, **overrides),
        train_dataset=calc_dataset(8) if dataset is None else dataset or None,
        processing_class=tok,
        environment_factory=environment_factory,
    )
    if script is None:
        trainer.rollout_backend.generator = PromptScript(trainer.rollout_backend.generator, tok, fixed_first_guess)
    else:
        script(trainer, tok)
    trainer.train()
    return trainer, recorder


def tool_results(traj):
    return [m["content"] for m in traj.messages if m["role"] == "tool"]


def assert_rows_are_what_their_completions_came_from(trainer, recorder, steps=2, env_rewards=("GuessEnv",)):
    """The heart of it, for every batch and row: see tests/rollout/test_per_root_prompts.py's docstring."""
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


# ------------------------------------------------------------------- a GRPOTrainer as TRL's tool-suffix code reads it


def fake_trainer(tok):
    """What `tool_suffix_ids` and TRL's `_get_tool_suffix_ids` read from a GRPOTrainer, as TRL sets it up."""
    template = None if is_chat_template_prefix_preserving(tok) else get_training_chat_template(tok)
    return types.SimpleNamespace(
        processing_class=tok, _tokenizer=tok, chat_template=template, chat_template_kwargs={}, _is_vlm=False, tools=None
    )


def chat_protocol(with_schema=True):
    """A chat-template protocol over the Qwen2.5 template (with TRL's response schema, or without), as TRL's
    trainer would hold it, and its tokenizer."""
    from trl.chat_template_utils import add_response_schema

    from arpo_trl.rollout.plain_text import ChatContext
    from arpo_trl.rollout.protocols import ChatTemplateProtocol
    from arpo_trl.testing import chat_template_tokenizer

    tok = chat_template_tokenizer()
    trainer = fake_trainer(add_response_schema(tok) if with_schema else tok)
    trainer.tools = [calc]
    return ChatTemplateProtocol(ChatContext.of(trainer)), trainer._tokenizer


# ------------------------------------------------------------ two ranks under accelerate launch (test_distributed.py)


DISTRIBUTED_SCRIPT = Path(__file__).parent / "scripts" / "distributed_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(backend: str, tmp_path: Path, timeout: int, overrides: dict | None = None) -> list[dict]:
    """`accelerate launch` the 2-rank script on CPU; its exit status must be 0; return each rank's report."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if backend == "ddp":
        # --multi_gpu selects accelerate's torchrun launcher; with use_cpu=True the processes run on CPU over gloo.
        launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    else:
        # Under ZeRO-3 every generate call (and every weight sync to vLLM) gathers the partitioned parameters
        # collectively: a rank that skipped one would leave the other waiting forever.
        launch = ["--config_file", str(DISTRIBUTED_SCRIPT.parent / f"accelerate_cpu_{backend}.yaml")]
    cmd = [
        str(accelerate),
        "launch",
        *launch,
        "--main_process_port",
        str(free_port()),
        str(DISTRIBUTED_SCRIPT),
        str(tmp_path),
    ]
    if overrides:
        cmd.append(json.dumps(overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
