"""The part of the vLLM backend that runs inside vLLM's worker process (imported there by qualified name).

- `EntropyProcessor`, a V1 logits processor: for each request that opts in (``SamplingParams.extra_args``
  ``{"arpo_entropy": {...}}``), it computes the exact full-vocabulary entropy of the distribution each of the
  request's first ``tokens`` sampled tokens is drawn from, and writes it into a shared-memory `EntropyTable` that
  the client process reads without a round trip through the engine.
- `WeightSyncExtension`, a worker extension (``worker_extension_cls``): reloads the weights from a file, exactly,
  on the CPU backend too.

Where the processor runs: vLLM V1's sampler applies the processors that are *not* argmax-invariant to the raw
float32 logits, before penalties and temperature (``Sampler.apply_logits_processors``, then ``sample`` divides by
T). So the processor divides by the request's temperature itself; greedy requests (T = 0) get the model's own
distribution (T = 1). It returns the logits untouched. It must declare itself not argmax-invariant: vLLM skips
argmax-invariant processors for greedy batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .vllm_engine import EXTRA_ARGS_KEY, EntropyTable

# The processor's own timer, per worker process: seconds in `apply` with tracked rows, such steps, rows measured.
STATS = {"seconds": 0.0, "steps": 0, "rows": 0}


class _Tracked:
    __slots__ = ("table", "row", "tag", "tokens", "output_ids", "inv_temperature")

    def __init__(self, table: EntropyTable, spec: dict, output_ids: list[int], temperature: float) -> None:
        self.table = table
        self.row = int(spec["row"])
        self.tag = int(spec["tag"])
        self.tokens = int(spec["tokens"])
        self.output_ids = output_ids  # vLLM's running list of the request's sampled tokens (a live reference)
        self.inv_temperature = 1.0 / temperature if temperature >= 1e-5 else 1.0  # greedy: the model's own p


class EntropyProcessor(LogitsProcessor):
    """Records exact full-vocabulary entropies at the sampling temperature for opted-in requests (module doc)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Tracked] = {}  # persistent-batch index -> tracked request
        self._tables: dict[str, EntropyTable] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if spec is not None and not {"table", "row", "tag", "tokens"} <= set(spec):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] needs table, row, tag and tokens, got {spec!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def _table(self, path: str) -> EntropyTable:
        table = self._tables.get(path)
        if table is None:
            table = self._tables[path] = EntropyTable(path)
        return table

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # vLLM's documented order: removed, then added (which may replace an index), then moved.
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            self._rows.pop(index, None)
            spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
            if spec is not None and len(output_ids) < int(spec["tokens"]):
                self._rows[index] = _Tracked(self._table(spec["table"]), spec, output_ids, params.temperature)
        for a, b, direction in batch_update.moved:
            at_a, at_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if at_a is not None:
                self._rows[b] = at_a
            if direction == MoveDirectionality.SWAP and at_b is not None:
                self._rows[a] = at_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        start = time.perf_counter()
        self._apply(logits)
        STATS["seconds"] += time.perf_counter() - start
        STATS["steps"] += 1
        return logits

    def _apply(self, logits: torch.Tensor) -> None:
        indices, scales, targets, done = [], [], [], []
        for index, tracked in self._rows.items():
            # The token this row's logits will sample is the request's token number len(output_ids). A step that
            # does not keep its sample (a partial prefill) is overwritten by the step that does.
            position = len(tracked.output_ids)
            if position >= tracked.tokens:
                done.append(index)
            elif index < logits.shape[0]:
                indices.append(index)
                scales.append(tracked.inv_temperature)
                targets.append((tracked, position))
        for index in done:  # its window is complete: no more work for it
            del self._rows[index]
        if indices:
            order = sorted(range(len(indices)), key=indices.__getitem__)
            indices = [indices[i] for i in order]
            scales = [scales[i] for i in order]
            targets = [targets[i] for i in order]
            if indices[-1] - indices[0] == len(indices) - 1:  # a contiguous run of rows (the usual case): a view
                rows = logits[indices[0] : indices[-1] + 1]
            else:
                rows = logits[torch.tensor(indices, device=logits.device)]
            scale = torch.tensor(scales, device=logits.device, dtype=torch.float32).unsqueeze(1)
            for (tracked, position), value in zip(targets, scaled_entropy(rows, scale).tolist()):
                tracked.table.write(tracked.row, tracked.tag, position, value)
            STATS["rows"] += len(indices)


def scaled_entropy(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`entropy.token_entropy` of ``logits * scale`` (scale = 1/T per row), with the scaling folded into its first
    pass and the later ones in place: about 4x faster per step on CPU than gathering, scaling, then calling it."""
    logits = logits.float()  # no copy when already float32 (vLLM hands the processors float32)
    z = (logits - logits.amax(dim=-1, keepdim=True)).mul_(scale).clamp_(min=-1e4)
    e = z.exp()
    total = e.sum(dim=-1)
    return total.log() - e.mul_(z).sum(dim=-1) / total


def _refresh_tied_lm_head(model: torch.nn.Module, tied: bool) -> None:
    """The CPU backend packs each linear layer's weight for its GEMM kernel when the model is loaded. A reload
    re-packs the layers it loads, but a tied LM head is never loaded itself (its weight is the embedding's), so
    its packed copy would keep the old weights: re-pack it from the (updated) shared weight."""
    head = getattr(model, "lm_head", None)
    if not tied or head is None or not hasattr(head, "cpu_linear"):
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(head, remove_weight=False)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called through ``collective_rpc`` by name."""

    def arpo_ping(self) -> int:
        """A no-op round trip to the worker (its pid): measures what an RPC per entropy read would cost."""
        return os.getpid()

    def arpo_entropy_stats(self) -> dict[str, float]:
        return dict(STATS)

    def arpo_load_weights(self, path: str) -> int:
        """Reload the weights saved with `torch.save` at `path` (HF names); return how many tensors were given."""
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self._arpo_reload(state.items())
        return len(state)

    def _arpo_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=iter(weights))
        hf_config = self.model_runner.model_config.hf_config
        tied = any(getattr(c, "tie_word_embeddings", False) for c in (hf_config, hf_config.get_text_config()))
        _refresh_tied_lm_head(self.model_runner.get_model(), tied)
