"""Generation backends for the tree rollout (the `Generator` seam of `engine.py`).

`TransformersGenerator` runs one batched `model.generate` per round and captures each sampled token's entropy
with a forward hook on the LM head (`EntropyRecorder`), so no extra forward pass is made. A vLLM backend would
implement the same `__call__(prefixes, max_new_tokens) -> list[Segment]` with top-K logprobs.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from .entropy import EntropyRecorder
from .rollout_tree import Segment

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


def split_segments(
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


class TransformersGenerator:
    """Continues token prefixes with the trainer's model, sampling config and distributed wrapping."""

    def __init__(self, trainer: GRPOTrainer, stop_strings: list[str] | None, recorder: EntropyRecorder) -> None:
        self.trainer = trainer
        self.stop_strings = stop_strings or None
        # Built once: the constructor indexes the whole vocabulary (about 0.2 s for 49k tokens on 2 CPU cores), and
        # the criterion keeps no state between calls.
        self.stop_criterion = (
            StopStringCriteria(tokenizer=trainer._tokenizer, stop_strings=self.stop_strings)
            if self.stop_strings
            else None
        )
        self.recorder = recorder
        self.calls = 0  # generate calls made (equal on every rank in a distributed run)
        self.idle_calls = 0  # of which this rank had no rows and joined with a dummy batch

    def __call__(
        self, prefixes: list[list[int]], max_new_tokens: list[int], need_entropy: list[bool] | None = None
    ) -> list[Segment]:
        t = self.trainer
        tok = t._tokenizer
        self.calls += 1
        dummy = not prefixes
        if dummy:
            self.idle_calls += 1
            # Another process still generates: join the collective calls (ZeRO-3 parameter gathering, synced
            # decoding) with one throw-away row.
            prefixes, max_new_tokens = [[tok.eos_token_id]], [1]
        budget = max(1, max(max_new_tokens))
        device = t.accelerator.device
        rows = [torch.tensor(p) for p in prefixes]
        input_ids = pad(rows, padding_value=tok.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left").to(device)
        config = copy.copy(t.generation_config)
        config.max_new_tokens = budget
        criteria = StoppingCriteriaList()
        recorder_stop = None
        if self.stop_criterion is not None:
            recorder_stop = _FirstStop(self.stop_criterion)
            criteria.append(recorder_stop)

        # Copied from trl/trainer/grpo_trainer.py:1856-1871 (GRPOTrainer._generate_single_turn, transformers path):
        # that method offers no hook for stopping criteria, per-call budgets or the LM-head entropy hook.
        # Entropy only for the rows whose window will be read (NaN for the others); none at all if no row needs it.
        need_rows = [i for i, need in enumerate(need_entropy or [True] * len(prefixes)) if need and not dummy]
        if need_rows:
            self.recorder.arm(None if len(need_rows) == len(prefixes) else need_rows)
        try:
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
                output = unwrapped_model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    stopping_criteria=criteria,
                )
        finally:
            entropies = self.recorder.disarm() if need_rows else None
        if dummy:
            return []
        return split_segments(output[:, input_ids.shape[1] :], entropies, max_new_tokens, t.eos_token_ids, recorder_stop,
                              input_ids.shape[1])  # fmt: skip
