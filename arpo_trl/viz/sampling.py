"""Roll a model out with tools outside any trainer, keeping every sampled token's entropy.

The rollout is ARPO's own, on the rollout's own backends, so tool calls, results, limits and masking are exactly
those of training:

- `TransformersBackend`: the round driver (`RoundDriver`) over `TransformersGenerator.for_model`, the trainer's
  generator run on a plain model; each token's entropy H = −Σ_j p_j log p_j, p = softmax(z / T), is read by the
  LM-head hook during ``generate`` (no extra forward pass);
- `VLLMBackend`: the asynchronous driver (`StreamDriver`) over a `VLLMEngine`, with ``measure_every_token``:
  the engine's logits processor computes the exact entropy of every sampled token, not only ARPO's windows.

Either way the entropies come back in `Trajectory.token_entropies` (NaN on tool-result tokens; a branch carries
its parent's for the prefix it inherited). With ``branching=True`` (α, β as given) this produces real rollout
trees, which `render_tree` can draw; with ``branching=False`` it is plain trajectory-level sampling (the entropy
analyser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..rollout.branching import BranchPolicy
from ..rollout.generation import TransformersGenerator
from ..rollout.protocols import TagProtocol
from ..rollout.round_driver import RolloutSettings, RolloutStats, RoundDriver
from ..rollout.trajectory import Trajectory
from ..tools import ToolExecutor

BACKENDS = ("transformers", "vllm")


class Backend(Protocol):
    """What `rollout_with_entropies` samples through: one batch of groups, every sampled token measured."""

    vocab_size: int

    def rollout(
        self,
        settings: RolloutSettings,
        protocol: TagProtocol,
        executor: ToolExecutor,
        policy: BranchPolicy,
        rows: list[list[int]],
        seed: int | None,
    ) -> tuple[list[Trajectory], RolloutStats]: ...

    def close(self) -> None: ...


class TransformersBackend:
    """The round driver over ``model.generate`` (`TransformersGenerator` on a plain model).

    Args:
        model: a causal LM (evaluated in eval mode; its mode is restored after each batch).
        tokenizer: its tokenizer.
        temperature: T of p = softmax(z / T); 0 samples greedily and measures the entropy at T = 1.
        top_p, top_k: sampling filters (0: off). They do not change the measured entropy, which is the model's
            distribution over the whole vocabulary, as in the trainer.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    def rollout(
        self,
        settings: RolloutSettings,
        protocol: TagProtocol,
        executor: ToolExecutor,
        policy: BranchPolicy,
        rows: list[list[int]],
        seed: int | None,
    ) -> tuple[list[Trajectory], RolloutStats]:
        if seed is not None:
            torch.manual_seed(seed)
        generator = TransformersGenerator.for_model(self.model, self.tokenizer, protocol.stop_strings, **self.sampling)
        was_training = self.model.training
        self.model.eval()
        try:
            rollout = RoundDriver(settings, generator, protocol, executor, policy, self.vocab_size,
                                  self.tokenizer.eos_token_id)  # fmt: skip
            return rollout.run(rows)
        finally:
            generator.close()
            self.model.train(was_training)

    def close(self) -> None:
        pass


