"""The rollout's backends behind one interface: a batch of groups in, a `RolloutResult` out.

- `TransformersBackend`: the round driver (`RoundDriver`) over transformers ``generate`` — the trainer's model
  (`TrainerModel`: its distributed wrapping, every rank joining each call) or a plain model (`PlainModel`: the
  entropy analyser, which measures every sampled token).
- `VLLMBackend`: the asynchronous driver (`StreamDriver`) over a vLLM engine — colocated (`VLLMEngine`, started
  here from the trainer's model or a model directory) or a server (`VLLMServerEngine`) — owning its lifecycle:
  the weights it serves (`sync_weights`, once per optimizer step), its prefix cache (reset with each load) and its
  shutdown (`close`).

`build_backend` makes the trainer's from its config, once; the analyser and the benchmark build theirs with the
same classes. Whatever a rollout measured (its statistics, the backend's prefix-cache figures, the sampling
logprobs) comes back in the result: nothing is read from a driver or a backend after `rollout`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..tools import ToolExecutor
from .branching import BranchPolicy
from .entropy import EntropyRecorder
from .generation import TrainerModel, TransformersGenerator
from .round_driver import RoundDriver
from .trajectory import Trajectory
from .tree import RolloutSettings, RolloutStats, ToolProtocol


@dataclass
class RolloutParts:
    """What one rollout runs with, besides its prompts: the tree's settings, the tool format, the tools, the
    branching policy (Eq. 5), and per trajectory the tools of its environment (`toolset`, TRL's
    `environment_factory`) and the official per-slot initial entropies (`frozen_initial`)."""

    settings: RolloutSettings
    protocol: ToolProtocol
    executor: ToolExecutor
    policy: BranchPolicy
    eos_token_id: int
    toolset: Callable[[Trajectory], Mapping[str, Any] | None] | None = None
    frozen_initial: dict[int, float] | None = None


@dataclass
class RolloutResult:
    """A finished rollout: B trajectories in slot order, its statistics (the backend's figures included) and,
    from vLLM, each trajectory's sampling logprobs (TRL's importance-sampling correction reads them)."""

    trajectories: list[Trajectory]
    stats: RolloutStats
    logprobs: list[list[float]] | None = None
    seconds: float = 0.0  # wall time of `rollout`, tools included

    @property
    def prompt_ids(self) -> list[list[int]]:
        """Each row's own prompt (a branch's is its parent's)."""
        return [t.prompt_ids for t in self.trajectories]


class RolloutBackend(Protocol):
    """What ARPO's rollout samples through."""

    vocab_size: int

    def rollout(
        self,
        parts: RolloutParts,
        prompt_ids: Sequence[list[int]],
        environments: Sequence[Any] | None = None,
        seed: int | None = None,
    ) -> RolloutResult:
        """Roll out `prompt_ids` (B = groups × M rows, groups contiguous; row i starts from `prompt_ids[i]` and
        `environments[i]`), branching with `parts.policy` (reseed it first for a reproducible tree)."""
        ...

    def sync_weights(self, model: Any, step: int, accelerator: Any) -> float | None:
        """Before a rollout: serve the weights of optimizer step `step` (every rank calls it at the same steps).
        Returns the seconds a load took, or None when nothing was loaded."""
        ...

    def close(self) -> None: ...


