"""The shared-prefix training forward, measured: ARPO's and GRPO's whole step with and without it, beside TRL's own
`GRPOTrainer`, on the vLLM benchmark's setting and on a long-prompt case; plus the packed forward's bf16 bound and
memory for one big group.

Settings (same driver, data and seed for every variant of a setting):

    bench   bench/vllm_rollout.py's: the demo's cold-started SmolLM2-135M, its arithmetic prompts, the sandboxed
            `PythonInterpreter` in tag format, the F1 reward, 2 prompts × M = 8, N = 4, 96 completion tokens,
            2 tool calls, float32, colocated vLLM (`--backend transformers`: the round driver instead)
    long    the same with a ~1,000-token system prompt: the demo's, followed by the schemas of a few documented
            tools exactly as TRL's chat-template tools render them (TRL's bundled Qwen2.5 template; the demo model
            itself keeps calling Python in tags, so ARPO still branches)

Variants:

    arpo-sp      ARPOTrainer, shared_prefix_forward=True (the default)
    arpo-rows    ARPOTrainer, shared_prefix_forward=False (TRL's per-row forward)
    grpo-sp      ARPOTrainer with N = M and no branching (GRPO on the same driver), shared forward on
    grpo-rows    the same, per-row forward: the benchmark's GRPO column
    trl-grpo     TRL's GRPOTrainer on the same model, prompts and reward. Without tools (its tool loop parses
                 chat-template calls only, the demo model writes tags); on vLLM with bench/vllm_rollout.py's CPU
                 weight sync (TRL 1.16's fails on vLLM's CPU backend), so its row is a generation-only baseline
    arpo-sp-kl   arpo-sp with a KL term (GRPOConfig.beta = --kl-beta): reference log-probabilities are computed
    arpo-rows-kl arpo-rows with that KL term

Each variant runs in its own process, one after another, so its peak memory is its own. What is read, and how:

- TRL's `profiling_context` / `profiling_decorator` timings (`profiling/Time taken: <Trainer>.<name>`). TRL sends
  them to wandb / mlflow / trackio only, so this script installs a recording sink: a subclass of TRL's
  `ProfilingContext` that keeps each (name, seconds, grad enabled, end time) and then reports as TRL's does,
  assigned to `trl.extras.profiling.ProfilingContext` (which `profiling_context` builds). No trainer method is
  patched. Names used: `_prepare_inputs` (a step's generation and scoring, TRL's), `_get_per_token_logps_and_entropies`
  (TRL's per-row forward) and `shared_prefix_forward` (the packed one; no-grad calls are the old, then the reference
  log-probabilities; a per-row call nested in a packed one is the packed forward's one-time check and is not
  counted twice), `compute_loss` (the loss forward), `vLLM.generate` and `sync_weights` (TRL's rollout).
- A `TrainerCallback`: `on_step_begin`, `on_pre_optimizer_step`, `on_optimizer_step`, `on_step_end` times; the
  backward is the time from the step's start to the optimizer less `_prepare_inputs` and `compute_loss` (so it
  holds the rest of `training_step` too). Peak memory: the process's `VmHWM` from /proc/self/status, reset at
  each step's start (`echo 5 > /proc/self/clear_refs`), so it is the step's own peak (the trainer's process; the
  colocated ARPO engine runs in processes of its own, TRL's colocated engine inside the trainer's).
- `trainer.state.log_history`: `arpo/forward_token_ratio` (packed / padded tokens of each loss forward),
  `arpo/rollout_seconds`, `vllm/weight_sync_s`, TRL's completion lengths and reward.
- Tokens: each ARPO step's rows (the step's `RolloutResult`, through the trainer's `on_rollout` seam:
  `arpo_trl.testing.record_rollouts`) are laid out as TRL pads them (one micro-batch of the whole generation batch
  here) and folded with `arpo_trl.shared_prefix.pack_rows`, for the packed and padded counts of every variant, the
  per-row ones included (the metric is logged only with the shared forward on, and must agree).

    python bench/shared_prefix_step.py                           # both settings, all variants, and --bound
    python bench/shared_prefix_step.py --settings bench --variants arpo-sp,arpo-rows --steps 2
    python bench/shared_prefix_step.py --bound-only               # bf16 bound and memory of one big group
    python bench/shared_prefix_step.py --smoke                    # a minute or two: tiny budgets, 1 thread
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SETTINGS = {
    "bench": "vLLM benchmark (demo model, sandboxed Python, short prompt)",
    "long": "long prompt (~1,000-token system prompt with tool schemas)",
}
VARIANTS = {
    "arpo-sp": "ARPO, shared forward",
    "arpo-rows": "ARPO, per-row forward",
    "grpo-sp": "GRPO (N = M), shared forward",
    "grpo-rows": "GRPO (N = M), per-row forward",
    "trl-grpo": "TRL GRPOTrainer (no tools)",
    "arpo-sp-kl": "ARPO + KL, shared forward",
    "arpo-rows-kl": "ARPO + KL, per-row forward",
}
DEFAULT_VARIANTS = "arpo-sp,arpo-rows,grpo-sp,grpo-rows,trl-grpo"

# Figures per step and how the report shows them.
FIGURES = [
    ("step_s", "whole step (s)", "{:.1f}"),
    ("step_without_check_s", "  the same without the shared forward's one-time check (s)", "{:.1f}"),
    ("check_s", "  one-time check of the packed forward against the per-row one (first step) (s)", "{:.1f}"),
    ("rollout_s", "  rollout: generation + tools (s)", "{:.1f}"),
    ("weight_sync_s", "  weight sync to vLLM (s)", "{:.2f}"),
    ("old_logps_s", "  old log-probabilities, no-grad forward (s)", "{:.1f}"),
    ("ref_logps_s", "  reference log-probabilities, no-grad forward (s)", "{:.1f}"),
    ("prepare_other_s", "  rest of TRL's _prepare_inputs (rewards, advantages, bookkeeping) (s)", "{:.1f}"),
    ("loss_forward_s", "  loss forward (TRL's compute_loss) (s)", "{:.1f}"),
    ("logps_forward_s", "    of which the log-probability forward (s)", "{:.1f}"),
    ("backward_s", "  backward (and the rest of training_step) (s)", "{:.1f}"),
    ("optimizer_s", "  optimizer step (s)", "{:.2f}"),
    ("after_optimizer_s", "  after the optimizer (scheduler, zero_grad, logging) (s)", "{:.2f}"),
    ("padded_tokens", "tokens of TRL's padded forward (rows × width)", "{:.0f}"),
    ("packed_tokens", "tokens of the packed forward (distinct prefix → next token)", "{:.0f}"),
    ("packed_over_padded", "  packed / padded", "{:.3f}"),
    ("forward_token_ratio", "  arpo/forward_token_ratio (the metric)", "{:.3f}"),
    ("prompt_tokens", "prompt tokens (longest)", "{:.0f}"),
    ("completion_tokens", "completion width (longest row, tool results included)", "{:.0f}"),
    ("peak_rss_mib", "peak RSS of the step, trainer process (MiB)", "{:.0f}"),
    ("reward", "mean reward", "{:.3f}"),
]


# --------------------------------------------------------------------------------------------------- TRL's timings


class ProfileLog:
    """Every TRL profiling record of this process: (name, seconds, grad enabled, end time)."""

    records: list[tuple[str, float, bool, float]] = []

    @classmethod
    def install(cls) -> None:
        """A sink beside TRL's backends: TRL's `profiling_context` builds `trl.extras.profiling.ProfilingContext`,
        which only reports to wandb / mlflow / trackio; this subclass keeps a copy of every record first."""
        import trl.extras.profiling as profiling

        base = profiling.ProfilingContext
        if getattr(base, "_bench_recording", False):
            return

        class RecordingProfilingContext(base):
            _bench_recording = True

            def _log_metrics(self, duration: float) -> None:
                cls.records.append((self.name, duration, torch.is_grad_enabled(), time.perf_counter()))
                super()._log_metrics(duration)

        profiling.ProfilingContext = RecordingProfilingContext


def split_step(records: list[tuple[str, float, bool, float]], has_old: bool, has_ref: bool) -> dict[str, float]:
    """The step's TRL timings by part (records of one step, in the order they ended)."""
    spans = [(name.split(".", 1)[-1], end - d, end, d, grad) for name, d, grad, end in records]
    forwards = [s for s in spans if s[0] in ("_get_per_token_logps_and_entropies", "shared_prefix_forward")]
    # A per-row forward inside a packed one is the packed forward's one-time check against it (no-grad, once per
    # model): kept apart as `check_s` and taken out of the packed forward, the loss forward and the step.
    outer, checks = [], {True: 0.0, False: 0.0}
    for s in forwards:
        around = [o for o in forwards if o is not s and o[1] <= s[1] and s[2] <= o[2]]
        if around:
            checks[around[0][4]] += s[3]
        else:
            outer.append(s)
    out: dict[str, float] = {"check_s": checks[True] + checks[False]}

    def total(name: str) -> float:
        return sum(s[3] for s in spans if s[0] == name)

    def own(s) -> float:  # an outer forward's time without the checks inside it
        return s[3] - sum(n[3] for n in forwards if n is not s and s[1] <= n[1] and n[2] <= s[2])

    nograd = [own(s) for s in outer if not s[4]]
    kinds = (["old"] if has_old else []) + (["ref"] if has_ref else [])
    for i, seconds in enumerate(nograd):  # TRL computes the old log-probabilities first, then the reference ones
        kind = kinds[i % len(kinds)] if kinds else "old"
        out[f"{kind}_logps_s"] = out.get(f"{kind}_logps_s", 0.0) + seconds
    out["logps_forward_s"] = sum(own(s) for s in outer if s[4])
    out["loss_forward_s"] = total("compute_loss") - checks[True]
    out["prepare_check_s"] = checks[False]
    out["prepare_s"] = total("_prepare_inputs")
    out["trl_generate_s"] = total("vLLM.generate") + total("transformers.generate")
    out["trl_sync_s"] = total("sync_weights")
    out["reward_s"] = sum(s[3] for s in spans if "reward" in s[0])
    return out


