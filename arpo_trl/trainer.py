"""`ARPOTrainer`: TRL's `GRPOTrainer` with ARPO's entropy-branched tool rollout and advantage attribution."""

from __future__ import annotations

import copy
import logging
import os
import re
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational

from .advantages import hard_attribution
from .config import ARPOConfig
from .rollout.branching import BranchPolicy
from .rollout.engine import RolloutSettings, RolloutStats, TreeRollout
from .rollout.entropy import EntropyRecorder, output_logit_transform
from .rollout.generation import TransformersGenerator
from .rollout.protocols import ChatTemplateProtocol, TagProtocol
from .rollout.tree import Trajectory
from .tools import ToolExecutor, as_function, tools_by_name

logger = logging.getLogger(__name__)

_TAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass
class RolloutRecord:
    """The last batch's rollout, kept for advantage attribution and for inspection (tests, visualisation)."""

    mode: str
    prompt_ids: list[list[int]]
    trajectories: list[Trajectory]
    stats: RolloutStats


class ARPOTrainer(GRPOTrainer):
    """Agentic Reinforced Policy Optimization (Dong et al., arXiv 2507.19849) on top of TRL's `GRPOTrainer`.

    Takes exactly the arguments of `GRPOTrainer`; `args` may be an [`ARPOConfig`] or a plain `GRPOConfig` (upgraded
    with ARPO's defaults). What differs from `GRPOTrainer`:

    - `_generate` runs ARPO's tree rollout (`arpo_trl.rollout.engine.TreeRollout`) instead of TRL's single-turn
      generation plus tool loop: N roots per prompt, branches forked after tool results when the entropy of the
      tokens that follow rises, unused budget filled, exactly M = `num_generations` completions per prompt, the
      tool-result tokens masked out of the loss. Evaluation samples plain trajectories with the same tools.
    - `_generate_and_score_completions` calls TRL's, then (for `advantage_attribution="hard"`) replaces the (B,)
      advantages with per-token ones averaged over the rows that share each token's prefix.
    - Tools: with `tool_format="tags"` they are kept away from TRL's chat-template tool setup (the model calls them
      inline with `<name>…</name>`); with `"chat_template"` TRL sets them up exactly as for `GRPOTrainer`.

    Rewards, group advantages, loss, logging, checkpointing, PEFT and distributed wrapping are TRL's.
    """

    _tag_names = ["trl", "arpo", "grpo"]
    _name = "ARPO"
    _paper = {
        "title": "Agentic Reinforced Policy Optimization",
        "id": "2507.19849",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{dong2026arpo,
                title        = {{Agentic Reinforced Policy Optimization}},
                author       = {Guanting Dong and others},
                booktitle    = {International Conference on Learning Representations},
                year         = 2026,
                eprint       = {arXiv:2507.19849},
            }"""),
    }

    def __init__(
        self,
        model: str | Any,
        reward_funcs: Any = None,
        args: ARPOConfig | GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: Any = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable] | None = None,
        rollout_func: Callable | None = None,
        environment_factory: Any = None,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ARPOConfig(f"{name.split('/')[-1]}-ARPO")
        elif not isinstance(args, ARPOConfig):
            if not isinstance(args, GRPOConfig):
                raise TypeError(f"args must be an ARPOConfig or a GRPOConfig, got {type(args).__name__}")
            args = ARPOConfig.from_grpo_config(args)
        if rollout_func is not None:
            raise ValueError("ARPOTrainer owns the rollout (its tree search); rollout_func cannot replace it")
        if environment_factory is not None:
            raise ValueError(
                "environment_factory is not supported: a branch copies a trajectory mid-episode, and a stateful "
                "environment cannot be forked with it. Pass stateless callables as `tools`."
            )
        tools = list(tools or [])
        index = tools_by_name(tools)  # validates: callables, named, unique
        if args.tool_format == "tags":
            bad = [name for name in index if not _TAG_NAME.match(name)]
            if bad:
                raise ValueError(f"tool names {bad} cannot be used as tags (<name>…</name>) in tool_format='tags'")
        if not tools:
            warnings.warn(
                "ARPOTrainer got no tools: ARPO branches only after tool results, so this run is GRPO with N "
                "initial rollouts and M − N fresh ones.",
                stacklevel=2,
            )

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            # Tag-format tools are called inline, not through the chat template: TRL must not set them up.
            # In chat mode TRL renders their JSON schemas, which transformers builds from plain functions only.
            tools=[as_function(t) for t in tools] if args.tool_format == "chat_template" else None,
        )
        self.arpo_tools = tools
        self.tool_executor = ToolExecutor(
            tools,
            timeout=args.tool_timeout,
            max_workers=args.tool_max_workers,
            max_response_chars=args.max_tool_response_chars,
        )
        scale, softcap = output_logit_transform(self.model.config.get_text_config())
        self.entropy_recorder = EntropyRecorder(
            self.temperature, max_steps=args.entropy_window, logit_scale=scale, softcap=softcap
        )
        lm_head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        lm_head.register_forward_hook(self.entropy_recorder)
        if args.tool_format == "tags":
            self.tool_protocol: TagProtocol | ChatTemplateProtocol = TagProtocol(self._tokenizer, list(index))
        else:
            self.tool_protocol = ChatTemplateProtocol(self)
        self.generator = TransformersGenerator(self, self.tool_protocol.stop_strings, self.entropy_recorder)
        self.branch_policy = BranchPolicy(
            args.branch_base_probability, args.branch_entropy_weight, args.branch_rule, args.branch_threshold
        )
        self.last_rollout: RolloutRecord | None = None
        self._rollouts_this_step = (-1, 0)  # (global_step, calls): seeds the branching RNG reproducibly

    # ------------------------------------------------------------------ rollout
    def _rollout_settings(self, mode: str) -> RolloutSettings:
        a = self.args
        train = mode == "train"
        return RolloutSettings(
            group_size=self.num_generations if train else 1,
            initial_rollouts=a.initial_rollouts if train else 1,
            branch_factor=a.branch_factor,
            entropy_window=a.entropy_window,
            entropy_timing=a.entropy_timing,
            entropy_normalization=a.entropy_normalization,
            rollout_fill=a.rollout_fill,
            speculative_forks=a.speculative_forks,
            branching=train,  # evaluation keeps plain trajectory sampling
            max_completion_length=self.max_completion_length,
            max_model_len=getattr(self.model.config.get_text_config(), "max_position_embeddings", None),
            max_tool_rounds=a.max_tool_calling_iterations,
            call_limit_action=a.call_limit_action,
        )

    def _any_process_active(self, local_active: bool) -> bool:
        """Collective: True while any process still has a live trajectory (so all make the same generate calls)."""
        if self.accelerator.num_processes == 1:
            return local_active
        flag = torch.tensor([int(local_active)], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).sum().item())

    def _seed_branching(self) -> None:
        step, calls = self._rollouts_this_step
        calls = calls + 1 if step == self.state.global_step else 0
        self._rollouts_this_step = (self.state.global_step, calls)
        seed = hash((self.args.seed, self.accelerator.process_index, self.state.global_step, calls))
        self.branch_policy.reseed(seed)

    def _generate(self, prompts: list):
        """ARPO's tree rollout (training) or plain tool-using sampling (evaluation); returns what TRL's does."""
        mode = "train" if self.model.training else "eval"
        prompts = copy.deepcopy(prompts)
        prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)
        if images is not None or multimodal_fields:
            raise NotImplementedError("ARPOTrainer does not support image inputs yet")
        if isinstance(self.tool_protocol, ChatTemplateProtocol):
            self.tool_protocol.prompt_ids = prompt_ids
        self._seed_branching()
        rollout = TreeRollout(
            self._rollout_settings(mode),
            self.generator,
            self.tool_protocol,
            self.tool_executor,
            self.branch_policy,
            # From the config: under ZeRO-3 the LM head's weight is partitioned and its local shape is empty.
            vocab_size=self.model.config.get_text_config().vocab_size,
            eos_token_id=self._tokenizer.eos_token_id,
            any_active=self._any_process_active,
        )
        trajectories, stats = rollout.run(prompt_ids)
        self.last_rollout = RolloutRecord(mode, prompt_ids, trajectories, stats)

        conversational = is_conversational({"prompt": prompts[0]})
        completion_ids = [t.completion_ids for t in trajectories]
        tool_mask = [t.tool_mask for t in trajectories]
        completions = [self.tool_protocol.completion(t, conversational) for t in trajectories]
        self._log_rollout_metrics(mode, prompt_ids, trajectories, stats)
        return prompt_ids, completion_ids, tool_mask, completions, None, {}, None, []

    def _log_rollout_metrics(
        self, mode: str, prompt_ids: list[list[int]], trajectories: list[Trajectory], stats: RolloutStats
    ) -> None:
        """TRL's completion metrics (its `_generate` logs them; we replaced it) plus ARPO's tree and tool metrics.

        Every process makes the same gathers, whatever its trees looked like.
        """
        device = self.accelerator.device
        metrics = self._metrics[mode]
        # --- as trl/trainer/grpo_trainer.py:2277-2310: lengths count model tokens only (tool_mask == 1)
        prompt_lengths = self.accelerator.gather(torch.tensor([len(p) for p in prompt_ids], device=device))
        lengths = self.accelerator.gather(torch.tensor([sum(t.tool_mask) for t in trajectories], device=device))
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        truncated = self.accelerator.gather(
            torch.tensor([t.completion_ids[-1] not in eos_and_pad for t in trajectories], device=device)
        )
        if mode == "train":
            self.state.num_input_tokens_seen += (prompt_lengths.sum() + lengths.sum()).item()
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["completions/mean_length"].append(lengths.float().mean().item())
        metrics["completions/min_length"].append(lengths.float().min().item())
        metrics["completions/max_length"].append(lengths.float().max().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
        terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1, device=device)
        metrics["completions/mean_terminated_length"].append(terminated.float().mean().item())
        metrics["completions/min_terminated_length"].append(terminated.float().min().item())
        metrics["completions/max_terminated_length"].append(terminated.float().max().item())

        # --- ARPO: sums over all processes, then ratios
        local = [
            stats.groups,
            stats.completions,
            stats.branches,
            stats.fresh,
            stats.discarded,
            stats.discarded_forks,
            stats.duplicates,
            stats.tool_executions,
            sum(len(t.tool_events) for t in trajectories),  # calls seen by each completion, shared ones included
            stats.tool_errors,
            stats.tool_timeouts,
            stats.call_limit_hits,
            sum(stats.entropy_deltas),
            len(stats.entropy_deltas),
            sum(stats.entropy_after_tool),
            sum(stats.branch_probabilities),
            stats.rounds,
        ]
        total = self.accelerator.gather(torch.tensor([local], dtype=torch.float64, device=device)).sum(0).tolist()
        (groups, completions, branches, fresh, discarded, discarded_forks, dups, execs, calls, errors, timeouts,
         limit_hits, sum_dh, n_dh, sum_h_t, sum_p, rounds) = total  # fmt: skip
        groups, completions = max(groups, 1.0), max(completions, 1.0)
        metrics["arpo/branches_per_group"].append(branches / groups)
        metrics["arpo/fresh_rollouts_per_group"].append(fresh / groups)
        metrics["arpo/duplicate_rollouts_per_group"].append(dups / groups)
        if self.args.rollout_fill == "speculative":
            metrics["arpo/discarded_fresh_per_group"].append(discarded / groups)
        if self.args.speculative_forks:
            metrics["arpo/discarded_forks_per_group"].append(discarded_forks / groups)
        metrics["arpo/branch_decisions_per_group"].append(n_dh / groups)
        if n_dh:
            metrics["arpo/entropy_delta_mean"].append(sum_dh / n_dh)
            # The per-tool-step entropies the paper plots, in `entropy_normalization` units: H_t after the tool
            # result and H_initial of the same trajectories (ΔH = H_t − H_initial).
            metrics["arpo/entropy_after_tool_mean"].append(sum_h_t / n_dh)
            metrics["arpo/entropy_initial_mean"].append((sum_h_t - sum_dh) / n_dh)
            metrics["arpo/branch_probability_mean"].append(sum_p / n_dh)
        metrics["arpo/generation_rounds"].append(rounds / self.accelerator.num_processes)
        metrics["tools/calls_per_completion"].append(calls / completions)
        metrics["tools/executions_per_completion"].append(execs / completions)
        metrics["tools/errors"].append(errors)
        metrics["tools/timeouts"].append(timeouts)
        metrics["tools/call_limit_hits"].append(limit_hits)

    # ------------------------------------------------------------------ model card
    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """TRL's card (ARPO in its tags, ARPO's citation), plus the ARPO settings this model was trained with."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        a = self.args
        rows = [
            ("M (`num_generations`)", a.num_generations),
            ("N (`initial_rollouts`)", a.initial_rollouts),
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
            ("tools", ", ".join(f"`{name}`" for name in tools_by_name(self.arpo_tools)) or "none"),
            ("`max_tool_calling_iterations`", a.max_tool_calling_iterations),
            ("`max_completion_length`", a.max_completion_length),
            ("`learning_rate`", a.learning_rate),
            ("KL `beta`", a.beta),
            ("`loss_type`", a.loss_type),
        ]
        table = "\n".join(f"| {name} | {value} |" for name, value in rows)
        with open(os.path.join(a.output_dir, "README.md"), "a") as f:
            f.write(f"\n## ARPO settings\n\n| Setting | Value |\n|---|---|\n{table}\n")

    # ------------------------------------------------------------------ advantages
    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._last_rewards_per_func = rewards_per_func  # gathered over processes: kept for the rollout-tree pages
        return rewards_per_func

    def _maybe_log_rollout_trees(self, advantages: torch.Tensor) -> None:
        """Every `log_rollout_trees` logging steps, render this batch's trees (`arpo_trl.viz`), main process only."""
        every = self.args.log_rollout_trees
        if not every or not self.model.training or self.last_rollout is None:
            return
        step = self.state.global_step
        if step % (every * max(1, self.args.logging_steps)) or getattr(self, "_trees_logged_at", None) == step:
            return
        self._trees_logged_at = step
        per_func = self._last_rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        if self.accelerator.is_main_process:
            from .viz import log_rollout_trees

            log_rollout_trees(
                self, self.last_rollout, rewards, advantages, step, max_prompts=self.args.log_rollout_trees_prompts
            )

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        self._maybe_log_rollout_trees(output["advantages"])  # (B,) sequence advantages, before hard attribution
        if self.model.training and self.args.advantage_attribution == "hard":
            record = self.last_rollout
            lengths = torch.tensor([len(t.completion_ids) for t in record.trajectories], device=self.accelerator.device)
            ids = output["completion_ids"]
            valid = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
            output["advantages"] = hard_attribution(ids, valid, output["advantages"], self.num_generations)
        return output
