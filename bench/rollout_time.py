"""Where a rollout's time goes, and what CPU contention does to it.

Two parts, each configuration in its own process (its environment, e.g. ``OMP_WAIT_POLICY``, is set before torch
loads; its thread count and competing load are its own):

``threads``: one seeded rollout (the same prompts, seed and tree every time) on the transformers backend (the round
driver), repeated under every combination of
    - torch's intra-op threads (``torch.set_num_threads``: ``--threads``, default 1 and 2),
    - OpenMP's wait policy (``OMP_WAIT_POLICY`` unset, i.e. libgomp's spinning default, or ``passive``),
    - a competing load started here (``--loads``: 0 and 2 busy Python processes, ended by their pids afterwards),
and split into generation (the generator's calls), tool calls (the executor's rounds), sandbox start-up (for the
sandboxed interpreter: the calls times the median cost of an empty program in the same sandbox, measured in the same
process right after) and the rest (the tree's bookkeeping: decisions, tokenising results; around the driver, the
prompts' tokenisation, the completions' decoding and the metrics). Beside each: the process's CPU seconds (user +
system) per wall second, its involuntary context switches, and the load average.

``throughput``: ARPO's rollout against GRPO's (N = M, no branching) on the asynchronous vLLM driver with enough
prompts that the engine is throughput-bound (``--throughput-prompts``, default 16, × M = 8), on one engine in one
process, rollouts only (no training step), alternating A B A B so both see the same background load.

Every figure is printed with the 1-minute load average beside it: this machine is shared, and under load the
figures move. Each rollout's figures are read from its `RolloutResult`, which the trainer hands to its
`on_rollout` seam (`arpo_trl.testing.record_rollouts`); nothing of arpo_trl is patched. ``threads``: the wall time
is the trainer's whole `_generate`, split with `stats.generation_seconds`, `stats.tool_seconds` and
`stats.tool_executions` (the result's own `seconds`, the driver's run, is kept beside it). ``throughput``: the
result's `seconds` (after the weight sync, tools included).

    python bench/rollout_time.py                                   # both parts, the demo model
    python bench/rollout_time.py --parts threads --task tiny       # the mechanism, on the tiny test model
    python bench/rollout_time.py --parts throughput --throughput-prompts 32 --rollouts 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUSY = "while True: pass"


def load1() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------------- one child


def assets(task: str, prompts: int):
    """(tokenizer, model, prompts as TRL passes them (each repeated M times later), tool, reward)."""
    import torch

    if task == "demo":
        from transformers import AutoModelForCausalLM

        from arpo_trl.cold_start import default_cold_start
        from arpo_trl.data import arithmetic, to_conversational
        from arpo_trl.models import load_tokenizer
        from arpo_trl.prompts import DEMO_SYSTEM_PROMPT
        from arpo_trl.rewards import arpo_f1_reward
        from arpo_trl.tools import PythonInterpreter

        path = default_cold_start()
        tok = load_tokenizer(path)
        tok.padding_side = "left"
        data = to_conversational(arithmetic(max(prompts, 8), seed=777), DEMO_SYSTEM_PROMPT)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return (
            tok,
            model,
            path,
            [data[i]["prompt"] for i in range(prompts)],
            PythonInterpreter(timeout=10),
            arpo_f1_reward,
        )
    from arpo_trl.testing import calc, calc_dataset, closeness_reward, load_tokenizer, tool_sft

    tok = load_tokenizer()
    data = calc_dataset(max(prompts, 8))
    return tok, tool_sft(tok), None, [data[i]["prompt"] for i in range(prompts)], calc, closeness_reward


def make_trainer(opts, n: int, use_vllm: bool, prompts: int):
    """(trainer, the batch as TRL passes it, tool, the list each of the trainer's `RolloutResult`s is appended to)."""
    import transformers
    from datasets import Dataset

    from arpo_trl import ARPOConfig, ARPOTrainer
    from arpo_trl.testing import record_rollouts

    tok, model, _, prompt_list, tool, reward = assets(opts.task, prompts)
    m = opts.num_generations
    args = ARPOConfig(
        output_dir=tempfile.mkdtemp(prefix="arpo-rollout-time-"),
        per_device_train_batch_size=m * prompts,
        num_generations=m,
        initial_rollouts=n,
        branch_base_probability=opts.alpha if n < m else 0.0,
        branch_entropy_weight=opts.beta if n < m else 0.0,
        max_completion_length=opts.max_completion_length,
        max_tool_calling_iterations=opts.max_tool_calls,
        temperature=1.0,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=opts.seed,
        tool_timeout=30,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        log_level="error",
        disable_tqdm=True,
        rollout_fill=opts.rollout_fill,
    )
    transformers.set_seed(opts.seed)
    dataset = Dataset.from_list([{"prompt": p} for p in prompt_list])
    trainer = ARPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
        processing_class=tok, tools=[tool],
    )  # fmt: skip
    trainer.model.train()
    batch = [p for p in prompt_list for _ in range(m)]  # TRL repeats each prompt M times, contiguously
    return trainer, batch, tool, record_rollouts(trainer)


