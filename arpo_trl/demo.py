"""`make demo`: ARPO on the embedded SmolLM2-135M-Instruct with the sandboxed Python tool, offline, on CPU.

Stages (each announced with an estimate, then timed):

1. **Model**: the embedded SmolLM2-135M-Instruct GGUF is converted to a HF directory (once, cached).
2. **Cold start** (the paper's SFT stage, in miniature): TRL's `SFTTrainer` teaches the model the tag format on
   synthetic traces of reasoning-gym arithmetic (think, ``<python>`` call, ``<result>`` (not trained on), boxed
   answer). Cached: later runs skip it.
3. **ARPO**: `ARPOTrainer` with `PythonInterpreter` and the paper's F1 reward on fresh problems; LoRA on the top
   layers keeps a step within CPU reach. One line per step.
4. **Pictures**: the learning curve, the rollout-tree pages of the first and last step, and the entropy around
   tool results of the trained model (`arpo-analyze`'s measurement).

Leaves in the output directory: ``learning_curve.png``, ``rollout_trees/step-*.html``, ``entropy/entropy.png``
(+ ``entropy.json``), the final checkpoint, ``metrics.json`` / ``metrics.csv`` (every logged step) and
``summary.json``, and prints a one-screen summary saying what to open. Flags: ``python -m arpo_trl.demo --help``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from .cold_start import SEED, SFT_STEPS, TOP_LAYERS, cold_start, cold_start_dir, lora  # noqa: E402
from .data import arithmetic, to_conversational  # noqa: E402
from .models import MODEL, cache_dir, load_tokenizer, resolve_model_path  # noqa: E402
from .prompts import DEMO_SYSTEM_PROMPT  # noqa: E402

# The ARPO stage's defaults (flags of `main`); README "The demo" reports what they give.
STEPS, PROMPTS_PER_STEP, LEARNING_RATE, BACKEND = 12, 2, 5e-4, "transformers"
# The stage banners' estimates, in seconds on 2 idle CPU cores, from `python -m arpo_trl.demo --seed 0` on an empty
# cache (7 min 29 s in all): conversion 19 s, cold start 64 s, 25 s per ARPO step of this batch shape (2 prompts ×
# M = 4, 96 tokens, transformers), pictures 60 s; the vLLM engine's start is 15–40 s. The ARPO stage's progress
# lines then extrapolate from the steps already run, so a busier machine shows its own pace.
ESTIMATES = {"model": 20, "cold_start": 65, "engine": 30, "step": 25, "entropy": 60}


def format_ok(completions: list, **kwargs) -> list[float]:
    """1 when a completion passes the paper's format check (weight 0 in the demo: logged, not trained on)."""
    from .rewards import completion_text, format_valid

    return [float(format_valid(completion_text(c))) for c in completions]


def answer_correct(completions: list, answer: list, **kwargs) -> list[float]:
    """1 when the last boxed answer is exactly the gold number (weight 0 in the demo: logged, not trained on)."""
    from .rewards import completion_text, last_boxed

    return [float((last_boxed(completion_text(c)) or "").strip() == str(a)) for c, a in zip(completions, answer)]


