"""Per-root prompts on the asynchronous vLLM driver (see tests/rollout/test_per_root_prompts.py): the rows of a
group start from different prompts; a branch continues its parent's, served from the prefix cache its parent
filled. The driver on the folder's shared engine, then the real `ARPOTrainer` with `use_vllm=True` on the seeded
random-reset game.
"""

import asyncio
import math
import random

import pytest
from fakes import GuessEnv, PromptScript, assert_rows_are_what_their_completions_came_from, train_guessing
from vllm_helpers import prompt_ids

from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.rollout.vllm_engine import StreamUpdate
from arpo_trl.testing import build_tiny_model, calc, widen_heads
from arpo_trl.tools import ToolExecutor


class Requests:
    """The real engine, recording each request's prompt."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def stream(self, request_id, prompt, *args, **kwargs):
        self.prompts[request_id] = list(prompt)
        async for update in self.engine.stream(request_id, prompt, *args, **kwargs):
            yield update


def test_each_trajectory_streams_from_its_own_prompt_and_forks_from_the_cache(engine, tokenizer):
    rng = random.Random(0)
    prompts = [prompt_ids(tokenizer, *(rng.randint(1, 20) for _ in range(3))) for _ in range(8)]  # 8 different rows
    requests = Requests(engine)
    protocol = TagProtocol(tokenizer, ["calc"])
    rollout = StreamDriver(
        RolloutSettings(group_size=4, initial_rollouts=2, entropy_window=4, max_completion_length=64),
        requests, protocol, ToolExecutor([calc], timeout=10), BranchPolicy(1.0, 0.0, seed=0), len(tokenizer),
        tokenizer.eos_token_id, stop=protocol.stop_strings,
    )  # fmt: skip
    trajs, stats = rollout.run(prompts, seed=4)
    assert [t.slot for t in trajs] == list(range(8)) and all(t.done for t in trajs) and stats.branches > 0
    for t in trajs:
        origin = t.slot if t.kind in ("root", "fresh") else trajs[t.parent].origin
        assert t.origin == origin and t.prompt_ids == prompts[origin]
        # every request of the trajectory (named by slot and kind) continued its own prompt
        mine = [p for r, p in requests.prompts.items() if r.split("-")[2:4] == [str(t.slot), t.kind]]
        assert mine and all(p == t.prompt_ids + t.completion_ids[: len(p) - len(t.prompt_ids)] for p in mine)
    # A fork's first request is its parent's prompt and prefix: every full block of it came from the cache.
    assert len(stats.fork_prefills) == stats.branches
    for prompt_tokens, cached in stats.fork_prefills:
        assert cached == (prompt_tokens - 1) // engine.block_size * engine.block_size


class ScriptedStreams:
    """The trainer's real engine, with the game's turns decoded as `PromptScript` writes them (the tiny model was
    taught the tag format, not JSON tool calls); the last turn the real engine samples. A scripted token's sampling
    logprob is unknown: NaN, which TRL leaves out of its importance-sampling correction."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tok, self.script = engine, tokenizer, PromptScript(None, tokenizer, final=None)
        self.scripted: dict[str, int] = {}  # request id -> entropy tokens asked for
        self.sampled = 0  # requests the real engine served

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def stream(self, request_id, prompt, max_tokens, stop, entropy_tokens=0, top_logprobs=0, seed=None):
        text = self.script.text(list(prompt))
        if text is None:
            self.sampled += 1
            async for update in self.engine.stream(request_id, prompt, max_tokens, stop, entropy_tokens,
                                                   top_logprobs, seed):  # fmt: skip
                yield update
            return
        ids = (self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id])[:max_tokens]
        self.scripted[request_id] = min(entropy_tokens, len(ids))
        for i, token in enumerate(ids):
            await asyncio.sleep(0)
            last = i == len(ids) - 1
            finish = ("eos" if token == self.tok.eos_token_id else "length") if last else None
            yield StreamUpdate([token], [math.nan], last, finish, 0, [{token: 0.0}] if top_logprobs else [])

    async def entropies(self, request_ids):
        real = [r for r in request_ids if r not in self.scripted]
        out = await self.engine.entropies(real) if real else {}
        return {**out, **{r: [0.0] * self.scripted[r] for r in request_ids if r in self.scripted}}

    def forget(self, request_ids):
        real = [r for r in request_ids if self.scripted.pop(r, None) is None]
        if real:
            self.engine.forget(real)


@pytest.mark.slow
def test_random_reset_environment_trains_on_the_vllm_driver(tokenizer, tool_model_state, tmp_path):
    model = build_tiny_model(tokenizer)
    model.load_state_dict(tool_model_state)
    model = widen_heads(model).train()  # vLLM's CPU attention needs heads of 32 (same function)
    engines = []

    def script(trainer, tok):
        trainer.rollout_backend.engine = ScriptedStreams(trainer.rollout_backend.engine, tok)
        engines.append(trainer.rollout_backend.engine)

    try:
        trainer, recorder = train_guessing(
            model, tmp_path, script=script, use_vllm=True, vllm_mode="colocate", vllm_kv_cache_gib=0.25,
            max_completion_length=200,
        )  # fmt: skip
        assert_rows_are_what_their_completions_came_from(trainer, recorder)
        assert engines[0].sampled > 0  # the last turns came from the real engine
        assert GuessEnv.rewarded  # get_reward ran
    finally:
        for engine in engines:
            engine.shutdown()
