"""Run TRL's own GRPO example scripts, taken from a TRL snapshot, with `GRPOTrainer` swapped for `ARPOTrainer`.

    python bench/trl_examples/run.py --trl /path/to/trl            # a checkout, or a bare git directory
    python bench/trl_examples/run.py --trl /path/to/trl --scripts agent 2048 --device cuda

Each script runs as it is, in a subprocess, swapped by nothing but the class: before the script is executed,
``trl.GRPOTrainer`` is set to `ARPOTrainer`, so the script's ``from trl import GRPOTrainer`` gets ARPO's. The scripts
are read from the snapshot at run time and copied to a scratch directory (nothing of TRL's is kept in this
repository). Offline stand-ins replace what the scripts fetch from the Hub:

- ``trl/scripts/grpo.py`` (the ``trl grpo`` CLI): a local ``prompt`` dataset directory (conversational, with a
  ``solution`` column), the tiny calc model of `arpo_trl.testing`, TRL's rewards by name, LoRA; 2 steps.
- ``examples/scripts/grpo_agent.py`` (a SQL tool in TRL's chat-template format, bounded by ``signal.alarm``; rewards
  read ``tool_calls`` and the tool's list results): small synthetic ``qgallouedec/biogrid`` and
  ``qgallouedec/biogrid_qa`` directories in the working directory (``load_dataset`` reads a local directory before
  the Hub), and a tiny model SFT'd here to call ``query_biogrid`` with a ``WHERE`` query and answer ``*yes*``; 2
  steps (``--max_steps 2``).
- ``examples/scripts/grpo_2048.py`` (``environment_factory``, a random ``reset``): the script names
  ``Qwen/Qwen3-4B`` and ``report_to="trackio"`` in its code, so a ``Qwen/Qwen3-4B`` directory in the working
  directory holds a tiny model SFT'd here to call ``move``, and a local ``trackio`` module records what it is given
  instead of uploading it. The script has no step limit (1,000 prompts): the runner stops it once 2 steps are logged.
  Without a GPU its in-code `GRPOConfig` (bf16 by default, which transformers refuses on CPU) is also given the
  defaults ``use_cpu=True, bf16=False``; the report says so.

Each outcome is one of: ran (steps logged; tool calls and failures from TRL's ``tools/*`` metrics, tool results
from the completions TRL writes with ``log_completions``), refused (an error at construction, before any step, with
its message) or crashed (an error after training started, with its message). A JSON report is written beside the
logs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: chat_fixture's tool-turn tokenization
from chat_fixture import tool_suffix_ids  # noqa: E402

from arpo_trl.testing import (  # noqa: E402
    build_tiny_model,
    cache_dir,
    calc_prompt,
    chat_template_tokenizer,
    load_tokenizer,
    tool_sft,
)

SCRIPTS = {
    "grpo": "trl/scripts/grpo.py",
    "agent": "examples/scripts/grpo_agent.py",
    "2048": "examples/scripts/grpo_2048.py",
}

# The whole swap: TRL's module attribute, set before the script runs. argv: -c CODE SCRIPT ARGS...
SWAP = (
    "import runpy, sys, trl; from arpo_trl import ARPOTrainer; trl.GRPOTrainer = ARPOTrainer; "
    "script = sys.argv.pop(1); sys.argv[0] = script; runpy.run_path(script, run_name='__main__')"
)

# --trainer grpo: the script as it is, TRL's own GRPOTrainer (the baseline to compare an outcome with).
NO_SWAP = (
    "import runpy, sys; script = sys.argv.pop(1); sys.argv[0] = script; runpy.run_path(script, run_name='__main__')"
)

# Only for a script that builds its GRPOConfig in code (grpo_2048.py) and only without a GPU: GRPOConfig defaults to
# bf16, which transformers refuses on CPU under GRPOTrainer and ARPOTrainer alike. This second change is reported.
CPU_CONFIG = (
    "import trl\n"
    "class GRPOConfig(trl.GRPOConfig):\n"
    "    def __post_init__(self):\n"
    "        self.use_cpu, self.bf16 = True, False\n"
    "        super().__post_init__()\n"
    "trl.GRPOConfig = GRPOConfig\n"
)

TRACKIO_STAND_IN = '''"""Offline stand-in for trackio (its runs live on Hub Spaces): records the scalars logged to it."""
import contextvars
import json

__version__ = "0.0.0"  # below transformers' minimum for freeze(): no static Space is attempted


class _Vars:
    current_space_id = contextvars.ContextVar("space_id", default=None)
    current_project = contextvars.ContextVar("project", default=None)
    current_run = contextvars.ContextVar("run", default=None)


class _Config(dict):
    def update(self, values=(), allow_val_change=False, **kwargs):
        super().update(values, **kwargs)


context_vars = _Vars()
config = _Config()


class Table:
    def __init__(self, dataframe=None, **kwargs):
        self.rows = 0 if dataframe is None else len(dataframe)


class Image:
    def __init__(self, *args, **kwargs):
        pass


def init(**kwargs):
    context_vars.current_project.set(kwargs.get("project"))


def log(values, **kwargs):
    scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    with open("trackio_log.jsonl", "a") as f:
        f.write(json.dumps(scalars) + "\\n")


def finish():
    pass


def sync(**kwargs):
    return None


def freeze(**kwargs):
    return None
'''


# -- the snapshot ---------------------------------------------------------------------------------------------------


def read_from_snapshot(trl: Path, path: str) -> str | None:
    """The text of `path` in a TRL checkout or bare git directory (its HEAD), or None when it is not there."""
    if (trl / path).is_file():
        return (trl / path).read_text()
    git_dir = trl if (trl / "HEAD").is_file() and (trl / "objects").is_dir() else trl / ".git"
    if not git_dir.is_dir():
        raise SystemExit(f"{trl} is neither a TRL checkout nor a git directory")
    done = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def snapshot_commit(trl: Path) -> str:
    git_dir = trl if (trl / "HEAD").is_file() and (trl / "objects").is_dir() else trl / ".git"
    done = subprocess.run(
        ["git", f"--git-dir={git_dir}", "log", "-1", "--format=%H %cs"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


# -- tiny models taught to call a script's tools ---------------------------------------------------------------------


def tool_call_sft(tokenizer, example, key: str, steps: int = 150, batch_size: int = 8, lr: float = 4e-3, seed=0):
    """The tiny model after a short SFT on chat-template tool-calling traces: `example(rng)` gives (prompt messages,
    tools, pieces), a piece being ("said", text) — an assistant turn, trained — or ("tool", name, content) — a tool
    turn tokenized as TRL appends it, not trained. Cached under $ARPO_CACHE by `key` and the recipe."""
    from transformers import LlamaForCausalLM

    recipe = json.dumps(["trl-example-sft-v1", key, steps, batch_size, lr, seed, tokenizer.chat_template])
    path = cache_dir() / f"tiny-trl-example-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path)
    model = build_tiny_model(tokenizer, seed=seed)
    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    eos = [tokenizer.eos_token_id]
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(batch_size):
            prompt, tools, pieces = example(rng)
            ids = tokenizer.apply_chat_template(
                prompt, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            lab = [-100] * len(ids)
            for piece in pieces:
                if piece[0] == "said":
                    new = tokenizer.encode(piece[1], add_special_tokens=False) + eos
                    ids, lab = ids + new, lab + new
                else:
                    new = tool_suffix_ids(tokenizer, [{"role": "tool", "name": piece[1], "content": piece[2]}])
                    ids, lab = ids + new, lab + [-100] * len(new)
            rows.append(ids)
            labels.append(lab)
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
        shifted = target[:, 1:]
        keep = shifted != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), shifted[keep])
        loss.backward()
        optim.step()
        optim.zero_grad()
    print(f"  SFT {key}: final loss {loss.item():.3f}", flush=True)
    model.eval()
    model.save_pretrained(path)
    return model


def call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


# -- stand-ins per script --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare_grpo(work: Path, script: Path, device: str) -> list[str]:
    tokenizer = load_tokenizer()
    model = tool_sft(tokenizer)
    model.save_pretrained(work / "tiny")
    tokenizer.save_pretrained(work / "tiny")
    rng = random.Random(0)
    numbers = [(rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 20)) for _ in range(16)]
    _write_jsonl(work / "data" / "train.jsonl", [{"prompt": calc_prompt(*n), "solution": str(sum(n))} for n in numbers])
    return [
        "--model_name_or_path", "tiny", "--dataset_name", "data",
        "--reward_funcs", "accuracy_reward", "think_format_reward",
        "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
        "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "8",
        "--max_completion_length", "48", "--logging_steps", "1", "--report_to", "none",
        "--output_dir", "out", "--log_completions", "true",
        *device_flags(device),
    ]  # fmt: skip


GENES = ["TP53", "MDM2", "BRCA1", "BARD1", "JNKK", "MAPK8", "EGFR", "GRB2", "AKT1", "PTEN", "MYC", "MAX"]
# Selective, so its result fits the completion budget. (A result that does not fit is dropped by GRPOTrainer, whose
# completion then ends on the assistant's call; when ARPO kept it, the completion ended on the tool turn and the
# script's `correctness_reward`, which reads the last message's content as text, crashed on the list.)
AGENT_SQL = "SELECT Aliases_Interactor_B FROM interactions WHERE Aliases_Interactor_A LIKE '%TP53%'"


def prepare_agent(work: Path, script: Path, device: str) -> list[str]:
    # A small BioGRID-like table (column names with spaces, as the script expects) and yes/no questions.
    rng = random.Random(0)
    table = []
    for i in range(40):
        a, b = rng.sample(GENES, 2)
        table.append(
            {
                "ID Interactor A": f"entrez gene/locuslink:{1000 + i}",
                "ID Interactor B": f"entrez gene/locuslink:{2000 + i}",
                "Alt IDs Interactor A": f"entrez gene/locuslink:{a}(gene name synonym)",
                "Alt IDs Interactor B": f"entrez gene/locuslink:{b}(gene name synonym)",
                "Aliases Interactor A": f"entrez gene/locuslink:{a}",
                "Aliases Interactor B": f"entrez gene/locuslink:{b}",
                "Taxid Interactor A": "taxid:9606",
                "Taxid Interactor B": "taxid:9606",
                "Interaction Types": "psi-mi:MI:0915(physical association)",
            }
        )
    pairs = {(t["Aliases Interactor A"].split(":")[1], t["Aliases Interactor B"].split(":")[1]) for t in table}
    questions = []
    for _ in range(32):
        a, b = rng.sample(GENES, 2)
        answer = "Yes" if (a, b) in pairs or (b, a) in pairs else "No"
        questions.append({"question": f"Does the gene {a} interact with {b} in humans?", "answer": answer})
    _write_jsonl(work / "qgallouedec" / "biogrid" / "train.jsonl", table)
    _write_jsonl(work / "qgallouedec" / "biogrid_qa" / "train.jsonl", questions)

    namespace = runpy.run_path(str(script), run_name="trl_example")  # its functions, without running its main
    format_example, query_biogrid = namespace["format_example"], namespace["query_biogrid"]
    tokenizer = chat_template_tokenizer()
    hits = [[(t["Aliases Interactor B"],)] for t in table[:3]]

    def example(rng):
        question, hit = rng.choice(questions), rng.choice(hits)
        prompt = format_example({"question": question["question"]})["prompt"]
        return prompt, [query_biogrid], [("said", call("query_biogrid", sql_command=AGENT_SQL)),
                                         ("tool", "query_biogrid", str(hit)), ("said", "*yes*")]  # fmt: skip

    model = tool_call_sft(tokenizer, example, f"biogrid {AGENT_SQL}")
    model.save_pretrained(work / "tiny-agent")
    tokenizer.save_pretrained(work / "tiny-agent")
    return [
        "--model_name_or_path", "tiny-agent", "--output_dir", "out",
        "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "8",
        "--max_completion_length", "256", "--logging_steps", "1", "--report_to", "none",
        *device_flags(device),
    ]  # fmt: skip


def prepare_2048(work: Path, script: Path, device: str) -> list[str]:
    namespace = runpy.run_path(str(script), run_name="trl_example")
    env_class, prompt_text = namespace["Game2048Env"], namespace["PROMPT"]
    tokenizer = chat_template_tokenizer()

    def example(rng):
        random.seed(rng.random())  # the environment draws its tiles from the global RNG
        env = env_class()
        observation = env.reset()
        # TRL appends the reset observation to the last prompt message
        prompt = [{"role": "user", "content": prompt_text + observation}]
        pieces = []
        for direction in rng.sample(["left", "up", "right", "down"], rng.randint(1, 2)):
            pieces += [("said", call("move", direction=direction)), ("tool", "move", env.move(direction))]
        return prompt, [env.move], pieces + [("said", "Done.")]

    model = tool_call_sft(tokenizer, example, "2048")
    target = work / "Qwen" / "Qwen3-4B"  # the name the script hard-codes, resolved as a local directory first
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (work / "trackio").mkdir()
    (work / "trackio" / "__init__.py").write_text(TRACKIO_STAND_IN)
    return []  # the script takes no arguments


def device_flags(device: str) -> list[str]:
    return ["--use_cpu", "true", "--bf16", "false"] if device == "cpu" else []


PREPARE = {"grpo": prepare_grpo, "agent": prepare_agent, "2048": prepare_2048}


# -- running and reading the outcome -------------------------------------------------------------------------------


def parse_logs(text: str) -> list[dict]:
    """The training-log dicts transformers prints (one per logging step)."""
    logs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and ("'loss'" in line or "'reward'" in line):
            try:
                entry = ast.literal_eval(line)
            except (ValueError, SyntaxError):
                continue
            logs.append({k: _number(v) for k, v in entry.items()})
    return logs


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def last_error(stderr: str) -> str | None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback"):
            tail = [line for line in lines[i:] if not line.startswith(" ")]
            return tail[-1] if tail else lines[-1]
    return None


def tool_results(work: Path) -> list[str]:
    """The tool messages of the completions TRL wrote with `log_completions` (output_dir/completions/*.parquet)."""
    import pandas as pd

    results = []
    for path in sorted(Path(work).rglob("completions_*.parquet")):
        try:
            completions = pd.read_parquet(path)["completion"]
        except Exception:  # a file cut short when the runner stopped the script
            continue
        for completion in completions:
            for message in completion if not isinstance(completion, str) else []:
                if message.get("role") == "tool":
                    results.append(str(message.get("content")))
    return results


def run_script(
    name: str,
    work: Path,
    script: Path,
    args: list[str],
    timeout: float,
    stop_after: int | None,
    cpu_config: bool,
    swap: bool = True,
) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ""}
    argv = [sys.executable, "-c", (CPU_CONFIG if cpu_config else "") + (SWAP if swap else NO_SWAP), str(script), *args]
    start = time.monotonic()
    out_path, err_path = work / "stdout.log", work / "stderr.log"
    stopped = False
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=err, start_new_session=True)
        while proc.poll() is None:
            time.sleep(2)
            if stop_after is not None and len(parse_logs(out_path.read_text())) >= stop_after:
                os.killpg(proc.pid, signal.SIGTERM)
                stopped = True
            elif time.monotonic() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stdout, stderr = out_path.read_text(), err_path.read_text()
    logs = [e for e in parse_logs(stdout) if "loss" in e]
    report = {
        "script": SCRIPTS[name],
        "trainer": "ARPOTrainer" if swap else "GRPOTrainer",
        "seconds": round(time.monotonic() - start, 1),
        "steps_logged": len(logs),
    }
    if cpu_config:
        report["note"] = "no GPU: GRPOConfig defaulted to use_cpu=True, bf16=False (the script's config is in code)"
    error = last_error(stderr)
    if proc.returncode == 0 or (stopped and logs):
        report["outcome"] = "ran" + (f" (stopped by the runner after {len(logs)} logged steps)" if stopped else "")
    elif not logs and error:
        at_construction = re.search(
            r"arpo_trl/(trainer|config)\.py\", line \d+, in (__init__|__post_init__|_validate)", stderr
        )
        report["outcome"] = "refused at construction" if at_construction else "crashed before the first step"
        report["message"] = error
    else:
        report["outcome"] = f"crashed (exit {proc.returncode})"
        report["message"] = error or stderr[-500:]
    keys = ("reward", "tools/call_frequency", "tools/failure_frequency", "tools/errors", "arpo/branches_per_group")
    report["logged"] = [{k: v for k, v in e.items() if k in keys or re.fullmatch(r"rewards/.*/mean", k)} for e in logs]
    results = tool_results(work)
    if results:
        errors = [r for r in results if re.search(r"error|exception|timed out|only works in main thread", r, re.I)]
        report["tool_results"] = {"count": len(results), "errors": len(errors), "first": results[0][:200]}
        if errors:
            report["tool_results"]["first_error"] = errors[0][:300]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl", required=True, type=Path, help="a TRL checkout or bare git directory")
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per script")
    parser.add_argument(
        "--trainer", choices=("arpo", "grpo"), default="arpo", help="grpo: run the scripts unswapped (a baseline)"
    )
    parser.add_argument("--report", type=Path, default=None, help="JSON report (default: WORKDIR/report.json)")
    opts = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="arpo-trl-examples-"))
    print(f"TRL snapshot {opts.trl} at {snapshot_commit(opts.trl)}; work in {workdir}", flush=True)
    reports = []
    for name in opts.scripts:
        text = read_from_snapshot(opts.trl, SCRIPTS[name])
        if text is None:
            reports.append({"script": SCRIPTS[name], "outcome": "missing from the snapshot"})
            print(f"{SCRIPTS[name]}: missing from the snapshot", flush=True)
            continue
        work = workdir / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        script = work / Path(SCRIPTS[name]).name
        script.write_text(text)
        print(f"{SCRIPTS[name]}: preparing stand-ins", flush=True)
        args = PREPARE[name](work, script, opts.device)
        print(f"{SCRIPTS[name]}: running" + (" with the class swapped" if opts.trainer == "arpo" else ""), flush=True)
        in_code = name == "2048"  # the script sets its config in code and takes no arguments
        stop_after = 2 if in_code else None
        cpu_config = in_code and opts.device == "cpu"
        report = run_script(name, work, script, args, opts.timeout, stop_after, cpu_config, opts.trainer == "arpo")
        reports.append(report)
        print(json.dumps(report, indent=1), flush=True)
    path = opts.report or workdir / "report.json"
    path.write_text(json.dumps({"trl": str(opts.trl), "commit": snapshot_commit(opts.trl), "runs": reports}, indent=1))
    print(f"report: {path}")
    for r in reports:
        print(f"- {r['script']}: {r['outcome']}" + (f" — {r['message']}" if r.get("message") else ""))


if __name__ == "__main__":
    main()