# --------------------------------------------------------------------------------------------------- assets

LONG_PROMPT_TOOLS_NOTE = "documented tools rendered by TRL's bundled Qwen2.5 chat template"


def web_search(query: str, num_results: int = 5, site: str | None = None, recency_days: int | None = None) -> str:
    """Search the web and return the top results as a numbered list of titles, URLs and snippets.

    Use this for facts that may have changed recently or that are not in your training data. Prefer precise
    queries with the key entities and terms; rephrase and search again if the first results are off-topic.

    Args:
        query: The search query, in natural language or keywords. Quote exact phrases.
        num_results: How many results to return, between 1 and 20.
        site: Restrict the search to one domain, for example "arxiv.org" or "docs.python.org".
        recency_days: Only return pages published or updated within this many days.
    """
    return ""


def fetch_page(url: str, max_chars: int = 8000, section: str | None = None, include_links: bool = False) -> str:
    """Download a web page and return its main text as Markdown, without navigation, adverts or scripts.

    Long pages are cut at `max_chars`; ask for a `section` (a heading's text) to read a later part of the page.
    PDF files are converted to text as well. Pages behind a login or a paywall return an error message.

    Args:
        url: The absolute URL of the page, starting with http:// or https://.
        max_chars: The most characters of text to return.
        section: The heading of the section to return instead of the page's beginning.
        include_links: Whether to keep the page's hyperlinks as Markdown links.
    """
    return ""


