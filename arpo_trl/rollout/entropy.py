"""Token entropy during sampling, and the window statistics ARPO branches on.

Paper Eq. 3: with logits z_t and p_t = softmax(z_t / T), the entropy of the next-token distribution is

    H_t = − Σ_{j=1..V} p_{t,j} · log p_{t,j}

ARPO compares the entropies of k tokens: H_initial (the first k tokens a trajectory samples) and H_t (the first k
tokens sampled after tool result t). A window of token entropies becomes one number per `normalization`:

- ``"sum_lnV"``: Σ_{i≤k} H_i / ln V — the official code's scale (it divides by ln V); β = 0.2 was tuned on it.
- ``"mean"``: the mean of the window in nats (insensitive to a short window).
- ``"sum_V"``: Σ_{i≤k} H_i / V — the paper's literal formula; it makes ΔH vanishingly small.

ΔH_t = H(window_t) − H(window_initial) (Eq. 4). The entropies here are exact over the whole vocabulary by default,
computed at the sampling temperature on the model's output logits (after its own logit scaling or soft-capping,
`output_logit_transform`). They are the model's distribution, as in the paper's Eq. 3 and TRL's training
entropy: top-k, top-p, min-p and repetition-penalty processing, which shape what the sampler draws from, do not
enter them.

``estimator="top_k"`` is the official code's truncated estimate instead: Σ −p·ln p over the 10 most likely tokens
and the sampled one (`truncated_entropy`; docs/reproduction.md). Under a top-p or top-k sampling filter the two
backends' estimates differ: vLLM's logprobs are renormalised over the kept tokens, the transformers hook reads the
model's distribution at T. Without a filter they agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = −Σ p log p of softmax(logits / temperature) over the last dimension, in nats (float32).

    Computed as log Σ e^z' − Σ e^z'·z' / Σ e^z' with z' = z − max z: one exponential pass over the vocabulary
    instead of log_softmax's plus exp's (about 30 % less time per decoding step on CPU).
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    # Clamped so that masked (-inf) logits give p = 0 and a finite p·log p term (0 · -inf would be NaN).
    z = (z - z.amax(dim=-1, keepdim=True)).clamp_(min=-1e4)
    e = z.exp()
    total = e.sum(dim=-1)
    return total.log() - (e * z).sum(dim=-1) / total


TOP_K_CANDIDATES = 10  # the official code asks vLLM for 10 logprobs per token


def truncated_entropy(candidates: Mapping[int, float]) -> float:
    """Σ −p·ln p over the given candidates' logprobs (the official top-10 + sampled-token estimate, in nats)."""
    return -sum(math.exp(lp) * lp for lp in candidates.values() if lp > -math.inf)


def truncated_token_entropy(logprobs: torch.Tensor, sampled: torch.Tensor, k: int = TOP_K_CANDIDATES) -> torch.Tensor:
    """`truncated_entropy` of each row of `logprobs` (rows, V) over its top `k` tokens and its `sampled` token
    (counted once when it is among the top k), in nats (float32)."""
    top_values, top_ids = logprobs.topk(k, dim=-1)
    terms = -(top_values.exp() * top_values).nan_to_num(0.0).sum(dim=-1)
    sampled_lp = logprobs.gather(1, sampled.view(-1, 1)).squeeze(1)
    outside = ~(top_ids == sampled.view(-1, 1)).any(dim=-1)
    extra = -(sampled_lp.exp() * sampled_lp).nan_to_num(0.0)
    return terms + torch.where(outside, extra, torch.zeros_like(extra))


def window_entropy(entropies: Sequence[float], k: int, normalization: str, vocab_size: int) -> float:
    """One number for the first `k` token entropies of a segment (fewer when the segment is shorter)."""
    window = list(entropies[:k])
    if not window:
        raise ValueError("cannot measure the entropy of an empty window")
    total = float(sum(window))
    if normalization == "sum_lnV":
        return total / math.log(vocab_size)
    if normalization == "mean":
        return total / len(window)
    if normalization == "sum_V":
        return total / vocab_size
    raise ValueError(f"unknown entropy normalization {normalization!r}")


def output_logit_transform(text_config) -> tuple[float, float | None]:
    """(scale, softcap) a model applies to its LM head's output before the softmax.

    The LM-head hook sees the head's raw output, but some families transform it afterwards: Cohere multiplies by
    ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``, Granite and MiniCPM3 divide by ``logits_scaling``
    (HyperCLOVA X multiplies by it), and Gemma 2 soft-caps with ``final_logit_softcapping``. The same reading of
    the config as TRL's fused training head, so both see one distribution.
    """
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        factor = text_config.logits_scaling
        scale = factor if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / factor
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)