def rollout_once(trainer, batch, seed: int) -> float:
    import transformers

    transformers.set_seed(seed)
    trainer._rollouts_this_step = {}  # the same branching seed for every repeat: the same rollout
    t = time.perf_counter()
    trainer._generate([list(p) for p in batch])
    return time.perf_counter() - t


def sandbox_start(tool, runs: int = 5) -> float | None:
    """Median wall seconds of an empty program in the tool's sandbox (start-up: bwrap, namespaces, interpreter)."""
    if not hasattr(tool, "sandbox"):
        return None
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        tool.run("pass")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def child_threads(opts) -> dict:
    """Every (torch threads, competing load) combination in this process (its OMP_WAIT_POLICY fixed at start)."""
    import torch

    trainer, batch, tool, results = make_trainer(opts, opts.initial_rollouts, False, opts.prompts)
    rows = []
    for threads, load in itertools.product(ints(opts.threads), ints(opts.loads)):
        torch.set_num_threads(threads)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            rollout_once(trainer, batch, opts.seed)  # warm-up at this thread count (first-call costs left out)
            records = []
            for _ in range(opts.rollouts):
                ru0, load_before = resource.getrusage(resource.RUSAGE_SELF), load1()
                wall = rollout_once(trainer, batch, opts.seed)
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                rec = results[-1]
                generation, tools = rec.stats.generation_seconds, rec.stats.tool_seconds
                records.append({
                    "wall_s": wall,
                    "rollout_s": rec.seconds,
                    "generation_s": generation,
                    "tool_s": tools,
                    "other_s": wall - generation - tools,
                    "tool_calls": rec.stats.tool_executions,
                    "rounds": rec.stats.rounds,
                    "tokens": sum(sum(t.tool_mask) for t in rec.trajectories),
                    "cpu_per_wall": (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall,
                    "involuntary_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
                    "load_before": load_before,
                    "load_after": load1(),
                })  # fmt: skip
                r = records[-1]
                print(f"   threads={threads} +{load} busy: wall {wall:.2f} s: generation {r['generation_s']:.2f}, "
                      f"tools {r['tool_s']:.2f}, other {r['other_s']:.2f}; CPU/wall {r['cpu_per_wall']:.2f}; "
                      f"load {load_before:.1f}", flush=True)  # fmt: skip
            start = sandbox_start(tool)  # under the same load
        finally:
            for p in busy:  # only the processes started here, by their own handles
                p.kill()
                p.wait()
        for r in records:
            r["sandbox_start_s"] = None if start is None else start * r["tool_calls"]
        rows.append({"threads": threads, "load": load, "records": records, "sandbox_start_per_call_s": start})
        Path(opts.one_out).write_text(json.dumps({"rows": rows}))  # so far: a child stopped later keeps these
    return {"rows": rows}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def child_throughput(opts) -> dict:
    """ARPO (N) and GRPO (N = M) rollouts on one vLLM engine, alternating."""
    import torch

    torch.set_num_threads(opts.one_threads)
    m = opts.num_generations
    arpo, batch, _, arpo_results = make_trainer(opts, opts.initial_rollouts, True, opts.throughput_prompts)
    backend = arpo.rollout_backend
    out: dict = {"arpo": [], "grpo": [], "engine_start_s": backend.engine.start_seconds}
    try:
        grpo, _, _, grpo_results = make_trainer_on(opts, backend, m)
        results = {"arpo": arpo_results, "grpo": grpo_results}
        for i in range(opts.rollouts):
            for name, tr in (("arpo", arpo), ("grpo", grpo)) if i % 2 == 0 else (("grpo", grpo), ("arpo", arpo)):
                before = load1()
                wall = rollout_once(tr, batch, opts.seed)
                rec = results[name][-1]
                logged = {k: v[-1] for k, v in tr._metrics["train"].items() if v}
                out[name].append({
                    "wall_s": wall,
                    "rollout_s": rec.seconds,  # the driver's run (after the weight sync), tools included
                    "weight_sync_s": logged.get("vllm/weight_sync_s"),
                    "tool_s_summed": rec.stats.tool_seconds,  # summed over calls: they overlap
                    "requests": rec.stats.rounds,
                    "tool_executions": rec.stats.tool_executions,
                    "sampled_tokens": sum(sum(t.tool_mask[t.fork_position or 0 :]) for t in rec.trajectories),
                    "load_before": before,
                    "load_after": load1(),
                })  # fmt: skip
                print(f"  {name} rollout {i}: {out[name][-1]['rollout_s']:.1f} s (load {before:.1f})", flush=True)
    finally:
        backend.close()  # the engine's owner: its processes end here
    return out


def make_trainer_on(opts, backend, n: int):
    """A second trainer (GRPO: N = M) driving the first one's engine: built on transformers, then handed a copy of
    the first one's vLLM backend (the same engine, sampling settings and entropy estimator; the asynchronous
    driver), so one engine serves both."""
    import copy

    trainer, batch, tool, results = make_trainer(opts, n, False, opts.throughput_prompts)
    shared = copy.copy(backend)
    shared.owned = False  # `close` leaves the engine to the first trainer's backend
    shared.loaded_step = trainer.state.global_step  # the engine holds these very weights (same checkpoint)
    trainer.rollout_backend = shared
    return trainer, batch, tool, results


# --------------------------------------------------------------------------------------------------- the parent


def run_child(opts, part: str, threads: int, wait: str, load: int, argv: list[str]) -> dict | None:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait != "default":
        env["OMP_WAIT_POLICY"] = wait
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    out = Path(tempfile.mkstemp(prefix="rollout-time-", suffix=".json")[1])
    try:
        cmd = [sys.executable, __file__, *argv, "--one", part, "--one-threads", str(threads), "--one-out", str(out)]
        proc = subprocess.run(cmd, env=env, timeout=opts.child_timeout)
    except subprocess.TimeoutExpired:
        print(f"!! {part} threads={threads} wait={wait} load={load}: over {opts.child_timeout} s", flush=True)
        return None
    finally:
        for p in busy:  # only the processes started here, by their own handles
            p.kill()
            p.wait()
    if proc.returncode != 0 and out.stat().st_size:  # stopped part-way: what it finished
        print(f"!! {part} threads={threads} wait={wait} load={load} stopped ({proc.returncode}); kept what it finished")
        return json.loads(out.read_text())
    if proc.returncode != 0 or not out.stat().st_size:
        print(f"!! {part} threads={threads} wait={wait} load={load} failed ({proc.returncode})", flush=True)
        return None
    return json.loads(out.read_text())


def fmt(v, spec=".2f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    o = report["options"]
    lines = [
        f"# Where a rollout's time goes: {report['date']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; task {o['task']}, M={o['num_generations']}, N={o['initial_rollouts']}, "
        f"max_completion_length={o['max_completion_length']}, seed {o['seed']}",
        "",
    ]
    if report.get("threads"):
        lines += [
            f"## One seeded rollout ({o['prompts']} prompts × M), transformers backend: median of {o['rollouts']} "
            "after a warm-up",
            "",
            "| torch threads | OMP_WAIT_POLICY | + busy procs | wall (s) | generation (s) | tools (s) | "
            "sandbox start (s) | other (s) | CPU s / wall s | invol. switches | tokens | load 1-min |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in report["threads"]:
            recs = row["records"]
            if not recs:
                continue
            med = {k: statistics.median(r[k] for r in recs) if recs[0][k] is not None else None for k in recs[0]}
            lines.append(
                f"| {row['threads']} | {row['wait']} | {row['load']} | {fmt(med['wall_s'])} | "
                f"{fmt(med['generation_s'])} | {fmt(med['tool_s'])} | {fmt(med['sandbox_start_s'])} | "
                f"{fmt(med['other_s'])} | {fmt(med['cpu_per_wall'])} | {med['involuntary_switches']:.0f} | "
                f"{med['tokens']:.0f} | {med['load_before']:.1f} → {med['load_after']:.1f} |"
            )
        lines.append("")
    if report.get("throughput"):
        t = report["throughput"]
        lines += [
            f"## Throughput-bound: {o['throughput_prompts']} prompts × M = {o['num_generations']}, vLLM (async "
            f"driver), one engine, rollouts only, alternating (engine start {t['engine_start_s']:.0f} s)",
            "",
            "| rollout | ARPO (s) | GRPO (s) | ARPO / GRPO | ARPO tokens | GRPO tokens | ARPO / GRPO tool execs | load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for i, (a, g) in enumerate(zip(t["arpo"], t["grpo"], strict=False)):
            lines.append(
                f"| {i} | {a['rollout_s']:.1f} | {g['rollout_s']:.1f} | {a['rollout_s'] / g['rollout_s']:.2f} | "
                f"{a['sampled_tokens']} | {g['sampled_tokens']} | {a['tool_executions']} / {g['tool_executions']} | "
                f"{a['load_before']:.1f}, {g['load_before']:.1f} |"
            )
        ra = statistics.median(r["rollout_s"] for r in t["arpo"])
        rg = statistics.median(r["rollout_s"] for r in t["grpo"])
        lines += ["", f"Median ARPO / GRPO rollout: {ra / rg:.2f} (target ≤ 0.8)", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="threads,throughput")
    p.add_argument("--task", default="demo", choices=["demo", "tiny"])
    p.add_argument("--threads", default="1,2", help="torch intra-op thread counts to try")
    p.add_argument("--waits", default="default,passive", help="OMP_WAIT_POLICY values (default: unset)")
    p.add_argument("--loads", default="0,2", help="busy Python processes started beside the rollout")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--throughput-prompts", type=int, default=16)
    p.add_argument("--throughput-threads", type=int, default=1)
    p.add_argument("--rollouts", type=int, default=2, help="timed rollouts per configuration (after a warm-up)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--initial-rollouts", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=96)
    p.add_argument("--max-tool-calls", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rollout-fill", default="fresh", choices=("fresh", "speculative"), help="ARPOConfig.rollout_fill")
    p.add_argument("--child-timeout", type=int, default=1800)
    p.add_argument("--out", default=str(HERE / "results" / "rollout-time"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--one-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.one:
        result = child_threads(opts) if opts.one == "threads" else child_throughput(opts)
        Path(opts.one_out).write_text(json.dumps(result))
        return result
    sys.path.insert(0, str(HERE))
    from report import machine

    parts = opts.parts.split(",")
    report: dict = {"options": vars(opts), "command": "python bench/rollout_time.py " + " ".join(argv),
                    "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "rollout_time.json").write_text(json.dumps(report, indent=1))
        (out / "rollout_time.md").write_text(markdown(report) + "\n")

    if "threads" in parts:
        report["threads"] = []
        for wait in opts.waits.split(","):
            print(f"== OMP_WAIT_POLICY={wait} (load {load1():.1f})", flush=True)
            result = run_child(opts, "threads", opts.throughput_threads, wait, 0, argv)
            for row in (result or {}).get("rows", []):
                report["threads"].append({"wait": wait, **row})
            save()
    if "throughput" in parts:
        print(f"== throughput: {opts.throughput_prompts} prompts (load {load1():.1f})", flush=True)
        report["throughput"] = run_child(opts, "throughput", opts.throughput_threads, "default", 0, argv)
        save()
    save()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
