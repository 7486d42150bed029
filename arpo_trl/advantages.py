"""Advantage attribution over the shared prefixes of a rollout tree (paper §3.2, Eq. 6–7).

Rows of one prompt form a group of M contiguous rows. A branch shares its parent's tokens up to the fork point.

- **soft** (paper default): each row keeps its GRPO advantage Â_i = (R_i − mean R) / (std R + ε) on every token,
  so a token shared by d rows is trained d times with the d different advantages. This is exactly what TRL's
  `GRPOTrainer` already computes for the M rows; nothing to do.
- **hard**: a token shared by the rows S(i, t) = { j : o_{j,≤t} = o_{i,≤t} } gets the mean of their advantages,

      Â^hard_{i,t} = (1 / |S(i,t)|) · Σ_{j ∈ S(i,t)} Â_j

  Tokens owned by one row keep Â_i. S is rebuilt after the fact from token equality (a prefix trie), so rows whose
  prefixes are identical by chance count as sharers too, which is the correct Monte-Carlo estimate.
"""

from __future__ import annotations

import torch


def hard_attribution(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Per-token hard advantages.

    Args:
        completion_ids: (B, T) token ids, rows grouped contiguously in groups of `group_size`.
        completion_mask: (B, T), 1 on valid completion tokens (tool-result tokens included: they are part of the
            shared prefix even though the loss masks them), 0 on padding.
        advantages: (B,) sequence-level advantages Â_i.
        group_size: M, rows per group.

    Returns:
        (B, T) advantages: for token t of row i, the mean of Â_j over the rows j of i's group whose tokens 0..t are
        all valid and equal to row i's; 0 on padding.
    """
    if completion_ids.dim() != 2 or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            f"completion_ids and completion_mask must both be (B, T); got {tuple(completion_ids.shape)} and "
            f"{tuple(completion_mask.shape)}"
        )
    batch, length = completion_ids.shape
    if advantages.shape != (batch,):
        raise ValueError(f"advantages must be (B,) = ({batch},), got {tuple(advantages.shape)}")
    if group_size < 1 or batch % group_size:
        raise ValueError(f"B={batch} rows cannot be split into groups of group_size={group_size}")
    valid = completion_mask.bool()
    out = torch.zeros(batch, length, dtype=advantages.dtype, device=advantages.device)
    # One group at a time keeps memory at M × M × T.
    for start in range(0, batch, group_size):
        ids = completion_ids[start : start + group_size]
        ok = valid[start : start + group_size]
        adv = advantages[start : start + group_size]
        equal = (ids[:, None, :] == ids[None, :, :]) & ok[:, None, :] & ok[None, :, :]  # (M, M, T)
        shared = torch.cumprod(equal.to(torch.int32), dim=-1).bool()  # j shares i's whole prefix up to t
        weights = shared.to(adv.dtype)
        total = torch.einsum("ijt,j->it", weights, adv)
        count = weights.sum(dim=1).clamp(min=1.0)
        out[start : start + group_size] = torch.where(ok, total / count, torch.zeros_like(total))
    return out
