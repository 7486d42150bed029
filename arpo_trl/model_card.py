"""The ARPO settings a model was trained with, as the table `ARPOTrainer.create_model_card` appends to TRL's card."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .tools import tools_by_name


def settings_rows(args: Any, initial_rollouts: int, tools: Sequence[Any]) -> list[tuple[str, Any]]:
    """(setting, value) rows: the paper's symbols first, then the knobs a reader needs to reproduce the run; AEPO's
    when any of its parts is on."""
    a = args
    rows = [
        ("M (`num_generations`)", a.num_generations),
        ("N (`initial_rollouts`)", initial_rollouts),
        ("Z (`branch_factor`)", a.branch_factor),
        ("k (`entropy_window`)", a.entropy_window),
        ("α (`branch_base_probability`)", a.branch_base_probability),
        ("β (`branch_entropy_weight`)", a.branch_entropy_weight),
        ("`branch_rule`", a.branch_rule + (f" (τ = {a.branch_threshold})" if a.branch_rule == "threshold" else "")),
        ("`entropy_timing`", a.entropy_timing),
        ("`entropy_normalization`", a.entropy_normalization),
        ("`advantage_attribution`", a.advantage_attribution),
        ("`rollout_fill`", a.rollout_fill),
        ("`speculative_forks`", a.speculative_forks),
        ("`tool_format`", a.tool_format),
        ("tools", ", ".join(f"`{name}`" for name in tools_by_name(list(tools))) or "none"),
        ("`max_tool_calling_iterations`", a.max_tool_calling_iterations),
        ("`max_completion_length`", a.max_completion_length),
        ("`learning_rate`", a.learning_rate),
        ("KL `beta`", a.beta),
        ("`loss_type`", a.loss_type),
        ("`shared_prefix_forward`", a.shared_prefix_forward),
    ]
    aepo = [
        ("AEPO budget split (`dynamic_rollouts`)", a.dynamic_rollouts),
        ("AEPO λ (`branch_penalty_rate`)", a.branch_penalty_rate),
        ("AEPO clipping (`entropy_balanced_clipping`)", a.entropy_balanced_clipping),
        ("AEPO a (`entropy_advantage_coef`)", a.entropy_advantage_coef),
    ]
    if any(value for _, value in aepo) or a.branch_rule == "aepo_official":
        rows += [("`algorithm_preset`", a.algorithm_preset), *aepo]
    return rows


def settings_table(args: Any, initial_rollouts: int, tools: Sequence[Any]) -> str:
    """The rows as a Markdown section."""
    table = "\n".join(f"| {name} | {value} |" for name, value in settings_rows(args, initial_rollouts, tools))
    return f"\n## ARPO settings\n\n| Setting | Value |\n|---|---|\n{table}\n"
