"""The shared-prefix training forward: every distinct token of a batch through the model once.

TRL's `_get_per_token_logps_and_entropies` runs each row (prompt + completion, padded) through the model on its own,
so a group's prompt is computed M times and an ARPO branch recomputes its parent's prefix. Rows that start with the
same tokens have the same hidden states there (the model is causal), so they can share them.

`pack_rows` folds the rows of a padded batch into a prefix forest and lays it out as one packed sequence of *edges*:
an entry holds a token and predicts one next token. A token followed by k different tokens in different rows (the
prompt's last token before N roots, a tool result before its forks) gets k entries, one per continuation, each
attended only by its own subtree; every other token gets one. So the packed length is the number of distinct
(prefix → next token) predictions, and TRL's fused LM head scores each entry with one pre-shifted label, exactly as
it scores a padded row. Positions are each token's depth in its row; the attention mask lets an entry see itself
and its ancestors only.

Sharing is found from the token ids alone (no rollout metadata), so it serves ARPO's trees, GRPO's groups and a
system prompt common to several prompts alike. The numbers equal the per-row forward's up to floating-point
rounding: positions start at 0 rather than at the row's left padding, which rotary position embeddings do not see
(they depend on position differences only); models where that or the custom mask would change the result are
refused by `unsupported_reason` or caught by the trainer's one-time check against the per-row forward.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Attention implementations that take a custom 4D mask as given (transformers' masking utilities return a 4D mask
# as-is): sdpa reads a boolean mask, eager adds a float one.
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class Pack:
    """One packed forward: T entries (a prefix forest), and where each row's scored log-probabilities come from.

    Attributes:
        input_ids: (1, T) the token of each entry.
        position_ids: (1, T) its depth in its row (0 = the row's first real token).
        labels: (1, T) the next token the entry predicts where some row scores it, else -100 (pre-shifted labels
            for TRL's fused LM head).
        ancestors: (T, T) bool, True where entry q may attend to entry k (k is q or an ancestor of q).
        rows, columns, entries: (S,) for each scored token: its row and column in the (B, logits_to_keep) output,
            and the entry whose log-probability it is.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    ancestors: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    entries: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def real_spans(attention_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """(first, end) of each row's real tokens, or None when some row's mask is not one contiguous run of ones (then
    the rows cannot be read as token sequences and the per-row forward must be used)."""
    mask = attention_mask.bool().cpu()
    counts = mask.sum(1)
    first = mask.int().argmax(1)
    spans = []
    for r in range(mask.shape[0]):
        n, f = int(counts[r]), int(first[r])
        if n == 0 or not bool(mask[r, f : f + n].all()):
            return None
        spans.append((f, f + n))
    return spans


class _PackBuilder:
    """Accumulates rows into one prefix forest (see the module docstring)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.depths: list[int] = []
        self.labels: list[int] = []
        self.row_tokens: list[torch.Tensor] = []  # the rows in this pack, for longest-common-prefix search
        self.chains: list[list[int]] = []  # per row: its entries, depth 0 … n−2 (the last token predicts nothing)
        self.scored: list[tuple[int, int, int]] = []  # (batch row, output column, entry)

    def plan(self, tokens: torch.Tensor) -> tuple[int, int]:
        """(row in this pack sharing the longest prefix with `tokens` or -1, that prefix's length)."""
        best, best_len = -1, 0
        n = tokens.shape[0]
        for i, other in enumerate(self.row_tokens):
            m = min(n, other.shape[0])
            if m == 0 or other[0] != tokens[0]:
                continue
            diff = (other[:m] != tokens[:m]).nonzero()
            common = int(diff[0]) if diff.numel() else m
            if common > best_len:
                best, best_len = i, common
        return best, best_len

    @staticmethod
    def new_entries(tokens: torch.Tensor, plan: tuple[int, int]) -> int:
        """How many entries adding `tokens` with `plan` (its `plan`) would create."""
        return max(tokens.shape[0] - 1 - max(plan[1] - 1, 0), 0)

    def add(
        self, tokens: torch.Tensor, row: int, scored_from: int, column_of_depth: int, plan: tuple[int, int]
    ) -> None:
        """Add a row: `tokens` its real tokens, `plan` its `plan` in this pack; depths ≥ `scored_from` are scored,
        at output column depth + `column_of_depth`."""
        ids = tokens.tolist()
        n = len(ids)
        source, common = plan
        # Entries for depths 0 … common−2 are the source row's (edges inside the shared prefix); the entry at depth
        # common−1 (the last shared token, now followed by this row's own next token) and all later ones are new.
        keep = max(common - 1, 0)
        chain = self.chains[source][:keep] if source >= 0 else []
        for depth in range(keep, n - 1):
            chain.append(len(self.tokens))
            self.tokens.append(ids[depth])
            self.depths.append(depth)
            self.labels.append(-100)
        for depth in range(max(scored_from, 1), n):
            entry = chain[depth - 1]  # the entry that predicts the token at `depth`
            self.labels[entry] = ids[depth]
            self.scored.append((row, depth + column_of_depth, entry))
        self.row_tokens.append(tokens)
        self.chains.append(chain)

    def build(self, device: torch.device) -> Pack:
        t = len(self.tokens)
        ancestors = torch.zeros(t, t, dtype=torch.bool)
        for chain in self.chains:
            if chain:
                c = torch.tensor(chain)
                ancestors[c[:, None], c[None, :]] |= torch.ones(len(c), len(c), dtype=torch.bool).tril()
        scored = torch.tensor(self.scored, dtype=torch.long).reshape(-1, 3)
        rows, columns, entries = scored.unbind(1)
        return Pack(
            input_ids=torch.tensor([self.tokens], device=device),
            position_ids=torch.tensor([self.depths], device=device),
            labels=torch.tensor([self.labels], device=device),
            ancestors=ancestors.to(device),
            rows=rows.to(device),
            columns=columns.to(device),
            entries=entries.to(device),
        )


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, max_tokens: int
) -> list[Pack] | None:
    """Fold a padded batch (left-padded prompts + right-padded completions, as TRL builds it) into packs of at most
    `max_tokens` entries each (a row longer than that gets a pack of its own). Rows are taken in order and join the
    current pack while it has room, so rows that share (a group's, kept together) land in the same pack.

    Returns None when the batch cannot be read as one token sequence per row (a row's mask with holes), or when a
    scored token has no real token before it (an empty prompt)."""
    spans = real_spans(attention_mask)
    if spans is None:
        return None
    width = input_ids.shape[1]
    first_scored_column = width - logits_to_keep
    ids = input_ids.detach().cpu()
    packs: list[_PackBuilder] = [_PackBuilder()]
    for row, (start, end) in enumerate(spans):
        if start >= first_scored_column:
            return None
        tokens = ids[row, start:end]
        current = packs[-1]
        plan = current.plan(tokens)  # the longest shared prefix: searched once per row
        if current.row_tokens and len(current.tokens) + current.new_entries(tokens, plan) > max_tokens:
            current = _PackBuilder()
            packs.append(current)
            plan = (-1, 0)
        # Output column of depth d: start + d − (width − logits_to_keep).
        current.add(tokens, row, first_scored_column - start, start - first_scored_column, plan)
    return [p.build(input_ids.device) for p in packs]


def attention_mask_for(ancestors: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The (1, 1, T, T) mask the model receives: boolean for sdpa, additive (0 / dtype min) for eager."""
    mask = ancestors[None, None]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def unsupported_reason(model_config: Any, max_depth: int | None = None) -> str | None:
    """Why the packed forward would not reproduce the per-row one for this model (None: it would)."""
    implementation = getattr(model_config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        return f"attn_implementation={implementation!r} takes no custom attention mask here (sdpa or eager do)"
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if text is not model_config:
        return "a multimodal model (its inputs are not one token sequence per row)"
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or []
    sliding = any("sliding" in str(t) for t in layer_types) or (
        window is not None and getattr(text, "use_sliding_window", not layer_types)
    )
    if sliding and window is not None and (max_depth is None or max_depth > window):
        return f"sliding-window attention (window {window}) over rows longer than the window"
    if getattr(text, "position_embedding_type", "rope") not in (None, "rope", "rotary") or (
        getattr(text, "rope_theta", None) is None
        and getattr(text, "rope_parameters", None) is None
        and getattr(text, "rotary_dim", None) is None
    ):
        return "no rotary position embeddings (positions from 0 would change what the padded forward computes)"
    return None


def shared_prefix_logps(
    model: Any,
    packs: list[Pack],
    batch_size: int,
    logits_to_keep: int,
    compute_entropy: bool,
    attn_implementation: str,
    dtype: torch.dtype,
    autocast: Any,
    extra_forwards: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities (and entropies) of every row, (B, logits_to_keep), from one forward per pack
    through the model's fused LM head (TRL's `add_fused_lm_head`: temperature, soft-capping and logit scale as in
    the per-row forward). Unscored positions are 0, as TRL's fused head leaves them.

    `extra_forwards`: one-token forwards added (their output times zero) so that every process makes as many
    forwards, and so as many parameter gathers, as the process with the most packs (ZeRO-3)."""
    device = packs[0].input_ids.device
    logps = torch.zeros(batch_size, logits_to_keep, device=device)
    entropies = torch.zeros(batch_size, logits_to_keep, device=device) if compute_entropy else None
    anchor = None
    for pack in packs:
        with autocast():
            out = model(
                input_ids=pack.input_ids,
                position_ids=pack.position_ids,
                attention_mask=attention_mask_for(pack.ancestors, attn_implementation, dtype),
                shift_labels=pack.labels,
                fused_lm_head=True,
            )
        index = (pack.rows, pack.columns)
        logps = logps.index_put(index, out.log_probs[0, pack.entries].float())
        if compute_entropy:
            entropies = entropies.index_put(index, out.entropy[0, pack.entries].float())
    for _ in range(extra_forwards):
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        with autocast():
            out = model(input_ids=one, position_ids=one, shift_labels=one, fused_lm_head=True)
        zero = out.log_probs.sum() * 0.0
        anchor = zero if anchor is None else anchor + zero
    if anchor is not None:  # keeps the extra forwards in the graph, so backward gathers as often on every process
        logps = logps + anchor
    return logps, entropies


def padded_tokens(input_ids: torch.Tensor) -> int:
    """Tokens TRL's per-row forward computes for this batch (every row padded to the batch's width)."""
    return input_ids.shape[0] * input_ids.shape[1]


def shuffle_groups(seq_dict: dict[str, Any], group_size: int) -> dict[str, Any]:
    """TRL's `shuffle_sequence_dict` by whole groups: the blocks of `group_size` consecutive rows (a prompt's
    completions, as TRL's sampler lays them out) are permuted, each block's rows kept together and in order, so
    TRL's split into micro-batches keeps a group's shared prefixes in one forward.

    TRL's own draw (`torch.randperm` over the rows) decides the order: groups come in the order their first row
    appears in it. The RNG stream is therefore TRL's, and whatever is sampled after the shuffle is what
    `GRPOTrainer` would sample."""
    batch_size = len(next(v for v in seq_dict.values() if v is not None))
    rows = torch.randperm(batch_size)
    if batch_size % group_size:
        group_size = 1  # not whole groups (ARPO's config checks rule it out): TRL's row shuffle
    order: dict[int, None] = {}
    for row in rows.tolist():
        order.setdefault(row // group_size, None)
    groups = torch.tensor(list(order))
    permutation = (groups[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)

    def permute(v: Any) -> Any:
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[permutation.to(v.device)]
        return [v[i] for i in permutation.tolist()]

    return {key: permute(value) for key, value in seq_dict.items()}


@contextlib.contextmanager
def groups_kept_whole(group_size: int) -> Iterator[None]:
    """While TRL's `_prepare_inputs` runs: its generation-batch shuffle permutes whole groups (`shuffle_groups`)."""
    import trl.trainer.grpo_trainer as grpo_module

    original = grpo_module.shuffle_sequence_dict
    grpo_module.shuffle_sequence_dict = functools.partial(shuffle_groups, group_size=group_size)
    try:
        yield
    finally:
        grpo_module.shuffle_sequence_dict = original


@dataclass
class ForwardFigures:
    """What one shared-prefix forward computed: entries packed, against the tokens of TRL's padded rows."""

    packed_tokens: int
    padded_tokens: int
    packs: int


class SharedPrefixForward:
    """Decides, per call, between the packed forward and TRL's per-row one, identically on every process.

    The first packed call for a model is checked against the per-row forward (no gradient, once); a model whose
    numbers differ beyond `tolerance` keeps the per-row forward for the rest of the run, with one warning.

    Args:
        max_tokens: most entries per packed forward (`ARPOConfig.shared_prefix_max_tokens`).
        accelerator: the trainer's; its `gather` makes every decision collective (one small gather per call).
    """

    def __init__(self, max_tokens: int, accelerator: Any) -> None:
        self.max_tokens = max_tokens
        self.accelerator = accelerator
        self.checked: dict[int, float] = {}  # id(model) -> max |difference| found by the first call's check
        self.refused: dict[int, str] = {}  # id(model) -> why it keeps the per-row forward
        self._logged: set[str] = set()

    def _say_once(self, message: str, level: int = logging.INFO) -> None:
        if message not in self._logged and self.accelerator.is_main_process:
            self._logged.add(message)
            logger.log(level, message)

    def _all(self, flag: bool, count: int) -> tuple[bool, int]:
        """(flag on every process, the largest count) — collective when there are several processes."""
        if self.accelerator.num_processes == 1:
            return flag, count
        t = torch.tensor([[0 if flag else 1, count]], device=self.accelerator.device)
        gathered = self.accelerator.gather(t)
        return bool(gathered[:, 0].sum() == 0), int(gathered[:, 1].max())

    def __call__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        compute_entropy: bool,
        per_row: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, ForwardFigures] | None:
        """The packed forward's (logps, entropies, figures), or None: use `per_row()` (every process agrees)."""
        base = self.accelerator.unwrap_model(model)
        key = id(base)
        reason = self.refused.get(key)
        packs = None
        if reason is None:
            packs = pack_rows(input_ids, attention_mask, logits_to_keep, self.max_tokens)
            if packs is None:
                reason = "a row whose attention mask is not one run of real tokens"
            else:
                max_depth = int(attention_mask.sum(1).max())
                reason = unsupported_reason(base.config, max_depth)
        usable, most_packs = self._all(reason is None, len(packs) if packs else 0)
        if not usable:
            self._say_once(
                "shared_prefix_forward: the per-row forward is used "
                + (f"({reason})" if reason else "(another process cannot pack its batch)")
            )
            return None
        implementation = base.config._attn_implementation
        dtype = next(base.parameters()).dtype

        def packed() -> tuple[torch.Tensor, torch.Tensor | None]:
            return shared_prefix_logps(
                model,
                packs,
                input_ids.shape[0],
                logits_to_keep,
                compute_entropy,
                implementation,
                dtype,
                self.accelerator.autocast,
                extra_forwards=most_packs - len(packs),
            )

        if key not in self.checked:
            with torch.no_grad():
                reference, _, _ = per_row()
                mine, _ = packed()
            scored = attention_mask[:, -logits_to_keep:].bool()
            diff = float((reference.float() - mine.float()).abs()[scored].max()) if scored.any() else 0.0
            tolerance = 1e-3 if dtype == torch.float32 and self.accelerator.mixed_precision == "no" else 0.25
            ok, _ = self._all(diff <= tolerance, 0)
            self.checked[key] = diff
            if not ok:
                self.refused[key] = f"it differs from the per-row forward by {diff:.2e} > {tolerance:g}"
                self._say_once(f"shared_prefix_forward: the per-row forward is used ({self.refused[key]})", 30)
                return None
            self._say_once(
                f"shared_prefix_forward: checked against the per-row forward on the first batch "
                f"(max |log-probability difference| {diff:.1e})"
            )
        logps, entropies = packed()
        figures = ForwardFigures(sum(p.num_tokens for p in packs), padded_tokens(input_ids), len(packs))
        return logps, entropies, figures