def run_python(code: str, timeout_s: float = 10.0, packages: list[str] | None = None) -> str:
    """Run Python 3 code in a fresh sandbox and return what it printed (stdout, then stderr).

    The sandbox has numpy, sympy, pandas and the standard library; it has no network access and no files from
    earlier calls. Print every value you need: the value of the last expression is not returned.

    Args:
        code: The Python source to run, as one string with newlines.
        timeout_s: Seconds after which the run is stopped and an error returned.
        packages: Extra packages to import before the code runs, from the sandbox's preinstalled set.
    """
    return ""


def sql_query(database: str, query: str, max_rows: int = 50, explain: bool = False) -> str:
    """Run a read-only SQL query on one of the company's analytics databases and return the rows as a table.

    Only SELECT statements are allowed. Tables are described by `SELECT * FROM information_schema.columns`.
    Results longer than `max_rows` are cut; aggregate in SQL rather than fetching raw rows.

    Args:
        database: The database name: "sales", "inventory", "support" or "web_analytics".
        query: One SQL SELECT statement in the PostgreSQL dialect.
        max_rows: The most rows to return.
        explain: Return the query plan instead of the rows.
    """
    return ""


LONG_PROMPT_TOOLS = [web_search, fetch_page, run_python, sql_query]


def long_system_prompt(base: str) -> str:
    """`base`, then the tools' schemas as TRL's chat-template tools put them in the system turn: TRL's bundled
    Qwen2.5 template (the one `arpo_trl.testing.chat_template_tokenizer` uses) rendered with `tools=`."""
    from arpo_trl.testing import chat_template_tokenizer

    tok = chat_template_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "system", "content": base}], tools=LONG_PROMPT_TOOLS, tokenize=False, add_generation_prompt=False
    )
    start = text.index("<|im_start|>system\n") + len("<|im_start|>system\n")
    return text[start : text.index("<|im_end|>", start)]


def demo_assets(setting: str, opts):
    """The demo's cold-started model (as bench/vllm_rollout.py), arithmetic prompts with the setting's system prompt,
    the F1 reward."""
    from arpo_trl.cold_start import default_cold_start
    from arpo_trl.data import arithmetic, to_conversational
    from arpo_trl.models import load_tokenizer, resolve_model_path
    from arpo_trl.prompts import DEMO_SYSTEM_PROMPT
    from arpo_trl.rewards import arpo_f1_reward

    path = str(resolve_model_path(opts.model)) if opts.model else default_cold_start()
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    system = DEMO_SYSTEM_PROMPT if setting == "bench" else long_system_prompt(DEMO_SYSTEM_PROMPT)
    size = max(64, opts.steps * prompts_per_step(setting, opts) * 2)
    dataset = to_conversational(arithmetic(size, seed=777), system)
    return tokenizer, dataset, path, arpo_f1_reward


def prompts_per_step(setting: str, opts) -> int:
    return opts.prompts_per_step if setting == "bench" else opts.long_prompts_per_step