class Stages:
    """Prints which stage runs, with its estimate, and how long it took."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.started = total, 0, time.monotonic()
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def begin(self, name: str, what: str, estimate: float | None) -> None:
        self.end()
        self.index += 1
        self._name, self._t0 = name, time.monotonic()
        about = f" (about {_duration(estimate)} on 2 idle cores)" if estimate else ""
        print(f"\n[demo {self.index}/{self.total}] {what}{about}", flush=True)

    def end(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.monotonic() - self._t0, 1)
            print(f"[demo] {self._name}: done in {_duration(self.seconds[self._name])}", flush=True)
            self._name = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def _progress_callback(total_steps: int):
    from transformers import TrainerCallback

    class StepLines(TrainerCallback):
        """One line per ARPO step: reward, format, answers, tool use, branching, time left."""

        def __init__(self) -> None:
            self.t0: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.t0 is None:
                self.t0 = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs or self.t0 is None:
                return
            step = state.global_step
            per_step = (time.monotonic() - self.t0) / max(step, 1)
            left = per_step * (total_steps - step)
            fmt = logs.get("rewards/format_ok/mean", float("nan"))
            correct = logs.get("rewards/answer_correct/mean", float("nan"))
            print(
                f"  step {step:>3}/{total_steps}  reward {logs['reward']:+.3f}  format ok {fmt:4.0%}  "
                f"correct {correct:4.0%}  tool calls/completion {logs.get('tools/calls_per_completion', 0):.2f}  "
                f"branches/group {logs.get('arpo/branches_per_group', 0):.2f}  {per_step:.0f} s/step, "
                f"about {_duration(left)} left",
                flush=True,
            )

    return StepLines()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--sft_steps", type=int, default=SFT_STEPS)
    parser.add_argument("--steps", type=int, default=STEPS, help="ARPO optimizer steps")
    parser.add_argument("--prompts_per_step", type=int, default=PROMPTS_PER_STEP)
    parser.add_argument("--num_generations", type=int, default=4, help="M")
    parser.add_argument("--initial_rollouts", type=int, default=2, help="N")
    parser.add_argument("--max_completion_length", type=int, default=96)
    parser.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--top_layers", type=int, default=TOP_LAYERS, help="layers trained with LoRA (the top ones)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the ARPO stage (its problems and sampling)")
    parser.add_argument("--sft_seed", type=int, default=SEED, help="seed of the cold start (cached per seed)")
    parser.add_argument(
        "--backend",
        choices=["vllm", "transformers"],
        default=BACKEND,
        help="rollout backend: a colocated vLLM CPU engine (ARPO's asynchronous rollout) or transformers generate",
    )
    parser.add_argument("--entropy_prompts", type=int, default=16, help="problems for the entropy picture (0: none)")
    opts = parser.parse_args(argv)
    if opts.backend == "vllm":
        from .rollout.vllm_engine import INSTALL_HINT, vllm_available

        if not vllm_available():
            parser.error(f"--backend vllm: {INSTALL_HINT}; or pass --backend transformers")

    stages = Stages(total=5)
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)

    stages.begin("model", f"model: {MODEL}", 0 if (cache_dir() / "models").exists() else ESTIMATES["model"])
    base = resolve_model_path(MODEL)
    print(f"  {base}")
    cached = cold_start_dir(base, opts.sft_steps, opts.sft_seed, opts.top_layers).joinpath("config.json").exists()
    stages.begin(
        "cold_start",
        f"cold start: SFT, {opts.sft_steps} steps on tag-format traces" + (" (cached)" if cached else ""),
        None if cached else ESTIMATES["cold_start"],
    )
    sft_path = cold_start(base, opts.sft_steps, opts.sft_seed, opts.top_layers)

    engine_note = f" + the vLLM engine's start (about {ESTIMATES['engine']} s)" if opts.backend == "vllm" else ""
    stages.begin(
        "arpo",
        f"ARPO: {opts.steps} steps × {opts.prompts_per_step} prompts × M={opts.num_generations} "
        f"(N={opts.initial_rollouts}), {opts.backend} rollout{engine_note}",
        ESTIMATES["step"] * opts.steps + (ESTIMATES["engine"] if opts.backend == "vllm" else 0),
    )
    trainer = _train(opts, sft_path, out)

    stages.begin("pictures", "pictures: learning curve, rollout trees, entropy of the trained model",
                 ESTIMATES["entropy"] if opts.entropy_prompts else 5)  # fmt: skip
    history = [h for h in trainer.state.log_history if "reward" in h]
    _write_metrics(trainer.state.log_history, history, out)
    from .viz.learning_curve import plot_learning_curve, quarter_means

    curve = plot_learning_curve(
        trainer.state.log_history,
        out / "learning_curve.png",
        title=f"ARPO on {MODEL} (seed {opts.seed}, {opts.backend} rollout)",
        format_key="rewards/format_ok/mean",
        correct_key="rewards/answer_correct/mean",
    )
    pages = sorted((out / "rollout_trees").glob("step-*.html"))
    entropy_png, entropy_summary = (None, None)
    try:
        if opts.entropy_prompts:
            entropy_png, entropy_summary = _entropy_picture(trainer, opts, out)
    finally:
        trainer.rollout_backend.close()  # ARPO's vLLM engine, if any, with its processes

    stages.begin("summary", "summary", None)
    stages.end()

    def mean(key: str, rows: list[dict] = history) -> float:
        values = [h[key] for h in rows if key in h]
        return sum(values) / len(values) if values else float("nan")

    rewards = [h["reward"] for h in history]
    first, last = quarter_means(rewards)
    q = max(1, len(history) // 4)
    summary = {
        "model": MODEL,
        "backend": opts.backend,
        "seed": opts.seed,
        "steps": trainer.state.global_step,
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "format_ok_first_quarter": mean("rewards/format_ok/mean", history[:q]),
        "format_ok_last_quarter": mean("rewards/format_ok/mean", history[-q:]),
        "correct_first_quarter": mean("rewards/answer_correct/mean", history[:q]),
        "correct_last_quarter": mean("rewards/answer_correct/mean", history[-q:]),
        "rewards_per_step": [round(r, 3) for r in rewards],
        "tool_calls_per_completion": mean("tools/calls_per_completion"),
        "tool_executions_per_completion": mean("tools/executions_per_completion"),
        "branches_per_group": mean("arpo/branches_per_group"),
        "fresh_rollouts_per_group": mean("arpo/fresh_rollouts_per_group"),
        "tool_errors_total": sum(h.get("tools/errors", 0) for h in history),
        "entropy": entropy_summary,
        "stage_seconds": stages.seconds,
        "total_seconds": round(time.monotonic() - stages.started, 1),
        "output_dir": str(out.resolve()),
        "files": {
            "learning_curve": str(curve),
            "rollout_tree_first_step": str(pages[0]) if pages else None,
            "rollout_tree_last_step": str(pages[-1]) if pages else None,
            "entropy_png": str(entropy_png) if entropy_png else None,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary)
    return summary


def _train(opts: argparse.Namespace, sft_path: str, out: Path):
    from transformers import AutoModelForCausalLM

    from . import ARPOConfig, ARPOTrainer
    from .rewards import arpo_f1_reward
    from .tools import PythonInterpreter

    tokenizer = load_tokenizer(sft_path)
    model = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32)
    size = opts.steps * opts.prompts_per_step
    dataset = to_conversational(arithmetic(size, seed=opts.seed), DEMO_SYSTEM_PROMPT)
    args = ARPOConfig(
        output_dir=str(out),
        num_generations=opts.num_generations,
        initial_rollouts=opts.initial_rollouts,
        per_device_train_batch_size=opts.prompts_per_step * opts.num_generations,
        max_completion_length=opts.max_completion_length,
        max_tool_calling_iterations=2,
        max_steps=opts.steps,
        learning_rate=opts.learning_rate,
        lr_scheduler_type="constant",
        beta=0.0,
        temperature=1.0,
        # Only the paper's reward trains; the other two are logged per step to show what changes.
        reward_weights=[1.0, 0.0, 0.0],
        logging_steps=1,
        log_rollout_trees=1,  # every step's page: the summary points at the first and the last
        save_strategy="steps",
        save_steps=opts.steps,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=opts.seed,
        log_completions=False,
        disable_tqdm=True,  # the demo prints one line per step instead
        use_vllm=opts.backend == "vllm",
        vllm_mode="colocate",
    )
    trainer = ARPOTrainer(
        model=model,
        reward_funcs=[arpo_f1_reward, format_ok, answer_correct],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora(16, opts.top_layers, model.config.num_hidden_layers),
        tools=[PythonInterpreter(timeout=10)],
        callbacks=[_progress_callback(opts.steps)],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # with tqdm off it would print every log dict: the step lines replace it
    trainer.train()
    trainer.save_model(str(out))
    return trainer


def _write_metrics(log_history: list[dict], history: list[dict], out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(log_history, indent=1))
    keys = sorted({k for h in history for k in h})
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def _entropy_picture(trainer, opts: argparse.Namespace, out: Path) -> tuple[Path, dict]:
    """`arpo-analyze entropy` on the trained model, in process: fresh problems, 2 samples each, T = 1."""
    from .rollout.backends import TransformersBackend, VLLMBackend
    from .tools import PythonInterpreter
    from .viz.analyze import analyze_entropy, load_questions, write_entropy_report

    tools = [PythonInterpreter(timeout=10)]
    prompts = load_questions("demo:arithmetic", opts.entropy_prompts, opts.seed, None, tools)
    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = trainer.rollout_backend
    if isinstance(trained, VLLMBackend):
        # The trainer's engine holds the weights of the last rollout: give it the final ones (LoRA merged).
        trained.sync_weights(trainer.model, trainer.state.global_step, trainer.accelerator)
        backend = VLLMBackend.on_engine(trained.engine, tokenizer, vocab_size=trained.vocab_size)
    else:
        backend = TransformersBackend(model, tokenizer)
    window = 10
    profile, records = analyze_entropy(backend, tokenizer, prompts, tools, samples=2, batch_size=opts.entropy_prompts,
                                       max_new_tokens=opts.max_completion_length, max_tool_calls=2, window=window,
                                       normalization="mean", seed=opts.seed)  # fmt: skip
    config = {"model": "the demo's trained model", "dataset": "demo:arithmetic", "tools": ["python"],
              "num_prompts": opts.entropy_prompts, "samples": 2, "window": window, "temperature": 1.0,
              "backend": opts.backend}  # fmt: skip
    png, _ = write_entropy_report(profile, records, config, out / "entropy",
                                  title="entropy around tool results, the demo's trained model (T=1)")  # fmt: skip
    return png, profile["summary"]


def _print_summary(s: dict) -> None:
    e = s["entropy"] or {}
    files = s["files"]

    def f(x: float | None, spec: str = "+.2f") -> str:
        return "—" if x is None or x != x else format(x, spec)

    lines = [
        "",
        "=" * 100,
        f"ARPO demo: {s['model']}, {s['steps']} steps, {s['backend']} rollout, seed {s['seed']}, "
        f"{_duration(s['total_seconds'])} in all",
        f"  reward (paper's F1, −1 = bad format)  first quarter {f(s['reward_first_quarter'])}   "
        f"last quarter {f(s['reward_last_quarter'])}",
        f"  valid format                          first quarter {f(s['format_ok_first_quarter'], '.0%')}   "
        f"last quarter {f(s['format_ok_last_quarter'], '.0%')}",
        f"  correct answer                        first quarter {f(s['correct_first_quarter'], '.0%')}   "
        f"last quarter {f(s['correct_last_quarter'], '.0%')}",
        f"  per completion: {s['tool_calls_per_completion']:.2f} tool calls, "
        f"{s['tool_executions_per_completion']:.2f} unique executions; "
        f"{s['branches_per_group']:.2f} branches per group; {s['tool_errors_total']} tool errors",
    ]
    if e:
        lines.append(
            f"  trained model's entropy (nats/token): {f(e.get('before_first_call_mean'), '.2f')} before the first "
            f"call, {f(e.get('after_result_mean'), '.2f')} in the 10 tokens after a result "
            f"(ΔH > 0 for {f(e.get('delta_h_positive_fraction'), '.0%')} of results)"
        )
    lines += [
        "",
        "Open:",
        f"  learning curve       {files['learning_curve']}",
        f"  rollout trees        {files['rollout_tree_first_step']}  (first step)",
        f"                       {files['rollout_tree_last_step']}  (last step)",
    ]
    if files["entropy_png"]:
        lines.append(f"  entropy after tools  {files['entropy_png']}")
    lines += [
        f"  numbers              {s['output_dir']}/summary.json, metrics.csv",
        "What they show: README.md, 'The demo'; how to read the pictures: docs/viz.md.",
        "=" * 100,
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