class EntropyRecorder:
    """Forward hook on the LM head that records the entropy of each sampled position while armed.

    `generate` calls the LM head once per decoding step; the hook reads the last position's logits and appends
    a (rows,) tensor. No extra forward pass is made. Disarmed (the default), it does nothing, so training
    forwards are unaffected. Armed with a subset of rows, it computes only theirs (the others read NaN).

    ``estimator="top_k"`` (the official truncated estimate) also needs the token each step sampled: a pre-hook on
    the input embeddings sees it as the next step's input (`attach` registers both), and `disarm` reads the last
    step's from the generated ids. One step's log-probabilities are kept meanwhile, never the whole window's.
    """

    def __init__(
        self,
        temperature: float,
        max_steps: int | None = None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        estimator: str = "exact",
    ) -> None:
        if estimator not in ("exact", "top_k"):
            raise ValueError(f"entropy estimator must be 'exact' or 'top_k', got {estimator!r}")
        self.temperature = temperature
        # The model's own post-head transform (see `output_logit_transform`): scale, then soft-cap, then 1/T.
        self.logit_scale = logit_scale
        self.softcap = softcap
        # ARPO reads only the first k entropies of each segment, and every segment starts with a generate call:
        # recording stops after `max_steps` decoding steps (None: record them all).
        self.max_steps = max_steps
        self.estimator = estimator
        self._steps: list[torch.Tensor] | None = None
        self._rows: list[int] | None = None
        self._row_index: torch.Tensor | None = None
        self._fed: torch.Tensor | None = None  # top_k: this step's input tokens, i.e. those the previous step sampled
        self._pending: torch.Tensor | None = None  # top_k: the last step's log-probabilities (its token not yet seen)

    def attach(self, model: torch.nn.Module) -> list[Any]:
        """Register the hooks on `model` (LM head; input embeddings for top_k); return their handles."""
        handles = [model.get_output_embeddings().register_forward_hook(self)]
        if self.estimator == "top_k":
            handles.append(model.get_input_embeddings().register_forward_pre_hook(self.see_inputs))
        return handles

    def see_inputs(self, module: torch.nn.Module, args: tuple) -> None:
        """Input-embedding pre-hook: during decoding, the tokens fed are those the previous step sampled."""
        if self._steps is not None and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            self._fed = args[0][:, -1]

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._steps is None:
            return
        if self._pending is not None and self._fed is not None:
            self._resolve(self._fed)
        if self.max_steps is not None and len(self._steps) >= self.max_steps:
            return
        rows = output.shape[0]
        last = output[:, -1, :].detach()
        if self.logit_scale != 1.0 or self.softcap:
            last = last.float() * self.logit_scale
            if self.softcap:
                last = self.softcap * torch.tanh(last / self.softcap)
        if self._rows is not None and self._row_index is None:
            self._row_index = torch.tensor(self._rows, dtype=torch.long, device=last.device)
        if self._row_index is not None:
            last = last.index_select(0, self._row_index)
        if self.estimator == "top_k":
            self._pending = torch.log_softmax(last.float() / self.temperature, dim=-1)
            return
        self._append(token_entropy(last, self.temperature), rows)

    def _resolve(self, sampled_all_rows: torch.Tensor) -> None:
        sampled = sampled_all_rows if self._row_index is None else sampled_all_rows.index_select(0, self._row_index)
        pending, self._pending = self._pending, None
        self._append(truncated_token_entropy(pending, sampled.to(pending.device)), rows=sampled_all_rows.shape[0])

    def _append(self, values: torch.Tensor, rows: int) -> None:
        if self._row_index is None:
            self._steps.append(values)
            return
        step = torch.full((rows,), float("nan"), device=values.device)
        step[self._row_index] = values
        self._steps.append(step)

    def arm(self, rows: list[int] | None = None) -> None:
        """Record from now on: every row, or only `rows` (indices into the batch)."""
        self._steps, self._rows, self._row_index = [], rows, None
        self._fed = self._pending = None

    def disarm(self, new_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Stop recording; return the (rows, steps) entropies recorded since `arm`, or None if none.

        `new_ids`: the generated tokens (rows, steps), which top_k needs for its last step's sampled token."""
        steps = self._steps
        if self._pending is not None and new_ids is not None and steps is not None and new_ids.shape[1] > len(steps):
            self._resolve(new_ids[:, len(steps)])
        self._steps, self._pending, self._fed = None, None, None
        if not steps:
            return None
        return torch.stack(steps, dim=1)
