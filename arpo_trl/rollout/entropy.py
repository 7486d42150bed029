"""Token entropy during sampling, and the window statistics ARPO branches on.

Paper Eq. 3: with logits z_t and p_t = softmax(z_t / T), the entropy of the next-token distribution is

    H_t = − Σ_{j=1..V} p_{t,j} · log p_{t,j}

ARPO compares the entropies of k tokens: H_initial (the first k tokens a trajectory samples) and H_t (the first k
tokens sampled after tool result t). A window of token entropies becomes one number per `normalization`:

- ``"sum_lnV"``: Σ_{i≤k} H_i / ln V — the official code's scale (it divides by ln V); β = 0.2 was tuned on it.
- ``"mean"``: the mean of the window in nats (insensitive to a short window).
- ``"sum_V"``: Σ_{i≤k} H_i / V — the paper's literal formula; it makes ΔH vanishingly small.

ΔH_t = H(window_t) − H(window_initial) (Eq. 4). The entropies here are exact over the whole vocabulary (not the
official top-10 truncation, docs/reproduction.md), computed at the sampling temperature on the model's output logits
(after its own logit scaling or soft-capping, `output_logit_transform`). They are the model's distribution, as
in the paper's Eq. 3 and TRL's training entropy: top-k, top-p, min-p and repetition-penalty processing, which
shape what the sampler draws from, do not enter them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """

    def __init__(
        self,
        temperature: float,
        max_steps: int | None = None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ) -> None:
        self.temperature = temperature
        # The model's own post-head transform (see `output_logit_transform`): scale, then soft-cap, then 1/T.
        self.logit_scale = logit_scale
        self.softcap = softcap
        # ARPO reads only the first k entropies of each segment, and every segment starts with a generate call:
        # recording stops after `max_steps` decoding steps (None: record them all).
        self.max_steps = max_steps
        self._steps: list[torch.Tensor] | None = None
        self._rows: list[int] | None = None
        self._row_index: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._steps is None or (self.max_steps is not None and len(self._steps) >= self.max_steps):
            return
        last = (output[0] if isinstance(output, tuple) else output)[:, -1, :].detach()
        if self.logit_scale != 1.0 or self.softcap:
            last = last.float() * self.logit_scale
            if self.softcap:
                last = self.softcap * torch.tanh(last / self.softcap)
        if self._rows is None:
            self._steps.append(token_entropy(last, self.temperature))
            return
        if self._row_index is None:
            self._row_index = torch.tensor(self._rows, dtype=torch.long, device=last.device)
        step = torch.full((last.shape[0],), float("nan"), device=last.device)
        step[self._row_index] = token_entropy(last.index_select(0, self._row_index), self.temperature)
        self._steps.append(step)

    def arm(self, rows: list[int] | None = None) -> None:
        """Record from now on: every row, or only `rows` (indices into the batch)."""
        self._steps, self._rows, self._row_index = [], rows, None

    def disarm(self) -> torch.Tensor | None:
        """Stop recording; return the (rows, steps) entropies recorded since `arm`, or None if none."""
        steps, self._steps = self._steps, None
        if not steps:
            return None
        return torch.stack(steps, dim=1)
