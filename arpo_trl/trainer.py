"""`ARPOTrainer`: TRL's `GRPOTrainer` with ARPO's entropy-branched tool rollout and advantage attribution."""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import re
import textwrap
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.extras.profiling import profiling_context

from .advantages import hard_attribution
from .aepo import balance_loss_inputs
from .config import AEPOConfig, ARPOConfig
from .model_card import settings_table
from .rollout.backends import RolloutParts, RolloutResult, build_backend
from .rollout.branching import BranchPolicy, rollout_seed
from .rollout.dynamic_budget import dynamic_initial_rollouts
from .rollout.entropy import EntropyRecorder, output_logit_transform
from .rollout.environments import NOT_TOOLS, check_forkable, environment_tools
from .rollout.metrics import log_rollout_metrics
from .rollout.plain_text import ChatContext
from .rollout.protocols import ChatTemplateProtocol, TagProtocol
from .rollout.trajectory import Trajectory
from .rollout.tree import RolloutSettings, prompt_keys
from .shared_prefix import SharedPrefixForward, groups_kept_whole
from .tools import ToolExecutor, as_function, tools_by_name

_TAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _has_images(dataset: Any) -> bool:
    """Does `dataset` (a Dataset, IterableDataset, dict of them, or None) carry images, as TRL would read them?"""
    if dataset is None:
        return False
    for part in dataset.values() if isinstance(dataset, dict) else [dataset]:
        columns = getattr(part, "column_names", None) or []
        if "image" in columns or "images" in columns:
            return True
        try:
            first = next(iter(part))
        except (StopIteration, TypeError):
            continue
        prompt = first.get("prompt") if isinstance(first, dict) else None
        if isinstance(prompt, list):
            for message in prompt:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list) and any(isinstance(c, dict) and c.get("type") == "image" for c in content):
                    return True
    return False


def _destroy_process_group_at_exit() -> None:
    """Register (once per process) an exit hook that destroys the default process group if it is still alive."""
    global _EXIT_HOOK_REGISTERED
    if _EXIT_HOOK_REGISTERED or not torch.distributed.is_available():
        return
    _EXIT_HOOK_REGISTERED = True

    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


_EXIT_HOOK_REGISTERED = False