def build_trainer(setting: str, variant: str, opts, out_dir: str):
    import transformers
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from arpo_trl import ARPOConfig, ARPOTrainer
    from arpo_trl.tools import PythonInterpreter

    tokenizer, dataset, model_path, reward = demo_assets(setting, opts)
    m = opts.num_generations
    vllm = opts.backend == "vllm"
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=m * prompts_per_step(setting, opts),  # one micro-batch: the generation batch
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
        bf16=False,  # float32 on both sides, as bench/vllm_rollout.py
        log_level="error",
        beta=opts.kl_beta if variant.endswith("-kl") else opts.beta,
    )
    transformers.set_seed(opts.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if variant == "trl-grpo":
        if vllm:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # else vLLM's CPU memory-fraction check aborts
        args = GRPOConfig(**common, use_vllm=vllm, vllm_mode="colocate")
        trainer = GRPOTrainer(
            model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer
        )
        if vllm:
            from vllm_rollout import cpu_weight_sync

            generation = trainer.vllm_generation
            # TRL's call site (and its `sync_weights` profiling) is kept; only the per-parameter load that fails on
            # vLLM's CPU backend is replaced (bench/vllm_rollout.py, "TRL's baseline, adapted").
            generation.sync_weights = lambda: cpu_weight_sync(generation.llm, trainer.accelerator.unwrap_model(model))
        return trainer
    grpo = variant.startswith("grpo-")
    args = ARPOConfig(
        **common,
        max_tool_calling_iterations=opts.max_tool_calls,
        initial_rollouts=m if grpo else opts.initial_rollouts,
        branch_base_probability=0.0 if grpo else opts.alpha,
        branch_entropy_weight=0.0 if grpo else opts.branch_beta,
        entropy_window=opts.entropy_window,
        tool_timeout=30,
        use_vllm=vllm,
        vllm_mode="colocate",
        shared_prefix_forward="-sp" in variant,
        shared_prefix_max_tokens=opts.max_tokens,
    )
    return ARPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer,
        tools=[PythonInterpreter(timeout=10)],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- one variant


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def step_tokens(result, pad_id: int, max_tokens: int) -> dict[str, float]:
    """The step's rows (a `RolloutResult`) laid out as TRL pads them (one micro-batch) and folded by `pack_rows`."""
    from arpo_trl.shared_prefix import pack_rows

    prompts = result.prompt_ids
    completions = [t.completion_ids for t in result.trajectories]
    pw, cw = max(map(len, prompts)), max(map(len, completions))
    ids, mask = [], []
    for p, c in zip(prompts, completions):
        ids.append([pad_id] * (pw - len(p)) + list(p) + list(c) + [pad_id] * (cw - len(c)))
        mask.append([0] * (pw - len(p)) + [1] * (len(p) + len(c)) + [0] * (cw - len(c)))
    packs = pack_rows(torch.tensor(ids), torch.tensor(mask), cw, max_tokens)
    packed = sum(p.num_tokens for p in packs) if packs else float("nan")
    padded = len(ids) * (pw + cw)
    return {"padded_tokens": padded, "packed_tokens": packed, "packed_over_padded": packed / padded,
            "prompt_tokens": pw, "completion_tokens": cw}  # fmt: skip


def run_variant(setting: str, variant: str, opts) -> dict:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    torch.set_num_threads(opts.threads)
    ProfileLog.install()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix=f"arpo-sp-{setting}-{variant}-")
    trainer = build_trainer(setting, variant, opts, out_dir)
    init_s = time.perf_counter() - t0
    is_arpo = hasattr(trainer, "rollout_backend")  # an ARPOTrainer, not TRL's GRPOTrainer
    if is_arpo:
        from arpo_trl.testing import record_rollouts

        rollouts = record_rollouts(trainer)  # each RolloutResult, in order
    args = trainer.args
    has_old = (opts.backend == "vllm") or args.num_iterations > 1
    has_ref = args.beta != 0.0
    pad_id = trainer.processing_class.pad_token_id
    records: list[dict] = []
    peak_reset_ok = [True]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.first = len(ProfileLog.records)
            self.rss_begin = _status_mib("VmRSS")
            peak_reset_ok[0] = _reset_peak() and peak_reset_ok[0]
            self.t = {"begin": time.perf_counter()}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.t["pre_opt"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.t["opt"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            t = self.t
            t["end"] = time.perf_counter()
            rec = {"step": state.global_step, "step_s": t["end"] - t["begin"]}
            rec.update(split_step(ProfileLog.records[self.first :], has_old, has_ref))
            rec["optimizer_s"] = t["opt"] - t["pre_opt"]
            rec["after_optimizer_s"] = t["end"] - t["opt"]
            rec["backward_s"] = (t["pre_opt"] - t["begin"]) - rec["prepare_s"] - rec["loss_forward_s"]
            rec["peak_rss_mib"] = _status_mib("VmHWM")
            rec["rss_begin_mib"] = self.rss_begin
            if is_arpo:
                rec.update(step_tokens(rollouts[-1], pad_id, opts.max_tokens))
            records.append(rec)
            print(f"  {setting}/{variant} step {state.global_step}: {rec['step_s']:.1f} s", flush=True)

    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    trainer.add_callback(Clock())
    backend = getattr(trainer, "rollout_backend", None)  # ARPO's; TRL's GRPOTrainer keeps its own engine
    engine = getattr(backend, "engine", None)  # the vLLM backend's
    try:
        trainer.train()
    finally:
        if backend is not None:
            backend.close()
    logged = {e["step"]: e for e in trainer.state.log_history if "step" in e and "loss" in e}
    for rec in records:
        entry = logged.get(rec["step"], {})
        for ours, theirs in (("forward_token_ratio", "arpo/forward_token_ratio"), ("rollout_s", "arpo/rollout_seconds"),
                             ("weight_sync_s", "vllm/weight_sync_s"), ("reward", "reward"),
                             ("completion_mean_length", "completions/mean_length"),
                             ("completion_max_length", "completions/max_length")):  # fmt: skip
            if theirs in entry:
                rec[ours] = entry[theirs]
        if not is_arpo:  # TRL: its rollout is its vLLM.generate (or transformers.generate) and weight sync
            rec["rollout_s"] = rec["trl_generate_s"]
            rec["weight_sync_s"] = rec["trl_sync_s"]
        known = rec.get("rollout_s", 0.0) + rec.get("weight_sync_s", 0.0)
        known += rec.get("old_logps_s", 0.0) + rec.get("ref_logps_s", 0.0) + rec["prepare_check_s"]
        rec["prepare_other_s"] = rec["prepare_s"] - known
        rec["step_without_check_s"] = rec["step_s"] - rec["check_s"]
    return {
        "setting": setting,
        "variant": variant,
        "init_s": init_s,
        "engine_start_s": getattr(engine, "start_seconds", None),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "peak_reset": peak_reset_ok[0],
        "has_old_logps": has_old,
        "has_ref_logps": has_ref,
        "packs_checked": {
            str(k): v for k, v in getattr(getattr(trainer, "shared_prefix", None), "checked", {}).items()
        },
        "steps": records,
    }


# --------------------------------------------------------------------------------------------------- bf16 and memory


def bound_case(opts, which: str) -> dict:
    """One measurement of the big-group probe, in its own process: `bf16` (max |packed − per-row| under bf16
    autocast, beside bf16's own error against float32), or the memory of one no-grad forward (`rows`,
    `packed-<max_tokens>`) or of one forward+backward (`...-grad`) of that group."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from arpo_trl.cold_start import default_cold_start
    from arpo_trl.models import resolve_model_path
    from arpo_trl.shared_prefix import pack_rows, shared_prefix_logps

    torch.set_num_threads(opts.threads)
    path = str(resolve_model_path(opts.model)) if opts.model else default_cold_start()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    grad = which.endswith("-grad")
    if grad:
        model.gradient_checkpointing_enable()  # as TRL's GRPOConfig default (gradient_checkpointing=True)
        model.config.use_cache = False
        model.train()
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if which == "bf16":
        rows, prompt_len, completion_len = 8, 62, 40
    else:
        rows, prompt_len, completion_len = opts.bound_rows, opts.bound_prompt, opts.bound_tokens - opts.bound_prompt
    # One group: a prompt, rows/2 roots and a fork of each sharing the first half of its root's completion.
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    roots = [torch.randint(0, vocab, (completion_len,), generator=g).tolist() for _ in range(rows // 2)]
    half = completion_len // 2
    forks = [r[:half] + torch.randint(0, vocab, (completion_len - half,), generator=g).tolist() for r in roots]
    completions = roots + forks
    ids = torch.tensor([prompt + c for c in completions])
    mask = torch.ones_like(ids)
    keep = completion_len

    def per_row(autocast):
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :-keep] = -100
        with autocast():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -keep:].float(), out.entropy[:, -keep:].float()

    def packed(autocast, max_tokens):
        packs = pack_rows(ids, mask, keep, max_tokens)
        lp, h = shared_prefix_logps(model, packs, ids.shape[0], keep, True, "sdpa", torch.float32, autocast)
        return lp, h, packs

    def fp32():
        return torch.autocast("cpu", enabled=False)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    out: dict = {"case": which, "rows": rows, "row_tokens": prompt_len + completion_len, "prompt_tokens": prompt_len}
    if which == "bf16":
        with torch.no_grad():
            ref32, h32 = per_row(fp32)
            ref16, h16 = per_row(bf16)
            lp16, hp16, packs = packed(bf16, 4096)
            lp32, _, _ = packed(fp32, 4096)
        out.update({
            "packed_tokens": packs[0].num_tokens, "padded_tokens": ids.numel(),
            "float32_packed_vs_rows": float((lp32 - ref32).abs().max()),
            "bf16_packed_vs_rows": float((lp16 - ref16).abs().max()),
            "bf16_packed_vs_rows_entropy": float((hp16 - h16).abs().max()),
            "bf16_rows_vs_float32_rows": float((ref16 - ref32).abs().max()),
            "bf16_packed_vs_float32_rows": float((lp16 - ref32).abs().max()),
            "bf16_packed_vs_rows_mean": float((lp16 - ref16).abs().mean()),
        })  # fmt: skip
        return out
    base = _status_mib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        if which.startswith("rows"):
            lp, _ = per_row(fp32)
            out["tokens"] = ids.numel()
        else:
            max_tokens = int(which.split("-")[1])
            lp, _, packs = packed(fp32, max_tokens)
            out["tokens"] = sum(p.num_tokens for p in packs)
            out["packs"] = len(packs)
            out["mask_mib"] = sum(p.ancestors.numel() for p in packs) / 2**20
        if grad:
            lp.sum().backward()
    out["seconds"] = time.perf_counter() - start
    out["extra_peak_mib"] = _status_mib("VmHWM") - base
    out["base_rss_mib"] = base
    return out


BOUND_CASES_NOGRAD = ["rows", "packed-4096", "packed-16384"]


# --------------------------------------------------------------------------------------------------- report


def medians(run: dict, warmup: int) -> dict:
    steps = run["steps"][warmup:] or run["steps"]
    keys = {k for rec in steps for k in rec if k != "step" and isinstance(rec[k], (int, float))}
    return {k: statistics.median(r[k] for r in steps if k in r) for k in sorted(keys)}


def ratio(a: dict, b: dict, key: str) -> float | None:
    if a and b and a.get(key) and b.get(key):
        return a[key] / b[key]
    return None


def assess(med: dict) -> dict:
    """Ratios per setting: the issue's targets (training-forward tokens ≤ 0.4× TRL's padded on the benchmark,
    ARPO's whole step ≤ 0.7× GRPO's without the shared forward) and what the shared forward does to each."""
    out = {}
    for setting in SETTINGS:
        m = med.get(setting, {})
        if not m:
            continue
        a, ar, g, gr, t = (m.get(v, {}) for v in ("arpo-sp", "arpo-rows", "grpo-sp", "grpo-rows", "trl-grpo"))
        out[setting] = {
            "arpo_sp_packed_over_padded": a.get("packed_over_padded"),
            "arpo_sp_forward_token_ratio_metric": a.get("forward_token_ratio"),
            "grpo_sp_packed_over_padded": g.get("packed_over_padded"),
            "arpo_sp_step_over_grpo_rows_step": ratio(a, gr, "step_without_check_s"),
            "arpo_rows_step_over_grpo_rows_step": ratio(ar, gr, "step_without_check_s"),
            "arpo_sp_step_over_arpo_rows_step": ratio(a, ar, "step_without_check_s"),
            "grpo_sp_step_over_grpo_rows_step": ratio(g, gr, "step_without_check_s"),
            "arpo_sp_step_over_trl_grpo_step": ratio(a, t, "step_without_check_s"),
            "arpo_sp_train_over_arpo_rows_train": ratio(a, ar, "train_s"),
            "grpo_sp_train_over_grpo_rows_train": ratio(g, gr, "train_s"),
            "arpo_sp_peak_over_arpo_rows_peak": ratio(a, ar, "peak_rss_mib"),
        }
    return out


def add_derived(med: dict, rows: int) -> None:
    """`train_s`: everything but the rollout and the weight sync (the part the shared forward can change). TRL's
    padded tokens: its `rows` padded to the prompt width of the ARPO runs (same sampler and seed, so the same
    prompts) plus its longest completion (`completions/max_length`; no tools, so no tool results)."""
    for v in med.values():
        if "step_s" in v:
            step = v.get("step_without_check_s", v["step_s"])
            v["train_s"] = step - v.get("rollout_s", 0.0) - v.get("weight_sync_s", 0.0)
    trl = med.get("trl-grpo")
    widths = [v["prompt_tokens"] for v in med.values() if "prompt_tokens" in v]
    if trl and widths and "completion_max_length" in trl:
        trl["padded_tokens"] = rows * (statistics.median(widths) + trl["completion_max_length"])


def markdown(report: dict) -> str:
    runs, med, opts = report["runs"], report["medians"], report["options"]
    lines = [f"# Shared-prefix training forward: {report['meta']['date']}", "",
             f"Command: `{report['meta']['command']}`", "", f"Settings: {report['meta']['settings']}", "",
             f"Machine: {report['meta']['machine']}", ""]  # fmt: skip
    figures = FIGURES[:1] + [("train_s", "  everything but rollout and weight sync (s)", "{:.1f}")] + FIGURES[1:]
    for setting, label in SETTINGS.items():
        if setting not in med:
            continue
        names = [v for v in VARIANTS if v in med[setting]]
        sruns = runs[setting]
        lines += [f"## {label}", "",
                  "Load average (1 min) before → after: " + ", ".join(
                      f"{v} {sruns[v]['load_before'][0]:.1f} → {sruns[v]['load_after'][0]:.1f}" for v in names), "",
                  "Start-up: " + ", ".join(
                      f"{v} {sruns[v]['init_s']:.0f} s"
                      + (f" (engine {sruns[v]['engine_start_s']:.0f} s)" if sruns[v].get("engine_start_s") else "")
                      for v in names), "",
                  f"Medians over the steps after the first {opts['warmup']} (steps run: "
                  + ", ".join(f"{v} {len(sruns[v]['steps'])}" for v in names) + ")", "",
                  "| per step | " + " | ".join(VARIANTS[v] for v in names) + " |",
                  "|---|" + "---|" * len(names)]  # fmt: skip
        for key, label2, fmt in figures:
            if not any(key in med[setting][v] for v in names):
                continue
            cells = [fmt.format(med[setting][v][key]) if key in med[setting][v] else "—" for v in names]
            lines.append(f"| {label2} | " + " | ".join(cells) + " |")
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in report["ratios"].get(setting, {}).items()
                                             if v is not None), ""]  # fmt: skip
        lines += ["Every step:", ""]
        for v in names:
            lines.append(f"- {v}: " + "; ".join(
                f"step {r['step']}: {r['step_s']:.1f} s (rollout {r.get('rollout_s', float('nan')):.1f}, loss fwd "
                f"{r.get('loss_forward_s', float('nan')):.1f}, bwd {r.get('backward_s', float('nan')):.1f})"
                for r in sruns[v]["steps"]))  # fmt: skip
        lines.append("")
    bound = report.get("bound")
    if bound:
        lines += ["## bf16 bound and memory of one group", ""]
        b = bound.get("bf16")
        if b:
            lines += [
                f"bf16 autocast, one group of {b['rows']} rows ({b['prompt_tokens']}-token prompt, 4 roots, 4 forks; "
                f"{b['packed_tokens']} packed of {b['padded_tokens']} tokens): max |log p packed − per-row| "
                f"{b['bf16_packed_vs_rows']:.3g} (mean {b['bf16_packed_vs_rows_mean']:.3g}; entropy "
                f"{b['bf16_packed_vs_rows_entropy']:.3g}); bf16's own error, per-row bf16 − per-row float32: "
                f"{b['bf16_rows_vs_float32_rows']:.3g}; float32 packed − per-row: {b['float32_packed_vs_rows']:.2g}.",
                "",
            ]
        mem = [bound[k] for k in bound if k != "bf16" and "extra_peak_mib" in bound[k]]
        if mem:
            lines += ["| forward of one group | tokens | packs | mask (MiB) | peak above the loaded model (MiB) | s |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for r in mem:
                lines.append(f"| {r['case']} ({r['rows']} rows × {r['row_tokens']} tokens) | {r['tokens']} | "
                             f"{r.get('packs', '—')} | {r.get('mask_mib', 0):.0f} | {r['extra_peak_mib']:.0f} | "
                             f"{r['seconds']:.1f} |")  # fmt: skip
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--long-variants", default=None, help="variants of the long setting (default: --variants)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant (the first --warmup left out)")
    p.add_argument("--long-steps", type=int, default=None, help="steps per variant of the long setting")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="vllm", choices=("vllm", "transformers"))
    p.add_argument("--num-generations", type=int, default=8, help="M")
    p.add_argument("--initial-rollouts", type=int, default=4, help="N for ARPO")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--long-prompts-per-step", type=int, default=1)
    p.add_argument("--max-completion-length", type=int, default=96)
    p.add_argument("--max-tool-calls", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--branch-beta", type=float, default=0.2, help="ARPO's entropy weight β (branch probability)")
    p.add_argument("--entropy-window", type=int, default=20)
    p.add_argument("--kl-beta", type=float, default=0.04, help="GRPOConfig.beta of the -kl variants")
    p.add_argument("--beta", type=float, default=0.0, help="GRPOConfig.beta (KL) of the other variants")
    p.add_argument("--max-tokens", type=int, default=4096, help="ARPOConfig.shared_prefix_max_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a model directory or embedded:NAME instead of the demo's cold start")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True, help="bf16 bound and memory")
    p.add_argument("--bound-only", action="store_true")
    p.add_argument("--bound-rows", type=int, default=16)
    p.add_argument("--bound-tokens", type=int, default=1500, help="tokens per row of the memory probe")
    p.add_argument("--bound-prompt", type=int, default=1000, help="of which the shared prompt")
    p.add_argument("--bound-grad", default="", help="comma-separated memory cases to run with backward too")
    p.add_argument("--smoke", action="store_true", help="tiny budgets, 1 thread: checks the script runs")
    p.add_argument("--out", default=str(HERE / "results" / "shared-prefix"))
    p.add_argument("--resume", default=None, help="a previous run's scratch directory: reuse what it holds")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-out", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.steps, opts.long_steps, opts.threads = 2, 2, 1
        opts.max_completion_length, opts.num_generations, opts.initial_rollouts = 24, 4, 2
        opts.prompts_per_step, opts.bound_rows, opts.bound_tokens, opts.bound_prompt = 1, 4, 200, 120
    opts.long_steps = opts.long_steps or opts.steps
    opts.setting_list = [s.strip() for s in opts.settings.split(",") if s.strip()]
    opts.variant_list = [v.strip() for v in opts.variants.split(",") if v.strip()]
    opts.long_variant_list = [v.strip() for v in (opts.long_variants or opts.variants).split(",") if v.strip()]
    bad = [v for v in opts.variant_list + opts.long_variant_list if v not in VARIANTS]
    bad += [s for s in opts.setting_list if s not in SETTINGS]
    if bad:
        p.error(f"unknown settings or variants {bad}")
    return opts


def _child(argv: list[str], one: str, target: Path) -> dict | None:
    cmd = [sys.executable, __file__, *argv, "--one", one, "--one-out", str(target)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not target.exists():
        print(f"!! {one} failed (exit status {proc.returncode}); see its output above", flush=True)
        return None
    return json.loads(target.read_text())


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.resume:
        i = argv.index("--resume")
        argv = argv[:i] + argv[i + 2 :]
    if opts.one:
        kind, _, name = opts.one.partition(":")
        if kind == "bound":
            result = bound_case(opts, name)
        else:
            if kind == "long":
                opts.steps = opts.long_steps
            result = run_variant(kind, name, opts)
        Path(opts.one_out).write_text(json.dumps(result, default=str))
        return {}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(opts.resume or tempfile.mkdtemp(prefix="arpo-bench-shared-prefix-"))
    print(f"per-variant results in {scratch} (--resume {scratch} skips what is done there)", flush=True)
    started = time.time()
    jobs = []
    if not opts.bound_only:
        for setting in opts.setting_list:
            for variant in opts.variant_list if setting == "bench" else opts.long_variant_list:
                jobs.append((setting, variant))
    if opts.bound or opts.bound_only:
        cases = ["bf16", *BOUND_CASES_NOGRAD]
        cases += [c + "-grad" for c in opts.bound_grad.split(",") if c]
        jobs += [("bound", c) for c in cases]
    runs: dict = {}
    for kind, name in jobs:
        target = scratch / f"{kind}-{name}.json"
        if opts.resume and target.exists():
            result = json.loads(target.read_text())
        else:
            print(f"== {kind}/{name} (load average {os.getloadavg()[0]:.1f}, {time.strftime('%H:%M:%S')})", flush=True)
            result = _child(argv, f"{kind}:{name}", target)
        if result is not None:
            runs.setdefault(kind, {})[name] = result

    from report import arpo_provenance, machine

    bound = runs.pop("bound", {})
    med = {s: {v: medians(r, opts.warmup) for v, r in vs.items()} for s, vs in runs.items()}
    for setting, s in med.items():
        add_derived(s, opts.num_generations * prompts_per_step(setting, opts))
    from arpo_trl.models import load_tokenizer, resolve_model_path
    from arpo_trl.prompts import DEMO_SYSTEM_PROMPT

    tokenizer = load_tokenizer(str(resolve_model_path(opts.model or "embedded:smollm2-135m-instruct")))
    long_tokens = len(tokenizer.encode(long_system_prompt(DEMO_SYSTEM_PROMPT)))
    report = {
        "meta": {
            "command": "python bench/shared_prefix_step.py " + " ".join(argv),
            "settings": (
                f"{opts.model or 'SmolLM2-135M-Instruct (demo cold start)'}, sandboxed PythonInterpreter (tags), F1 "
                f"reward; M={opts.num_generations}, N={opts.initial_rollouts}, {opts.prompts_per_step} prompts/step "
                f"(long: {opts.long_prompts_per_step}), one micro-batch per step, "
                f"max_completion_length={opts.max_completion_length}, max_tool_calling_iterations="
                f"{opts.max_tool_calls}, α={opts.alpha}, β={opts.branch_beta}, k={opts.entropy_window}, "
                f"lr={opts.learning_rate}, seed={opts.seed}, float32, backend {opts.backend}, "
                f"shared_prefix_max_tokens={opts.max_tokens}, KL β={opts.beta} (-kl variants: {opts.kl_beta}), TRL's default "
                f"gradient checkpointing; long system prompt {long_tokens} tokens ({LONG_PROMPT_TOOLS_NOTE}: "
                f"{', '.join(f.__name__ for f in LONG_PROMPT_TOOLS)}); {opts.threads} torch threads; "
                "each variant in its own process, one after another"
            ),
            "machine": machine(),
            "arpo_trl": arpo_provenance(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "wall_s": time.time() - started,
        },
        "options": {k: v for k, v in vars(opts).items() if k not in ("one", "one_out", "resume")},
        "runs": runs,
        "medians": med,
        "ratios": assess(med),
        "bound": bound,
    }
    (out / "shared_prefix_step.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (out / "shared_prefix_step.md").write_text(table + "\n")
    print("\n" + table)
    print(
        f"\nwrote {out / 'shared_prefix_step.json'}, {out / 'shared_prefix_step.md'} in {time.time() - started:.0f} s"
    )
    return report


if __name__ == "__main__":
    main()