class TransformersBackend:
    """The round driver over ``model.generate``.

    Args:
        model: a causal LM, sampled as it is (evaluated in eval mode; its mode is restored after each rollout).
        tokenizer: its tokenizer.
        temperature: T of p = softmax(z / T); 0 samples greedily and measures the entropy at T = 1.
        top_p, top_k: sampling filters (0: off). They do not change the measured entropy, which is the model's
            distribution over the whole vocabulary, as in the trainer.

    A backend on a plain model measures every sampled token's entropy (the analyser's use); the trainer's
    (`for_trainer`) only the windows ARPO decides on.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.generator: TransformersGenerator | None = None  # the trainer's, built once
        self.any_active: Callable[[bool], bool] | None = None  # the trainer's collective "any trajectory live?"

    @classmethod
    def for_trainer(
        cls, trainer: Any, stop_strings: Sequence[str] | None, recorder: EntropyRecorder
    ) -> TransformersBackend:
        """The trainer's model as TRL's transformers path samples it (`TrainerModel`), its entropy hook already
        attached; in a multi-process run every rank makes the same generate calls (`any_active` is a collective)."""
        backend = cls.__new__(cls)
        backend.model, backend.tokenizer, backend.sampling = None, trainer._tokenizer, {}
        # From the config: under ZeRO-3 the LM head's weight is partitioned and its local shape is empty.
        backend.vocab_size = int(trainer.model.config.get_text_config().vocab_size)
        backend.generator = TransformersGenerator(TrainerModel(trainer), stop_strings, recorder)
        accelerator = trainer.accelerator

        def any_active(local_active: bool) -> bool:  # True while any process still has a live trajectory
            if accelerator.num_processes == 1:
                return local_active
            flag = torch.tensor([int(local_active)], device=accelerator.device)
            return bool(accelerator.gather(flag).sum().item())

        backend.any_active = any_active
        return backend

    def rollout(
        self,
        parts: RolloutParts,
        prompt_ids: Sequence[list[int]],
        environments: Sequence[Any] | None = None,
        seed: int | None = None,
    ) -> RolloutResult:
        started = time.perf_counter()
        if self.generator is not None:  # the trainer's: its RNG is the trainer's, seeded by TRL
            driver = self._driver(parts, self.generator)
            trajectories, stats = driver.run(prompt_ids, environments)
            return RolloutResult(trajectories, stats, None, time.perf_counter() - started)
        if seed is not None:
            torch.manual_seed(seed)
        generator = TransformersGenerator.for_model(self.model, self.tokenizer, parts.protocol.stop_strings,
                                                    **self.sampling)  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        try:
            trajectories, stats = self._driver(parts, generator).run(prompt_ids, environments)
        finally:
            generator.close()
            self.model.train(was_training)
        return RolloutResult(trajectories, stats, None, time.perf_counter() - started)

    def sync_weights(self, model: Any, step: int, accelerator: Any) -> None:
        """Nothing to load: ``generate`` samples the model being trained."""
        return None

    def _driver(self, parts: RolloutParts, generator: TransformersGenerator) -> RoundDriver:
        return RoundDriver(parts.settings, generator, parts.protocol, parts.executor, parts.policy, self.vocab_size,
                           parts.eos_token_id, toolset=parts.toolset, frozen_initial=parts.frozen_initial,
                           **({"any_active": self.any_active} if self.any_active else {}))  # fmt: skip

    def close(self) -> None:
        pass


class VLLMBackend:
    """The asynchronous driver over a vLLM engine started here from a model directory (shut it down with `close`).

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

        from .vllm_engine import VLLMEngine

        vocab_size = int(AutoConfig.from_pretrained(model_path).get_text_config().vocab_size)
        engine = VLLMEngine(model_path, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                            max_model_len=max_model_len, seed=seed, **engine_kwargs)  # fmt: skip
        self._init(engine, tokenizer, vocab_size, owned=True, measure_every_token=True)

    def _init(self, engine: Any, tokenizer: Any, vocab_size: int, *, owned: bool, measure_every_token: bool,
              entropy_estimator: str = "exact", server: bool = False) -> None:  # fmt: skip
        self.engine = engine
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = getattr(engine, "max_model_len", None)
        self.owned = owned
        self.measure_every_token = measure_every_token  # the analyser reads every token's entropy
        self.entropy_estimator = entropy_estimator
        self.server = server
        self.loaded_step = -1  # the optimizer step whose weights the engine holds (-1: sync before the first rollout)

    @classmethod
    def on_engine(cls, engine: Any, tokenizer: Any, vocab_size: int) -> VLLMBackend:
        """A backend on an engine already running (the trainer's, after training: no second start); it samples
        with that engine's settings, and `close` leaves the engine running."""
        backend = cls.__new__(cls)
        backend._init(engine, tokenizer, vocab_size, owned=False, measure_every_token=True)
        return backend

    @classmethod
    def for_trainer(cls, trainer: Any) -> VLLMBackend:
        """ARPO's engine for a trainer with ``use_vllm=True``: a colocated `VLLMEngine` serving this process's copy
        of the model (exported once; later weights come through `sync_weights`), or with ``vllm_mode="server"`` a
        client of `trl vllm-serve` (`VLLMServerEngine`; only the main process pushes weights, as in GRPOTrainer)."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        a, accelerator = trainer.args, trainer.accelerator
        sampling = dict(
            temperature=trainer.temperature,
            top_p=trainer.top_p,
            top_k=trainer.top_k if trainer.top_k and trainer.top_k > 0 else -1,
            min_p=trainer.min_p or 0.0,
        )
        model = accelerator.unwrap_model(trainer.model)
        vocab_size = int(model.config.get_text_config().vocab_size)
        backend = cls.__new__(cls)
        if a.vllm_mode == "server":
            from .vllm_server import VLLMServerEngine

            device = accelerator.device
            engine = VLLMServerEngine(
                a.vllm_server_base_url or f"http://{a.vllm_server_host}:{a.vllm_server_port}",
                **sampling,
                connection_timeout=a.vllm_server_timeout,
                weight_sync=("nccl" if device.type == "cuda" else "shared_file")
                if accelerator.is_main_process
                else "none",
                group_port=a.vllm_group_port,
                device=device,
            )
            backend._init(engine, trainer._tokenizer, vocab_size, owned=True, measure_every_token=False,
                          entropy_estimator=a.entropy_estimator, server=True)  # fmt: skip
            return backend

        from .vllm_engine import VLLMEngine
        from .vllm_weights import autocast_mismatch, export_model

        text_config = model.config.get_text_config()
        max_model_len = getattr(text_config, "max_position_embeddings", None) or a.vllm_max_model_length
        if a.vllm_max_model_length:
            max_model_len = min(max_model_len, a.vllm_max_model_length)
        on_cpu = accelerator.device.type == "cpu"
        engine_kwargs: dict[str, Any] = {}
        if not on_cpu and a.vllm_kv_cache_gib is None:
            engine_kwargs["gpu_memory_utilization"] = a.vllm_gpu_memory_utilization
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        mismatch = autocast_mismatch(dtype, accelerator.mixed_precision)
        if mismatch:
            warnings.warn(mismatch, stacklevel=4)
        directory = tempfile.mkdtemp(prefix="arpo-vllm-model-")
        try:
            export_model(model, trainer.processing_class, directory, zero3=is_deepspeed_zero3_enabled())
            engine = VLLMEngine(
                directory,
                **sampling,
                max_model_len=max_model_len,
                seed=a.seed + accelerator.process_index,
                kv_cache_gib=a.vllm_kv_cache_gib if a.vllm_kv_cache_gib is not None or not on_cpu else 1.0,
                # One engine per process: on a CPU host each takes its own core, as two unpinned engines slow each
                # other.
                cpu_bind=str(accelerator.local_process_index % (os.cpu_count() or 1))
                if on_cpu and accelerator.num_processes > 1
                else None,
                dtype=dtype,
                max_num_seqs=max(16, a.per_device_train_batch_size * a.steps_per_generation),
                **engine_kwargs,
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # loaded: later weights come through load_weights
        backend._init(engine, trainer._tokenizer, vocab_size, owned=True, measure_every_token=False,
                      entropy_estimator=a.entropy_estimator)  # fmt: skip
        return backend

    def sync_weights(self, model: Any, step: int, accelerator: Any) -> float | None:
        """After an optimizer step: the engine gets `model`'s weights (gathered once under ZeRO-3, LoRA merged), and
        its prefix cache, computed with the old ones, is reset. Every rank calls it at the same steps. Returns the
        seconds it took, or None when the engine already holds `step`'s weights."""
        if step == self.loaded_step:
            return None
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        from .vllm_weights import training_weights

        start = time.perf_counter()
        with training_weights(accelerator.unwrap_model(model), zero3=is_deepspeed_zero3_enabled()) as weights:
            if not self.server or accelerator.is_main_process:
                self.engine.load_weights(weights.items())
        if self.server:  # one server for all: no process samples before the main one has pushed the weights
            accelerator.wait_for_everyone()
        self.loaded_step = step
        return time.perf_counter() - start

    def rollout(
        self,
        parts: RolloutParts,
        prompt_ids: Sequence[list[int]],
        environments: Sequence[Any] | None = None,
        seed: int | None = None,
    ) -> RolloutResult:
        from .stream_driver import StreamDriver

        settings = parts.settings
        if self.max_model_len and (settings.max_model_len is None or settings.max_model_len > self.max_model_len):
            settings.max_model_len = self.max_model_len  # the engine refuses anything longer
        started = time.perf_counter()
        driver = StreamDriver(settings, self.engine, parts.protocol, parts.executor, parts.policy, self.vocab_size,
                              parts.eos_token_id, stop=parts.protocol.stop_strings,
                              entropy_estimator=self.entropy_estimator, toolset=parts.toolset,
                              frozen_initial=parts.frozen_initial,
                              measure_every_token=self.measure_every_token)  # fmt: skip
        try:
            trajectories, stats = driver.run(prompt_ids, environments, seed=seed)
        except Exception as exc:
            if self.alive():
                raise
            raise RolloutBackendError(
                f"{self.describe()} stopped answering during the rollout ({type(exc).__name__}: {exc}). The step is "
                "lost; once the engine is back, resume with trainer.train(resume_from_checkpoint=True)."
            ) from exc
        logprobs = [t.logprobs for t in trajectories]
        return RolloutResult(trajectories, stats, logprobs, time.perf_counter() - started)

    def describe(self) -> str:
        """The engine, as an error names it."""
        if self.server:
            return f"the vLLM server at {self.engine.base_url}"
        return "ARPO's colocated vLLM engine"

    def alive(self) -> bool:
        """Whether the engine still answers: the colocated engine's core process is running (vLLM's own flag), the
        server answers ``/health`` within 10 s. An engine without a health probe counts as alive."""
        healthy = getattr(self.engine, "healthy", None)
        try:
            return True if healthy is None else bool(healthy(timeout=10.0))
        except Exception:  # noqa: BLE001 - a failing probe is the answer
            return False

    def close(self) -> None:
        if self.owned:
            self.engine.shutdown()


class RolloutBackendError(RuntimeError):
    """The backend's engine died or went silent during a rollout: the step cannot finish."""


def build_backend(trainer: Any, use_vllm: bool, stop_strings: Sequence[str] | None,
                  recorder: EntropyRecorder) -> TransformersBackend | VLLMBackend:  # fmt: skip
    """The trainer's backend, from its config: vLLM (colocated or server) with ``use_vllm``, else transformers."""
    if use_vllm:
        return VLLMBackend.for_trainer(trainer)
    return TransformersBackend.for_trainer(trainer, stop_strings, recorder)


__all__ = [
    "RolloutBackend",
    "RolloutBackendError",
    "RolloutParts",
    "RolloutResult",
    "TransformersBackend",
    "VLLMBackend",
    "build_backend",
]
