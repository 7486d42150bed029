"""The transformers backend of the round driver (the `Generator` seam of `round_driver.py`).

`TransformersGenerator` runs one batched `model.generate` per round and captures each sampled token's entropy
with a forward hook on the LM head (`EntropyRecorder`), so no extra forward pass is made. It runs on one of two
model sources:

- `TrainerModel`: the trainer's model, sampling config and distributed wrapping (ZeRO-3 gathering, FSDP), read
  afresh at every call, since the trainer re-wraps its model when training starts;
- `PlainModel`: a model, its tokenizer and sampling settings, no trainer (the entropy analyser,
  `TransformersGenerator.for_model`).

The asynchronous driver's backend is `vllm_engine.VLLMEngine` (one request stream per trajectory, no `Generator`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from .entropy import EntropyRecorder, output_logit_transform
from .tree import Segment

if TYPE_CHECKING:
    from trl import GRPOTrainer


class _FirstStop(StoppingCriteria):
    """Wraps a criterion and records, per row, the sequence length at which it first fired."""

    def __init__(self, inner: StoppingCriteria) -> None:
        self.inner = inner
        self.first: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        fired = self.inner(input_ids, scores, **kwargs)
        if self.first is None:
            self.first = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
        newly = fired & (self.first < 0)
        self.first[newly] = input_ids.shape[1]
        return fired


def output_segments(
    new_ids: torch.Tensor,
    entropies: torch.Tensor | None,
    max_new_tokens: list[int],
    eos_token_ids: list[int],
    stop: _FirstStop | None,
    prompt_width: int,
) -> list[Segment]:
    """Cut each row of a batched `generate` output at its own end: the first EOS (kept), the stop string that fired
    first, or the row's own budget, whichever comes first; the entropies are cut alike."""
    new_ids = new_ids.cpu()
    entropies = torch.full(new_ids.shape, float("nan")) if entropies is None else entropies.cpu()
    if entropies.shape[1] < new_ids.shape[1]:  # the recorder stopped after k steps: later tokens are unmeasured
        missing = torch.full((entropies.shape[0], new_ids.shape[1] - entropies.shape[1]), float("nan"))
        entropies = torch.cat([entropies, missing], dim=1)
    eos = torch.tensor(eos_token_ids)
    segments = []
    for i, limit in enumerate(max_new_tokens):
        ids = new_ids[i]
        end, finish = min(limit, ids.numel()), "length"
        is_eos = torch.isin(ids[:end], eos).nonzero()
        if is_eos.numel():
            end, finish = int(is_eos[0]) + 1, "eos"
        if stop is not None and stop.first is not None and stop.first[i] >= 0:
            stop_end = int(stop.first[i]) - prompt_width
            if stop_end < end or (stop_end == end and finish == "length"):
                end, finish = stop_end, "stop"
        segments.append(Segment(ids[:end].tolist(), entropies[i, :end].tolist(), finish))
    return segments


