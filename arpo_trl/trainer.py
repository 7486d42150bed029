"""`ARPOTrainer`: TRL's `GRPOTrainer` with ARPO's entropy-branched tool rollout and advantage attribution."""

from __future__ import annotations

import atexit
import copy
import logging
import os
import re
import shutil
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.extras.profiling import profiling_context

from .advantages import hard_attribution
from .config import AEPOConfig, ARPOConfig
from .rollout.branching import BranchPolicy, rollout_seed
from .rollout.entropy import EntropyRecorder, output_logit_transform
from .rollout.environments import NOT_TOOLS, check_forkable, environment_tools
from .rollout.generation import TransformersGenerator
from .rollout.protocols import ChatTemplateProtocol, TagProtocol
from .rollout.round_driver import RolloutSettings, RolloutStats, RoundDriver
from .rollout.stream_driver import StreamDriver
from .rollout.trajectory import Trajectory
from .rollout.tree import prompt_keys
from .shared_prefix import SharedPrefixForward, groups_kept_whole
from .tools import ToolExecutor, as_function, tools_by_name

logger = logging.getLogger(__name__)

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


@dataclass
class RolloutRecord:
    """The last batch's rollout, kept for advantage attribution and for inspection (tests, visualisation)."""

    mode: str
    prompt_ids: list[list[int]]
    trajectories: list[Trajectory]
    stats: RolloutStats


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
            self.tool_protocol = ChatTemplateProtocol(self)
        self.generator = TransformersGenerator(self, self.tool_protocol.stop_strings, self.entropy_recorder)
        self.branch_policy = BranchPolicy(
            args.branch_base_probability,
            args.branch_entropy_weight,
            args.branch_rule,
            args.branch_threshold,
            penalty_rate=args.branch_penalty_rate,
            rounds=not use_vllm,  # AEPO's penalty counts rounds; the asynchronous driver has none
        )
        self.vllm_engine = self._start_vllm_engine() if use_vllm else None
        self._last_loaded_step = -1  # weights the engine holds (-1: sync before the first rollout)
        self._frozen_initial: dict[int, float] = {}  # initial_entropy="frozen_per_slot": the official per-slot H
        self.last_rollout: RolloutRecord | None = None
        # mode -> (global_step, rollouts at that step): seeds the branching RNG reproducibly, with evaluation
        # counted apart from training, so a run resumed at a step where evaluation ran branches as the original.
        self._rollouts_this_step: dict[str, tuple[int, int]] = {}
        self.shared_prefix = SharedPrefixForward(args.shared_prefix_max_tokens, self.accelerator)

    # ------------------------------------------------------------------ vLLM
    def _start_vllm_engine(self) -> Any:
        """ARPO's colocated engine (`vllm_engine.VLLMEngine`), serving this process's copy of the model, or a client
        of the vLLM server (`vllm_server.VLLMServerEngine`) with vllm_mode='server'."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        from .rollout.vllm_engine import VLLMEngine
        from .rollout.vllm_weights import autocast_mismatch, export_model

        a = self.args
        if a.vllm_mode == "server":
            from .rollout.vllm_server import VLLMServerEngine

            # Every process streams its own trajectories; only the main one pushes weights (as in GRPOTrainer).
            device = self.accelerator.device
            return VLLMServerEngine(
                a.vllm_server_base_url or f"http://{a.vllm_server_host}:{a.vllm_server_port}",
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k if self.top_k and self.top_k > 0 else -1,
                min_p=self.min_p or 0.0,
                connection_timeout=a.vllm_server_timeout,
                weight_sync=("nccl" if device.type == "cuda" else "shared_file")
                if self.accelerator.is_main_process
                else "none",
                group_port=a.vllm_group_port,
                device=device,
            )
        model = self.accelerator.unwrap_model(self.model)
        text_config = model.config.get_text_config()
        max_model_len = getattr(text_config, "max_position_embeddings", None) or a.vllm_max_model_length
        if a.vllm_max_model_length:
            max_model_len = min(max_model_len, a.vllm_max_model_length)
        self._vllm_dir = tempfile.mkdtemp(prefix="arpo-vllm-model-")
        export_model(model, self.processing_class, self._vllm_dir, zero3=is_deepspeed_zero3_enabled())
        on_cpu = self.accelerator.device.type == "cpu"
        engine_kwargs: dict[str, Any] = {}
        if not on_cpu and a.vllm_kv_cache_gib is None:
            engine_kwargs["gpu_memory_utilization"] = a.vllm_gpu_memory_utilization
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        mismatch = autocast_mismatch(dtype, self.accelerator.mixed_precision)
        if mismatch:
            warnings.warn(mismatch, stacklevel=3)
        try:
            return VLLMEngine(
                self._vllm_dir,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k if self.top_k and self.top_k > 0 else -1,
                min_p=self.min_p or 0.0,
                max_model_len=max_model_len,
                seed=a.seed + self.accelerator.process_index,
                kv_cache_gib=a.vllm_kv_cache_gib if a.vllm_kv_cache_gib is not None or not on_cpu else 1.0,
                # One engine per process: on a CPU host each takes its own core, as two unpinned engines slow each other.
                cpu_bind=str(self.accelerator.local_process_index % (os.cpu_count() or 1))
                if on_cpu and self.accelerator.num_processes > 1
                else None,
                dtype=dtype,
                max_num_seqs=max(16, a.per_device_train_batch_size * a.steps_per_generation),
                **engine_kwargs,
            )
        finally:
            shutil.rmtree(self._vllm_dir, ignore_errors=True)  # loaded: later weights come through load_weights

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's `train`; once it has returned, the process group is destroyed at interpreter exit if the script has
        not done so itself (`end`). A process that exits with the group alive can abort while tearing down gloo's
        worker threads (SIGABRT, "terminate called without an active exception") after a finished run: PyTorch
        #179291. Not after a failed `train`, where another rank may still be inside a collective."""
        output = super().train(*args, **kwargs)
        _destroy_process_group_at_exit()
        return output

    def end(self) -> None:
        """TRL's end of a run, and ARPO's vLLM engine (if any) shut down with its processes."""
        if getattr(self, "vllm_engine", None) is not None:
            self.vllm_engine.shutdown()
        super().end()

    def _sync_vllm_weights(self, mode: str) -> None:
        """After an optimizer step: the engine gets the new weights (gathered once under ZeRO-3, LoRA merged), and
        its prefix cache, computed with the old ones, is reset. Every rank syncs at the same steps."""
        if self.state.global_step == self._last_loaded_step:
            return
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        from .rollout.vllm_weights import training_weights

        start = time.perf_counter()
        server = self.args.vllm_mode == "server"
        with profiling_context(self, "vllm_weight_sync"):
            model = self.accelerator.unwrap_model(self.model)
            with training_weights(model, zero3=is_deepspeed_zero3_enabled()) as weights:
                if not server or self.accelerator.is_main_process:
                    self.vllm_engine.load_weights(weights.items())
            if server:  # one server for all: no process samples before the main one has pushed the weights
                self.accelerator.wait_for_everyone()
        self._metrics[mode]["vllm/weight_sync_s"].append(time.perf_counter() - start)
        self._last_loaded_step = self.state.global_step

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
    def _rollout_settings(self, mode: str) -> RolloutSettings:
        a = self.args
        train = mode == "train"
        return RolloutSettings(
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

    def _any_process_active(self, local_active: bool) -> bool:
        """Collective: True while any process still has a live trajectory (so all make the same generate calls)."""
        if self.accelerator.num_processes == 1:
            return local_active
        flag = torch.tensor([int(local_active)], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).sum().item())

    def _seed_branching(self, mode: str) -> int:
        step, calls = self._rollouts_this_step.get(mode, (-1, 0))
        calls = calls + 1 if step == self.state.global_step else 0
        self._rollouts_this_step[mode] = (self.state.global_step, calls)
        seed = rollout_seed(self.args.seed, self.accelerator.process_index, mode, self.state.global_step, calls)
        self.branch_policy.reseed(seed)
        return seed

    def _generate(self, prompts: list):
        """ARPO's tree rollout (training) or plain tool-using sampling (evaluation); returns what TRL's does.

        The rows of a group may start from different prompts (an environment's `reset` appends its own observation to
        each). A branch continues its parent's prompt, not its row's: row i's prompt ids, its entry of `prompts` (the
        list TRL passed in, which TRL's reward functions and logs read afterwards, updated in place) and
        `self.environments[i]` are those its completion was generated from."""
        mode = "train" if self.model.training else "eval"
        trl_prompts, prompts = prompts, copy.deepcopy(prompts)
        prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)
        if images is not None or multimodal_fields:
            raise NotImplementedError("ARPOTrainer does not support image inputs yet")
        seed = self._seed_branching(mode)
        common = dict(
            settings=self._rollout_settings(mode),
            protocol=self.tool_protocol,
            executor=self.tool_executor,
            policy=self.branch_policy,
            # From the config: under ZeRO-3 the LM head's weight is partitioned and its local shape is empty.
            vocab_size=self.model.config.get_text_config().vocab_size,
            eos_token_id=self._tokenizer.eos_token_id,
            toolset=self._trajectory_tools if self.environments else None,
            frozen_initial=self._frozen_initial if mode == "train" else None,
        )
        self._aepo_dynamic_budget(mode, prompt_ids, common)  # AEPO: N per prompt from an entropy probe
        started = time.perf_counter()
        if self.vllm_engine is not None:
            self._sync_vllm_weights(mode)
            started = time.perf_counter()
            rollout = StreamDriver(
                engine=self.vllm_engine,
                stop=self.tool_protocol.stop_strings,
                entropy_estimator=self.args.entropy_estimator,
                **common,
            )
            trajectories, stats = rollout.run(prompt_ids, self.environments or None, seed=seed)
            prompt_tokens = max(rollout.prompt_tokens, 1)
            self._metrics[mode]["vllm/prefix_cache_hit_rate"].append(rollout.cached_tokens / prompt_tokens)
            self._metrics[mode]["tools/seconds"].append(rollout.tool_seconds)
            if rollout.fork_prefills:  # share of the forks' prompt tokens (their parent's prefix) read from cache
                total, cached = (sum(x) for x in zip(*rollout.fork_prefills))
                self._metrics[mode]["vllm/fork_prefix_cache_hit_rate"].append(cached / max(total, 1))
            logprobs = [t.logprobs for t in trajectories]  # TRL's importance-sampling correction reads them
        else:
            rollout = RoundDriver(generator=self.generator, any_active=self._any_process_active, **common)
            trajectories, stats = rollout.run(prompt_ids, self.environments or None)
            logprobs = None
        self._metrics[mode]["arpo/rollout_seconds"].append(time.perf_counter() - started)  # wall time, tools included
        prompt_ids = [t.prompt_ids for t in trajectories]  # each row's own; a branch's is its parent's
        if any(t.origin != t.slot for t in trajectories):
            trl_prompts[:] = [trl_prompts[t.origin] for t in trajectories]  # a new list is built before the slice
        self.last_rollout = RolloutRecord(mode, prompt_ids, trajectories, stats)
        if self.environments:
            # Each completion's own environment (a branch's is its copy): what TRL hands to rewards (`environments=`,
            # `get_reward`).
            self.environments = [t.env for t in trajectories]

        conversational = is_conversational({"prompt": prompts[0]})
        completion_ids = [t.completion_ids for t in trajectories]
        tool_mask = [t.tool_mask for t in trajectories]
        completions = [self.tool_protocol.completion(t, conversational) for t in trajectories]
        self._log_rollout_metrics(mode, prompt_ids, trajectories, stats)
        self._log_aepo_rollout_metrics(mode)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, {}, None, []

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
        # Where this process's rollout time went (definitions per driver: RolloutStats).
        metrics["rollout/generation_seconds"].append(stats.generation_seconds)
        metrics["rollout/tool_seconds"].append(stats.tool_seconds)
        metrics["rollout/wait_seconds"].append(stats.wait_seconds)
        metrics["tools/calls_per_completion"].append(calls / completions)
        metrics["tools/executions_per_completion"].append(execs / completions)
        metrics["tools/errors"].append(errors)
        metrics["tools/timeouts"].append(timeouts)
        metrics["tools/call_limit_hits"].append(limit_hits)
        if execs and errors >= execs and self.accelerator.is_main_process:  # once per rollout, not per call
            logger.warning(
                "every tool call of this %s rollout failed (%d of %d); the last error: %s",
                mode, int(errors), int(execs), self.tool_executor.last_error,
            )  # fmt: skip
        if self.arpo_tools or self.environments:
            # TRL's own tool metrics, same definitions: calls per completion (a call in a shared prefix counts for
            # every completion holding it) and the share of executed calls that failed.
            metrics["tools/call_frequency"].append(calls / completions)
            metrics["tools/failure_frequency"].append(errors / execs if execs else 0.0)

    def _log_aepo_rollout_metrics(self, mode: str) -> None:
        """AEPO's consecutive-branch penalty: c at each decision (mean over processes, max), when the penalty is on."""
        if not self.args.branch_penalty_rate and self.args.branch_rule != "aepo_official":
            return
        seen = self.branch_policy.consecutive_seen
        local = torch.tensor([[sum(seen), len(seen)]], dtype=torch.float64, device=self.accelerator.device)
        total, count = self.accelerator.gather(local).sum(0).tolist()
        top = self.accelerator.gather(torch.tensor([max(seen, default=0)], device=self.accelerator.device))
        if count:
            self._metrics[mode]["aepo/consecutive_branches_mean"].append(total / count)
        self._metrics[mode]["aepo/consecutive_branches_max"].append(float(top.max().item()))

    def _aepo_dynamic_budget(self, mode: str, prompt_ids: list[list[int]], common: dict[str, Any]) -> None:
        """AEPO's dynamic budget split (`dynamic_rollouts`): one tool-using probe rollout per prompt, without forks,
        measures H_root (the window of its first segment) and H̄ (the mean window of its steps after tool results;
        official: of all its segments); the prompt then starts m roots (`aepo.global_samples_*`) instead of N.
        Sets `common["settings"].initial_rollouts` to the per-prompt list. Every rank probes (same collectives)."""
        a = self.args
        if mode != "train" or not a.dynamic_rollouts:
            return
        import dataclasses

        from .aepo import global_samples_official, global_samples_paper, probe_entropies, segment_windows
        from .rollout.entropy import window_entropy

        m = self.num_generations
        started = time.perf_counter()
        settings = dataclasses.replace(
            common["settings"], group_size=2, initial_rollouts=1, rollout_fill="duplicate", speculative_forks=False
        )  # two rows per prompt keep one free slot, so every step's entropy is measured; the policy never forks
        probe = {**common, "settings": settings, "policy": BranchPolicy(0.0, 0.0, seed=0), "frozen_initial": None}
        probe_prompts = [prompt_ids[g] for g in range(0, len(prompt_ids), m) for _ in range(2)]
        batch_prompts = getattr(self.tool_protocol, "prompt_ids", None)  # a protocol that reads each slot's prompt
        if batch_prompts is not None:
            self.tool_protocol.prompt_ids = probe_prompts
        try:
            if self.vllm_engine is not None:
                self._sync_vllm_weights(mode)
                rollout = StreamDriver(
                    engine=self.vllm_engine, stop=self.tool_protocol.stop_strings,
                    entropy_estimator=a.entropy_estimator, **probe,
                )  # fmt: skip
                seed = rollout_seed(a.seed, self.accelerator.process_index, "probe", self.state.global_step, 0)
                trajectories, _ = rollout.run(probe_prompts, None, seed=seed)
            else:
                rollout = RoundDriver(generator=self.generator, any_active=self._any_process_active, **probe)
                trajectories, _ = rollout.run(probe_prompts, None)
        finally:
            if batch_prompts is not None:
                self.tool_protocol.prompt_ids = batch_prompts
        formula = global_samples_official if a.dynamic_rollouts == "official" else global_samples_paper
        k, norm, vocab = a.entropy_window, a.entropy_normalization, common["vocab_size"]
        initial, tokens, calls = [], 0, 0
        for root in trajectories[::2]:  # slot 2g: the probe of prompt g (2g + 1 duplicates it)
            windows = segment_windows(root.tool_mask, root.token_entropies, lambda h: window_entropy(h, k, norm, vocab))
            h_root, h_bar = probe_entropies(windows, official=a.dynamic_rollouts == "official")
            initial.append(formula(m, h_root, h_bar, a.aepo_budget_sensitivity))
            tokens += sum(root.tool_mask)
            calls += len(root.tool_events)
        common["settings"].initial_rollouts = initial
        device = self.accelerator.device
        local = torch.tensor([[sum(initial), len(initial), tokens, calls]], dtype=torch.float64, device=device)
        total_n, groups, total_tokens, total_calls = self.accelerator.gather(local).sum(0).tolist()
        metrics = self._metrics[mode]
        metrics["aepo/global_samples_per_prompt"].append(total_n / max(groups, 1.0))
        metrics["aepo/probe_sampled_tokens"].append(total_tokens / max(groups, 1.0))
        metrics["aepo/probe_tool_calls"].append(total_calls / max(groups, 1.0))
        metrics["aepo/probe_seconds"].append(time.perf_counter() - started)

    # ------------------------------------------------------------------ AEPO loss
    def _compute_loss(self, model, inputs):
        """TRL's loss, with AEPO's entropy-balanced clipping and entropy-aware advantage when they are on.

        Both need what TRL's `_compute_loss` computes in its own forward (the log-probs, and the entropies it always
        computes there), and act before its clipped objective. TRL offers no seam between the two other than the
        forward call itself, so for the duration of the call the forward is wrapped (`_aepo_after_forward`): it then
        replaces the advantages with Ã (B, T) and hands TRL an upper clip whose value is ε_h and whose gradient is
        AEPO's. Everything else (IS correction, masks, KL, aggregation per loss_type, metrics) stays TRL's.
        """
        a = self.args
        if not (a.entropy_balanced_clipping or a.entropy_advantage_coef):
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # the buffered batch is reused by later iterations: never modify it
        forward = self._get_per_token_logps_and_entropies  # whatever the class provides

        def forward_then_aepo(*args: Any, **kwargs: Any) -> Any:
            logps, entropies, aux = forward(*args, **kwargs)
            self._aepo_after_forward(inputs, logps, entropies)
            return logps, entropies, aux

        epsilon_low, epsilon_high = self.epsilon_low, self.epsilon_high
        self._get_per_token_logps_and_entropies = forward_then_aepo
        try:
            return super()._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies
            self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high

    def _aepo_after_forward(self, inputs: dict[str, Any], logps: torch.Tensor, entropies: torch.Tensor | None) -> None:
        from .aepo import balanced_epsilon_high, entropy_aware_advantages, standardized_entropy

        a = self.args
        metrics = self._metrics["train" if self.model.training else "eval"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        sequence = self.importance_sampling_level == "sequence"

        def share(flags: torch.Tensor) -> float:  # over every process's valid tokens (a collective: all ranks call)
            local = torch.stack([(flags.float() * mask).sum(), mask.sum().float()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if a.entropy_advantage_coef:
            if entropies is None:
                raise RuntimeError("entropy_advantage_coef needs the token entropies of TRL's loss forward, got None")
            advantages = entropy_aware_advantages(advantages, entropies, mask, a.entropy_advantage_coef)
            inputs["advantages"] = advantages
            # 1 + a·z < 0 turns a token's advantage around (z below −1/a): rare at a = 0.2, worth seeing.
            metrics["aepo/advantage_sign_flip_share"].append(
                share(1 + a.entropy_advantage_coef * standardized_entropy(entropies, mask) < 0)
            )
        if not a.entropy_balanced_clipping:
            return
        if sequence:  # TRL's sequence weight: the masked mean of the token log-ratios
            log_weight = (((logps - logps.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        else:
            log_weight = logps
        epsilon_high = float(self.epsilon_high)
        # torch.clamp takes two numbers or two tensors: both bounds become tensors (values unchanged).
        self.epsilon_high = balanced_epsilon_high(log_weight, epsilon_high)
        self.epsilon_low = torch.tensor(float(self.epsilon_low), dtype=logps.dtype, device=logps.device)
        # Tokens above the upper clip with A > 0: zero gradient under PPO, (1 + ε_h)·A·∇log π here.
        old = inputs.get("old_per_token_logps")
        log_ratio = torch.zeros_like(logps) if old is None else logps.detach() - old
        if sequence:
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        metrics["aepo/clipped_gradient_kept_share"].append(
            share((torch.exp(log_ratio) > 1 + epsilon_high) & (advantages > 0))
        )

    # ------------------------------------------------------------------ model card
    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """TRL's card (ARPO in its tags, ARPO's citation), plus the ARPO settings this model was trained with."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        a = self.args
        rows = [
            ("M (`num_generations`)", a.num_generations),
            ("N (`initial_rollouts`)", self.initial_rollouts),
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
            # Rows share a prefix only when their prompts are equal too: a leading column numbers each row's prompt
            # within its group (rows of one prompt agree on it, rows of different reset observations do not).
            keys = torch.tensor(prompt_keys(record.prompt_ids, self.num_generations), device=ids.device)
            hard = hard_attribution(
                torch.cat([keys[:, None], ids], dim=1),
                torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1),
                output["advantages"],
                self.num_generations,
            )
            output["advantages"] = hard[:, 1:]
        return output

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