class ARPOTrainer(GRPOTrainer):
    """Agentic Reinforced Policy Optimization (Dong et al., arXiv 2507.19849) on top of TRL's `GRPOTrainer`.

    Takes exactly the arguments of `GRPOTrainer`; `args` may be an [`ARPOConfig`] or a plain `GRPOConfig` (upgraded
    with ARPO's defaults). What differs from `GRPOTrainer`:

    - `_generate` runs ARPO's tree rollout instead of TRL's single-turn generation plus tool loop: N roots per
      prompt, branches forked after tool results when the entropy of the tokens that follow rises, unused budget
      filled, exactly M = `num_generations` completions per prompt, the tool-result tokens masked out of the loss.
      Evaluation samples plain trajectories with the same tools. One tree logic (`rollout.tree`), two
      drivers: synchronous rounds over transformers `generate` (`rollout.round_driver.RoundDriver`), or with
      `use_vllm=True` an asynchronous rollout over a colocated vLLM engine (`rollout.stream_driver`), whose
      sampling logprobs feed TRL's importance-sampling correction; TRL's own vLLM engine is not started, and the
      weights are pushed to ARPO's before each rollout that follows an optimizer step.
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
        if environment_factory is not None and args.tool_format != "chat_template":
            raise ValueError(
                "environment_factory needs tool_format='chat_template': environments expose their methods as "
                f"TRL-native tool calls, which tool_format={args.tool_format!r} does not parse"
            )
        if environment_factory is not None and args.dynamic_rollouts:
            raise ValueError(
                "dynamic_rollouts (AEPO's budget split) does not support environment_factory: its probe rollout "
                "would act on the environments the real rollout starts from"
            )
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if _has_images(dataset):
                raise ValueError(
                    f"{name} holds images: ARPOTrainer's tree rollout is text-only (a branch copies token states, "
                    "and image inputs are not carried through it yet). Use GRPOTrainer for vision-language training."
                )
        tools = list(tools or [])
        index = tools_by_name(tools)  # validates: callables, named, unique
        if args.tool_format == "tags":
            bad = [name for name in index if not _TAG_NAME.match(name)]
            if bad:
                raise ValueError(f"tool names {bad} cannot be used as tags (<name>…</name>) in tool_format='tags'")
        has_tools = bool(tools) or environment_factory is not None
        # N: `initial_rollouts`, else M // 2 with tools and M without (nothing to branch on).
        self.initial_rollouts = args.resolve_initial_rollouts(has_tools)
        if not has_tools:
            warnings.warn(
                "ARPOTrainer got no tools: ARPO branches only after tool results, so this run samples like GRPO "
                f"(N = {self.initial_rollouts} rollouts per prompt started at once"
                + (
                    f", then {args.num_generations - self.initial_rollouts} fresh ones)."
                    if self.initial_rollouts < args.num_generations
                    else ")."
                ),
                stacklevel=2,
            )

        # TRL would start its own vLLM engine for `use_vllm`; ARPO streams every trajectory from one it starts
        # below (`_start_vllm_engine`), so TRL is built without and told afterwards (its importance-sampling
        # correction reads `self.use_vllm`).
        use_vllm, args.use_vllm = args.use_vllm, False
        try:
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
                environment_factory=environment_factory,
            )
        finally:
            args.use_vllm = use_vllm
        self.use_vllm = use_vllm
        self.arpo_tools = tools
        if self.environment_factories is not None:
            self._prepare_environments()
        # User tools run inline on the main thread, as GRPOTrainer runs them; async ones on TRL's event loop.
        self.tool_executor = ToolExecutor.from_config(tools, args, async_loop=getattr(self, "async_loop", None))
        scale, softcap = output_logit_transform(self.model.config.get_text_config())
        self.entropy_recorder = EntropyRecorder(
            self.temperature,
            max_steps=args.entropy_window,
            logit_scale=scale,
            softcap=softcap,
            estimator=args.entropy_estimator,
        )
        self.entropy_recorder.attach(self.accelerator.unwrap_model(self.model))
        if args.tool_format == "tags":
            self.tool_protocol: TagProtocol | ChatTemplateProtocol = TagProtocol(
                self._tokenizer, list(index), result_style=args.result_format
            )
        else:
            self.tool_protocol = ChatTemplateProtocol(ChatContext.of(self))
        self.branch_policy = BranchPolicy(
            args.branch_base_probability,
            args.branch_entropy_weight,
            args.branch_rule,
            args.branch_threshold,
            penalty_rate=args.branch_penalty_rate,
            rounds=not use_vllm,  # AEPO's penalty counts rounds; the asynchronous driver has none
        )
        # The rollout's backend, built once: transformers `generate`, or ARPO's vLLM engine (colocated or server).
        self.rollout_backend = build_backend(self, use_vllm, self.tool_protocol.stop_strings, self.entropy_recorder)
        self._frozen_initial: dict[int, float] = {}  # initial_entropy="frozen_per_slot": the official per-slot H
        # mode -> (global_step, rollouts at that step): seeds the branching RNG reproducibly, with evaluation
        # counted apart from training, so a run resumed at a step where evaluation ran branches as the original.
        self._rollouts_this_step: dict[str, tuple[int, int]] = {}
        self.shared_prefix = SharedPrefixForward(args.shared_prefix_max_tokens, self.accelerator)

    def on_rollout(self, mode: str, result: RolloutResult) -> None:
        """Called with each finished rollout (`mode` "train" or "eval"), before TRL scores it: a seam for
        observers (tests, benchmarks, a subclass that logs trees elsewhere). The trainer keeps nothing of it."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's `train`; once it has returned, the process group is destroyed at interpreter exit if the script has
        not done so itself (`end`). A process that exits with the group alive can abort while tearing down gloo's
        worker threads (SIGABRT, "terminate called without an active exception") after a finished run: PyTorch
        #179291. Not after a failed `train`, where another rank may still be inside a collective."""
        output = super().train(*args, **kwargs)
        _destroy_process_group_at_exit()
        return output

    def end(self) -> None:
        """TRL's end of a run, and the rollout's backend closed (ARPO's vLLM engine shut down with its processes)."""
        if getattr(self, "rollout_backend", None) is not None:
            self.rollout_backend.close()
        super().end()

    def _prepare_environments(self) -> None:
        """Environments fork with their trajectories: refuse one that cannot be copied, and keep ARPO's copy hooks
        (`fork`, `clone`) out of the tools TRL renders for the model."""
        for pool in self._environment_pool.values():
            check_forkable(pool[0])  # TRL's probe instance
        self._env_tools = {
            name: [t for t in tools if getattr(t, "__name__", None) not in NOT_TOOLS]
            for name, tools in self._env_tools.items()
        }
        self.tools = [t for t in self.tools if getattr(t, "__name__", None) not in NOT_TOOLS]

    def _trajectory_tools(self, traj: Trajectory) -> dict[str, Any] | None:
        """The tools of `traj`'s own environment instance (None without environments: the executor's tools)."""
        return None if traj.env is None else environment_tools(traj.env, self.arpo_tools)

    # ------------------------------------------------------------------ rollout
    def _rollout_parts(self, mode: str) -> RolloutParts:
        a = self.args
        train = mode == "train"
        settings = RolloutSettings(
            group_size=self.num_generations if train else 1,
            initial_rollouts=self.initial_rollouts if train else 1,
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
            initial_entropy=a.initial_entropy if train else "per_root",
            call_limit_eos_trained=a.call_limit_eos_trained,
            empty_tool_call=a.empty_tool_call,
        )
        return RolloutParts(
            settings,
            self.tool_protocol,
            self.tool_executor,
            self.branch_policy,
            self._tokenizer.eos_token_id,
            toolset=self._trajectory_tools if self.environments else None,
            frozen_initial=self._frozen_initial if train else None,
        )

    def _seed_branching(self, mode: str) -> int:
        step, calls = self._rollouts_this_step.get(mode, (-1, 0))
        calls = calls + 1 if step == self.state.global_step else 0
        self._rollouts_this_step[mode] = (self.state.global_step, calls)
        seed = rollout_seed(self.args.seed, self.accelerator.process_index, mode, self.state.global_step, calls)
        self.branch_policy.reseed(seed)
        return seed

    def _rollout(self, prompts: list) -> tuple[RolloutResult, tuple]:
        """ARPO's tree rollout (training) or plain tool-using sampling (evaluation) of TRL's `prompts`: the result,
        and what TRL's `_generate` returns.

        The rows of a group may start from different prompts (an environment's `reset` appends its own observation to
        each). A branch continues its parent's prompt, not its row's: row i's prompt ids, its entry of `prompts` (the
        list TRL passed in, which TRL's reward functions and logs read afterwards, updated in place) and
        `self.environments[i]` are those its completion was generated from."""
        mode = "train" if self.model.training else "eval"
        trl_prompts, prompts = prompts, copy.deepcopy(prompts)
        prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)
        if images is not None or multimodal_fields:
            raise NotImplementedError("ARPOTrainer does not support image inputs yet")
        metrics = self._metrics[mode]
        seed = self._seed_branching(mode)
        parts = self._rollout_parts(mode)
        with profiling_context(self, "vllm_weight_sync") if self.use_vllm else contextlib.nullcontext():
            seconds = self.rollout_backend.sync_weights(self.model, self.state.global_step, self.accelerator)
        if seconds is not None:
            metrics["vllm/weight_sync_s"].append(seconds)
        if mode == "train" and self.args.dynamic_rollouts:  # AEPO: m roots per prompt, from an entropy probe
            probe_seed = rollout_seed(
                self.args.seed, self.accelerator.process_index, "probe", self.state.global_step, 0
            )
            started = time.perf_counter()
            with profiling_context(self, "aepo_budget_probe"):
                initial, figures = dynamic_initial_rollouts(
                    self.rollout_backend, parts, prompt_ids, self.num_generations, self.args, probe_seed
                )
            parts.settings.initial_rollouts = initial
            self._log_probe(metrics, figures, time.perf_counter() - started)
        result = self.rollout_backend.rollout(parts, prompt_ids, self.environments or None, seed)
        trajectories = result.trajectories
        if any(t.origin != t.slot for t in trajectories):
            trl_prompts[:] = [trl_prompts[t.origin] for t in trajectories]  # a new list is built before the slice
        if self.environments:
            # Each completion's own environment (a branch's is its copy): what TRL hands to rewards (`environments=`,
            # `get_reward`).
            self.environments = [t.env for t in trajectories]
        self.state.num_input_tokens_seen += log_rollout_metrics(
            metrics, self.accelerator, result, mode=mode, eos_and_pad={*self.eos_token_ids, self._tokenizer.pad_token_id},
            args=self.args, has_tools=bool(self.arpo_tools or self.environments),
            last_tool_error=self.tool_executor.last_error,
        )  # fmt: skip
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        self.on_rollout(mode, result)
        conversational = is_conversational({"prompt": prompts[0]})
        completions = [self.tool_protocol.completion(t, conversational) for t in trajectories]
        generated = (
            result.prompt_ids,
            [t.completion_ids for t in trajectories],
            [t.tool_mask for t in trajectories],
            completions,
            result.logprobs,  # TRL's importance-sampling correction reads them (vLLM)
            {},
            None,
            [],
        )
        return result, generated

    def _log_probe(self, metrics: dict[str, list[float]], figures: dict[str, float], seconds: float) -> None:
        """AEPO's budget probe, over every process: m per prompt, the probe's sampled tokens and tool calls."""
        device = self.accelerator.device
        local = torch.tensor([[figures[k] for k in ("samples", "prompts", "tokens", "calls")]], dtype=torch.float64,
                             device=device)  # fmt: skip
        samples, prompts, tokens, calls = self.accelerator.gather(local).sum(0).tolist()
        prompts = max(prompts, 1.0)
        metrics["aepo/global_samples_per_prompt"].append(samples / prompts)
        metrics["aepo/probe_sampled_tokens"].append(tokens / prompts)
        metrics["aepo/probe_tool_calls"].append(calls / prompts)
        metrics["aepo/probe_seconds"].append(seconds)

    def _generate(self, prompts: list):
        """The rollout (`_rollout`) in TRL's `_generate` shape. Inside `_generate_and_score_completions` the result
        also goes to that call's scoring record, which lives as long as the call."""
        result, generated = self._rollout(prompts)
        record = self.__dict__.get("_scoring")
        if record is not None:
            record["rollout"] = result
        return generated

    # ------------------------------------------------------------------ AEPO loss
    def _compute_loss(self, model, inputs):
        """TRL's loss, with AEPO's entropy-balanced clipping and entropy-aware advantage when they are on.

        Both need what TRL's `_compute_loss` computes in its own forward (the log-probs, and the entropies it always
        computes there), and act before its clipped objective. TRL offers no seam between the two other than the
        forward call itself, so for the duration of the call the forward is wrapped (`aepo.balance_loss_inputs`):
        it then replaces the advantages with Ã (B, T) and hands TRL an upper clip whose value is ε_h and whose
        gradient is AEPO's. Everything else (IS correction, masks, KL, aggregation per loss_type, metrics) stays
        TRL's.
        """
        a = self.args
        if not (a.entropy_balanced_clipping or a.entropy_advantage_coef):
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # the buffered batch is reused by later iterations: never modify it
        forward = self._get_per_token_logps_and_entropies  # whatever the class provides
        epsilon_low, epsilon_high = self.epsilon_low, self.epsilon_high
        metrics = self._metrics["train" if self.model.training else "eval"]

        def share(flags: torch.Tensor, mask: torch.Tensor) -> float:  # over every process's valid tokens
            local = torch.stack([(flags.float() * mask).sum(), mask.sum().float()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def forward_then_aepo(*args: Any, **kwargs: Any) -> Any:
            logps, entropies, aux = forward(*args, **kwargs)
            low, high, figures = balance_loss_inputs(
                inputs, logps, entropies, args=a, epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
                sequence_level=self.importance_sampling_level == "sequence", share=share,
            )  # fmt: skip
            if high is not None:
                self.epsilon_low, self.epsilon_high = low, high
            for name, value in figures.items():
                metrics[name].append(value)
            return logps, entropies, aux

        self._get_per_token_logps_and_entropies = forward_then_aepo
        try:
            return super()._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies
            self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high

    # ------------------------------------------------------------------ model card
    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """TRL's card (ARPO in its tags, ARPO's citation), plus the ARPO settings this model was trained with."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            with open(os.path.join(self.args.output_dir, "README.md"), "a") as f:
                f.write(settings_table(self.args, self.initial_rollouts, self.arpo_tools))

    # ------------------------------------------------------------------ scoring and advantages
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's, with ARPO's rollout as its `_generate`; the rollout and TRL's gathered rewards are kept for the
        length of this call only (the tree pages and hard attribution read them), then:

        - every `log_rollout_trees` logging steps, the batch's trees are rendered (`arpo_trl.viz`, main process);
        - with ``advantage_attribution="hard"``, the (B,) advantages become per-token ones averaged over the rows
          that share each token's prefix (Eq. 6-7)."""
        # This call's record: its rollout (`_generate`) and TRL's gathered rewards (`_calculate_rewards`), filled by
        # TRL's calls of those two methods (a subclass's overrides of them still run) and gone when the call ends.
        self._scoring = seen = {}
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            del self._scoring
        result: RolloutResult = seen["rollout"]
        if self.model.training:
            self._maybe_log_rollout_trees(result, seen["rewards"], output["advantages"])  # (B,), before hard
        if self.model.training and self.args.advantage_attribution == "hard":
            lengths = torch.tensor([len(t.completion_ids) for t in result.trajectories], device=self.accelerator.device)
            ids = output["completion_ids"]
            valid = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
            # Rows share a prefix only when their prompts are equal too: a leading column numbers each row's prompt
            # within its group (rows of one prompt agree on it, rows of different reset observations do not).
            keys = torch.tensor(prompt_keys(result.prompt_ids, self.num_generations), device=ids.device)
            hard = hard_attribution(
                torch.cat([keys[:, None], ids], dim=1),
                torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1),
                output["advantages"],
                self.num_generations,
            )
            output["advantages"] = hard[:, 1:]
        return output

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """TRL's (B_total, F) rewards, gathered over processes; inside `_generate_and_score_completions` also kept in
        that call's record for the tree pages."""
        rewards = super()._calculate_rewards(*args, **kwargs)
        record = self.__dict__.get("_scoring")
        if record is not None:
            record["rewards"] = rewards
        return rewards

    def _maybe_log_rollout_trees(
        self, result: RolloutResult, rewards_per_func: torch.Tensor, advantages: torch.Tensor
    ) -> None:
        """Every `log_rollout_trees` logging steps, render this batch's trees (`arpo_trl.viz`), main process only;
        at a step with several generation batches, its first."""
        every = self.args.log_rollout_trees
        step = self.state.global_step
        if not every or step % (every * max(1, self.args.logging_steps)) or self._rollouts_this_step["train"][1]:
            return
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        if self.accelerator.is_main_process:
            from .viz import log_rollout_trees

            log_rollout_trees(self, result, rewards, advantages, step, max_prompts=self.args.log_rollout_trees_prompts)

    # ------------------------------------------------------------------ training forward (shared prefixes)
    def _prepare_inputs(self, generation_batch: Any) -> Any:
        """TRL's; with `shared_prefix_forward`, TRL's shuffle of a generation batch moves whole groups, so a group's
        rows (and their shared prefixes) stay in one micro-batch."""
        if not self.args.shared_prefix_forward:
            return super()._prepare_inputs(generation_batch)
        with groups_kept_whole(self.num_generations):
            return super()._prepare_inputs(generation_batch)

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's per-row forward, or with `shared_prefix_forward` one forward over the batch's distinct tokens
        (`arpo_trl.shared_prefix`): the same log-probabilities and entropies, each shared token computed once."""

        def per_row() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            return super(ARPOTrainer, self)._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip

        if not self.args.shared_prefix_forward or compute_aux_loss or any(v is not None for v in multimodal.values()):
            return per_row()
        with profiling_context(self, "shared_prefix_forward"):
            packed = self.shared_prefix(model, input_ids, attention_mask, logits_to_keep, compute_entropy, per_row)
        if packed is None:
            return per_row()
        logps, entropies, figures = packed
        if torch.is_grad_enabled():  # the loss forward: how much of TRL's padded work it did
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["arpo/forward_token_ratio"].append(figures.packed_tokens / figures.padded_tokens)
        return logps, entropies, None


class AEPOTrainer(ARPOTrainer):
    """[`ARPOTrainer`] for AEPO (Agentic Entropy-Balanced Policy Optimization, arXiv 2510.14545): the same trainer,
    whose `args` default to an [`AEPOConfig`] (and a plain `GRPOConfig` is upgraded with AEPO's preset). With an
    `ARPOConfig`, its own `algorithm_preset` decides."""

    _name = "AEPO"

    def __init__(self, model: str | Any, reward_funcs: Any = None, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = AEPOConfig(f"{name.split('/')[-1]}-AEPO")
        elif isinstance(args, GRPOConfig) and not isinstance(args, ARPOConfig):
            args = AEPOConfig.from_grpo_config(args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