class TrainerModel:
    """The trainer's model as a generation source: its tokenizer, `generation_config`, EOS ids, device and
    distributed wrapping (what `GRPOTrainer._generate_single_turn` uses on its transformers path)."""

    collective = True  # under ZeRO-3 / FSDP every rank must join each generate call

    def __init__(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer

    # Read from the trainer at each call, as GRPOTrainer itself does.
    @property
    def tokenizer(self) -> Any:
        return self.trainer._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return self.trainer.eos_token_ids

    @property
    def pad_token_id(self) -> int:
        return self.trainer._tokenizer.pad_token_id

    @property
    def device(self) -> torch.device:
        return self.trainer.accelerator.device

    @property
    def generation_config(self) -> GenerationConfig:
        return self.trainer.generation_config

    @contextlib.contextmanager
    def generating(self) -> Iterator[Any]:
        """The unwrapped model, parameters gathered where sharded, gradients off."""
        t = self.trainer
        # As TRL 1.16's GRPOTrainer._generate_single_turn (its transformers path) unwraps the model for generation:
        # that method offers no hook for stopping criteria, per-call budgets or the LM-head entropy hook.
        with (
            unwrap_model_for_generation(
                t.model_wrapped,
                t.accelerator,
                gather_deepspeed3_params=t.args.ds3_gather_for_generation,
                generation_kwargs=t.generation_kwargs,
                gradient_checkpointing_kwargs=t.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            t._dist.summon_full_params(t.model_wrapped, recurse=False),
        ):
            yield unwrapped_model


class PlainModel:
    """A plain transformers model as a generation source: no trainer, accelerator or distributed wrapping.

    Args:
        model: a causal LM, used as it is (put it in eval mode first).
        tokenizer: its tokenizer.
        generation_config: the sampling settings (`PlainModel.sampling` builds one).
    """

    collective = False  # one process: nothing to join when there are no rows

    def __init__(self, model: Any, tokenizer: Any, generation_config: GenerationConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        ids = generation_config.eos_token_id
        self.eos_token_ids: list[int] = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        self.pad_token_id: int = generation_config.pad_token_id

    @property
    def device(self) -> torch.device:
        return self.model.device

    @contextlib.contextmanager
    def generating(self) -> Iterator[Any]:
        with torch.no_grad():
            yield self.model

    @staticmethod
    def sampling(
        model: Any, tokenizer: Any, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
    ) -> GenerationConfig:
        """Sampling at `temperature` (0: greedy) with `top_p` / `top_k` (0: off) filters, stopping at the model's
        EOS ids and the tokenizer's."""
        ids = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("the model and its tokenizer name no EOS token: generation would never end")
        sample = temperature > 0
        return GenerationConfig(
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=top_k if sample else None,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        )


class TransformersGenerator:
    """Continues token prefixes with `generate` on a model source (see the module docstring).

    Args:
        source: the trainer (`GRPOTrainer`, wrapped in a `TrainerModel`) or a `PlainModel`.
        stop_strings: strings that end a segment (the tools' closing tags).
        recorder: the entropy hook, already registered on the source model's LM head.
        measure_every_token: record the entropy of every sampled token of every row, ignoring the rollout's
            `need_entropy` (the analyser reads them all; ARPO reads only the windows it decides on).
    """

    def __init__(
        self,
        source: GRPOTrainer | TrainerModel | PlainModel,
        stop_strings: Sequence[str] | None,
        recorder: EntropyRecorder,
        *,
        measure_every_token: bool = False,
    ) -> None:
        self.source = source if isinstance(source, TrainerModel | PlainModel) else TrainerModel(source)
        self.stop_strings = list(stop_strings) if stop_strings else None
        # Built once: the constructor indexes the whole vocabulary (about 0.2 s for 49k tokens on 2 CPU cores), and
        # the criterion keeps no state between calls.
        self.stop_criterion = (
            StopStringCriteria(tokenizer=self.source.tokenizer, stop_strings=self.stop_strings)
            if self.stop_strings
            else None
        )
        self.recorder = recorder
        self.measure_every_token = measure_every_token
        self.calls = 0  # generate calls made (equal on every rank in a distributed run)
        self.idle_calls = 0  # of which this rank had no rows and joined with a dummy batch
        self._hooks: list[Any] = []  # set by `for_model`, which registers the recorder itself

    @classmethod
    def for_model(
        cls,
        model: Any,
        tokenizer: Any,
        stop_strings: Sequence[str] | None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        measure_every_token: bool = True,
        entropy_estimator: str = "exact",
    ) -> TransformersGenerator:
        """A generator on a plain model, no trainer: it samples at `temperature` (0: greedy, entropies then at
        T = 1) and hooks an `EntropyRecorder` (the model's own logit transform, every decoding step,
        `entropy_estimator` "exact" or "top_k") on the model until `close`."""
        scale, softcap = output_logit_transform(model.config.get_text_config())
        recorder = EntropyRecorder(temperature if temperature > 0 else 1.0, logit_scale=scale, softcap=softcap,
                                   estimator=entropy_estimator)  # fmt: skip
        config = PlainModel.sampling(model, tokenizer, temperature, top_p, top_k)
        generator = cls(PlainModel(model, tokenizer, config), stop_strings, recorder,
                        measure_every_token=measure_every_token)  # fmt: skip
        generator._hooks = recorder.attach(model)
        return generator

    def close(self) -> None:
        """Remove the hooks `for_model` registered (the trainer's own hooks are the trainer's to keep)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __call__(
        self, prefixes: list[list[int]], max_new_tokens: list[int], need_entropy: list[bool] | None = None
    ) -> list[Segment]:
        src = self.source
        dummy = not prefixes
        if dummy and not src.collective:
            return []
        self.calls += 1
        if dummy:
            self.idle_calls += 1
            # Another process still generates: join the collective calls (ZeRO-3 parameter gathering, synced
            # decoding) with one throw-away row.
            prefixes, max_new_tokens = [[src.tokenizer.eos_token_id]], [1]
        budget = max(1, max(max_new_tokens))
        device = src.device
        rows = [torch.tensor(p) for p in prefixes]
        input_ids = pad(rows, padding_value=src.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left").to(device)
        config = copy.copy(src.generation_config)
        config.max_new_tokens = budget
        criteria = StoppingCriteriaList()
        recorder_stop = None
        if self.stop_criterion is not None:
            recorder_stop = _FirstStop(self.stop_criterion)
            criteria.append(recorder_stop)

        # Entropy only for the rows whose window will be read (NaN for the others); none at all if no row needs it.
        needs = [True] * len(prefixes) if need_entropy is None or self.measure_every_token else need_entropy
        need_rows = [i for i, need in enumerate(needs) if need and not dummy]
        if need_rows:
            self.recorder.arm(None if len(need_rows) == len(prefixes) else need_rows)
        new_ids = None
        try:
            with src.generating() as model:
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    stopping_criteria=criteria,
                )
            new_ids = output[:, input_ids.shape[1] :]
        finally:
            # top_k reads the last step's sampled token from the output.
            entropies = self.recorder.disarm(new_ids) if need_rows else None
        if dummy:
            return []
        return output_segments(new_ids, entropies, max_new_tokens, src.eos_token_ids, recorder_stop,
                              input_ids.shape[1])  # fmt: skip