class VLLMBackend:
    """The asynchronous driver over a `VLLMEngine` started here (shut it down with `close`).

    Args:
        model_path: a HF model directory with its tokenizer (vLLM's CPU attention needs a head size of at least 32).
        tokenizer: the same tokenizer (for the tool protocol).
        temperature, top_p, top_k: as for `TransformersBackend` (top_k 0: off); T = 0 is greedy, entropies at T = 1.
        max_model_len: the engine's context (prompt + completion).
        seed: the engine's seed; each request also gets its own, from `rollout`'s seed.
        engine_kwargs: any other `VLLMEngine` argument (``kv_cache_gib``, ``cpu_bind``, ...).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_model_len: int,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        from transformers import AutoConfig

        from ..rollout.vllm_engine import VLLMEngine

        self.tokenizer = tokenizer
        self.vocab_size = int(AutoConfig.from_pretrained(model_path).get_text_config().vocab_size)
        self.max_model_len = max_model_len
        self.engine = VLLMEngine(model_path, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 max_model_len=max_model_len, seed=seed, **engine_kwargs)  # fmt: skip
        self._owned = True

    @classmethod
    def on_engine(cls, engine: Any, tokenizer: Any, vocab_size: int) -> VLLMBackend:
        """A backend on an engine already running (the trainer's, after training: no second start); it samples
        with that engine's settings, and `close` leaves the engine running."""
        backend = cls.__new__(cls)
        backend.tokenizer, backend.vocab_size = tokenizer, vocab_size
        backend.engine, backend.max_model_len, backend._owned = engine, engine.max_model_len, False
        return backend

    def rollout(
        self,
        settings: RolloutSettings,
        protocol: TagProtocol,
        executor: ToolExecutor,
        policy: BranchPolicy,
        rows: list[list[int]],
        seed: int | None,
    ) -> tuple[list[Trajectory], RolloutStats]:
        from ..rollout.stream_driver import StreamDriver

        if settings.max_model_len is None or settings.max_model_len > self.max_model_len:
            settings.max_model_len = self.max_model_len  # the engine refuses anything longer
        rollout = StreamDriver(settings, self.engine, protocol, executor, policy, self.vocab_size,
                                   self.tokenizer.eos_token_id, stop=protocol.stop_strings,
                                   measure_every_token=True)  # fmt: skip
        return rollout.run(rows, seed=seed)

    def close(self) -> None:
        if self._owned:
            self.engine.shutdown()


@dataclass
class RecordedBatch:
    """One rollout batch: B trajectories in slot order, their per-token entropies and the rollout statistics."""

    prompt_ids: list[list[int]]
    trajectories: list[Trajectory]
    entropies: list[list[float]]  # per trajectory, one per completion token (NaN where the environment wrote it)
    stats: RolloutStats


def rollout_with_entropies(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    tools: Sequence[Any],
    *,
    samples: int,
    max_new_tokens: int = 256,
    max_tool_calls: int | None = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    branching: bool = False,
    initial_rollouts: int | None = None,
    alpha: float = 0.0,
    beta: float = 0.0,
    branch_factor: int = 1,
    entropy_window: int = 20,
    entropy_normalization: str = "sum_lnV",
    tool_timeout: float = 30.0,
    seed: int | None = None,
) -> RecordedBatch:
    """Roll `samples` completions per prompt (M = `samples`) with the paper's tag-format tools.

    `model`: a transformers model (sampled with `temperature`, `top_p`, `top_k` through a `TransformersBackend`
    made for this call) or a backend (`TransformersBackend`, `VLLMBackend`: its own sampling settings apply, and
    the three arguments must be left at their defaults).

    With ``branching=False`` every completion is an independent trajectory. With ``branching=True``, N =
    `initial_rollouts` roots start and branches fork after tool results with P = clip(α + β·ΔH, 0, 1), Z =
    `branch_factor` at a time, k = `entropy_window` tokens per entropy window.
    """
    if isinstance(model, TransformersBackend | VLLMBackend):
        if (temperature, top_p, top_k) != (1.0, 1.0, 0):
            raise ValueError("a backend samples with its own settings: set temperature/top_p/top_k on the backend")
        backend, owned = model, False
    else:
        backend = TransformersBackend(model, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k)
        owned = True
    names = [getattr(t, "name", None) or t.__name__ for t in tools]
    protocol = TagProtocol(tokenizer, names)
    settings = RolloutSettings(
        group_size=samples,
        initial_rollouts=(initial_rollouts or samples) if branching else samples,
        branch_factor=branch_factor,
        entropy_window=entropy_window,
        entropy_normalization=entropy_normalization,
        branching=branching,
        max_completion_length=max_new_tokens,
        max_tool_rounds=max_tool_calls,
    )
    rows = [list(p) for p in prompt_ids for _ in range(samples)]
    try:
        with ToolExecutor(list(tools), timeout=tool_timeout) as executor:
            policy = BranchPolicy(alpha, beta, seed=seed)
            trajectories, stats = backend.rollout(settings, protocol, executor, policy, rows, seed)
    finally:
        if owned:
            backend.close()
    entropies = [[e if m else math.nan for e, m in zip(t.token_entropies, t.tool_mask)] for t in trajectories]
    return RecordedBatch(rows, trajectories, entropies, stats)


def teacher_forced_entropies(
    model: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int], temperature: float = 1.0
) -> list[float]:
    """H of the model's next-token distribution at every completion position, from one forward pass over
    prompt + completion (the reference the sampled entropies must match)."""
    from ..rollout.entropy import token_entropy

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    n = len(prompt_ids)
    h = token_entropy(logits[n - 1 : n - 1 + len(completion_ids)], temperature if temperature > 0 else 1.0)
    return [float(v) for v in h.cpu().tolist()]


def is_nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
