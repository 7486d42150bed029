"""ARPO training entry point, the TRL way (also the console script ``arpo-train``).

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m arpo_trl.train \\
        --config recipes/arpo_qwen2.5_7b_reasoning.yaml --learning_rate 2e-6

A YAML ``--config`` sets the defaults of three dataclasses — `ARPOScriptArguments` (data, tools, rewards),
`ARPOConfig` (training and ARPO) and TRL's `ModelConfig` (model, dtype, ``--use_peft --lora_r ...``) — and
command-line flags override it. An ``env:`` mapping in the YAML is exported to the environment.

What ``trl grpo`` accepts is accepted here too: datasets with a ``prompt`` column (standard or conversational),
used unchanged with every column passed to the reward functions under its own name; ``--dataset_config``,
``--dataset_train_split`` and ``--dataset_test_split`` (the eval split, used when ``--eval_strategy`` is not
``no``); TRL's reward functions by name (``accuracy_reward``, ``think_format_reward``, ...) and
``--reward_model_name_or_path``; dotted paths to the user's own rewards and tools, imported from the current
directory as TRL's script does. Beside those: question/answer files, the official RL parquet files, and a separate
eval file (``--eval_dataset_name``, e.g. the official ``valid.parquet``).

The model is loaded the way TRL's own ``trl/scripts/grpo.py`` loads it: ``model_revision``, ``attn_implementation``,
``dtype`` and ``trust_remote_code`` become ``model_init_kwargs`` and the quantization flags (``load_in_4bit``,
``load_in_8bit``, ``bnb_4bit_quant_type``, ``use_bnb_nested_quant``, ``bnb_4bit_quant_storage``) a
``BitsAndBytesConfig`` (TRL's `get_quantization_config`), both handed to the trainer, which creates the model.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from .config import ARPOConfig
from .data import (
    is_official_rl,
    is_prompt_dataset,
    load_questions,
    official_rl_to_conversational,
    prompt_dataset,
    to_conversational,
)
from .models import load_tokenizer, quantization_config, resolve_model_path
from .prompts import resolve_system_prompt
from .rewards import get_reward_function
from .trainer import ARPOTrainer

logger = logging.getLogger(__name__)


@dataclass
class ARPOScriptArguments:
    """Data, tools and rewards of an ARPO run."""

    dataset_name: str = field(
        default="reasoning_gym:basic_arithmetic",
        metadata={
            "help": "reasoning_gym:<task>, a .jsonl/.json/.parquet file, a saved dataset directory, a directory of "
            "data files, or a dataset name. A 'prompt' column (TRL's layout) is used as it is; else question/answer "
            "columns, or the official RL layout."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration of a named dataset (load_dataset's name), as in trl grpo."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (named datasets)."})
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "Split to evaluate on, as in trl grpo: read from eval_dataset_name, else from dataset_name when "
            "eval_strategy is not 'no' (and eval_size is 0)."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A separate eval dataset, in any form dataset_name takes (e.g. the official valid.parquet); "
            "all its rows are used."
        },
    )
    dataset_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows to use, drawn with dataset_seed. Unset (the default): the whole dataset (reasoning_gym, "
            "which has no natural size, then generates 1000)."
        },
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the generated or sampled rows."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the gold answer(s)."})
    eval_size: int = field(
        default=0,
        metadata={"help": "Rows of dataset_name held out for evaluation (0: none; not with eval_dataset_name)."},
    )
    tools: list[str] = field(
        default_factory=lambda: ["python"],
        metadata={"help": "Tools: python (sandboxed), search (BM25 over search_corpus), or dotted paths to callables."},
    )
    search_corpus: str | None = field(
        default=None, metadata={"help": "JSONL corpus (title/text) for the search tool; 'wiki' for the demo corpus."}
    )
    search_cache: str | None = field(
        default=None,
        metadata={
            "help": "An official search-cache JSON file (query -> formatted result, e.g. the released "
            "search_cache/search_cache.json): the search tool becomes WebSearch replaying it offline (a query "
            "missing from it gets an error result), or calling search_endpoint and adding to it when that is set."
        },
    )
    search_endpoint: str | None = field(
        default=None, metadata={"help": "HTTP search API for WebSearch (with search_cache; key in $SEARCH_API_KEY)."}
    )
    python_timeout: float = field(
        default=10.0, metadata={"help": "Wall-clock seconds per Python tool run (the official code: 120)."}
    )
    python_max_output_chars: int | None = field(
        default=4000,
        metadata={
            "help": "Longest Python output returned to the model. Unset (null): no cap beyond the sandbox's "
            "output file limit, as the official code."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["arpo_f1"],
        metadata={
            "help": "Rewards: arpo_f1, math_exact, TRL's (accuracy_reward, reasoning_accuracy_reward, "
            "think_format_reward, get_soft_overlong_punishment), or dotted paths (imported from the current "
            "directory too)."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A reward model (Hub id or local directory), put before reward_funcs."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System prompt: a name (official: the official ARPO prompt; official_search, official_math; "
            "tags: our tag-format instructions for the chosen tools) or the text itself. Default: the data's own "
            "prompts for 'prompt' datasets (TRL's layout and the official RL parquet files), else tags. Given "
            "with a 'prompt' dataset, it replaces the system message of conversational prompts."
        },
    )
    repair_boxed: bool = field(
        default=True,
        metadata={"help": "Repair the official data's \\x08oxed (a backspace) into \\boxed in prompts."},
    )


def build_tools(script_args: ARPOScriptArguments) -> list:
    from .tools import LocalSearch, PythonInterpreter, WebSearch, build_wiki_corpus

    tools = []
    for name in script_args.tools:
        if name == "python":
            # The tool's own limits (None: no output cap of ours, the official tool's); the executor applies them
            # to it instead of tool_timeout / max_tool_response_chars.
            python = PythonInterpreter(
                timeout=script_args.python_timeout, max_output_chars=script_args.python_max_output_chars
            )
            tools.append(python)
        elif name == "search" and (script_args.search_cache or script_args.search_endpoint):
            tools.append(
                WebSearch(
                    endpoint=script_args.search_endpoint,
                    cache_file=script_args.search_cache,
                    api_key_env="SEARCH_API_KEY" if script_args.search_endpoint else None,
                )
            )
        elif name == "search":
            corpus = script_args.search_corpus
            if corpus in (None, "wiki"):
                from .models import cache_dir

                corpus = str(build_wiki_corpus(cache_dir() / "corpora" / "wiki.jsonl"))
            tools.append(LocalSearch(corpus))
        elif "." in name:
            import importlib

            module, _, attr = name.rpartition(".")
            tools.append(getattr(importlib.import_module(module), attr))
        else:
            raise ValueError(f"unknown tool {name!r}: use python, search or a dotted path to a callable")
    return tools


def model_init_kwargs(model_args: ModelConfig, training_args: ARPOConfig) -> dict:
    """The ``from_pretrained`` keyword arguments TRL's ``scripts/grpo.py`` builds from the flags; the recipe's
    own ``model_init_kwargs`` win, as there."""
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def _single_split(spec: str) -> bool:
    """Whether `spec` is a source with one split only: a file or a generated reasoning-gym task."""
    return spec.startswith("reasoning_gym:") or spec.endswith((".jsonl", ".json", ".parquet"))


def prepare_dataset(rows, script_args: ARPOScriptArguments):
    """Loaded rows as training prompts: a TRL prompt dataset as it is (a system prompt only when asked for), the
    official RL layout with its own messages, question/answer rows with the system prompt."""
    tool_names = list(script_args.tools)
    if is_official_rl(rows):
        override = script_args.system_prompt
        system = None if override is None else resolve_system_prompt(override, tool_names)
        return official_rl_to_conversational(rows, system, script_args.repair_boxed)
    if is_prompt_dataset(rows):
        override = script_args.system_prompt
        return prompt_dataset(rows, None if override is None else resolve_system_prompt(override, tool_names))
    system = resolve_system_prompt(script_args.system_prompt, tool_names)
    return to_conversational(rows, system, script_args.question_column, script_args.answer_column)


def build_dataset(script_args: ARPOScriptArguments):
    """The training prompts (`prepare_dataset` of `dataset_name`'s `dataset_train_split`)."""
    rows = load_questions(
        script_args.dataset_name,
        script_args.dataset_size,
        script_args.dataset_seed,
        split=script_args.dataset_train_split,
        config=script_args.dataset_config,
    )
    return prepare_dataset(rows, script_args)


def build_datasets(script_args: ARPOScriptArguments, training_args: ARPOConfig):
    """(train, eval) datasets. Eval comes from `eval_dataset_name`, else `eval_size` held-out rows, else — as in
    ``trl grpo`` — `dataset_test_split` of `dataset_name` when `eval_strategy` is not ``no``; else there is none.
    Contradictory or impossible choices fail here, before the model is loaded."""
    evaluating = training_args.eval_strategy != "no"  # an IntervalStrategy, a str enum
    if script_args.eval_dataset_name and script_args.eval_size:
        raise ValueError(
            f"eval_dataset_name ({script_args.eval_dataset_name}) and eval_size ({script_args.eval_size}) both "
            "choose the eval rows: set one of them"
        )
    needs_test_split = evaluating and not script_args.eval_dataset_name and not script_args.eval_size
    if needs_test_split and _single_split(script_args.dataset_name):
        raise ValueError(
            f"eval_strategy={training_args.eval_strategy.value} needs eval rows, and {script_args.dataset_name} has no "
            f"{script_args.dataset_test_split!r} split: set eval_dataset_name (a file or dataset) or eval_size "
            "(rows held out)"
        )
    dataset = build_dataset(script_args)
    eval_dataset = None
    if script_args.eval_dataset_name:
        if not evaluating:
            logger.warning("eval_dataset_name is set but eval_strategy is 'no': it is only used by evaluate()")
        eval_rows = load_questions(
            script_args.eval_dataset_name, split=script_args.dataset_test_split, config=script_args.dataset_config
        )
        eval_dataset = prepare_dataset(eval_rows, script_args)
    elif script_args.eval_size:
        split = dataset.train_test_split(test_size=script_args.eval_size, seed=script_args.dataset_seed)
        dataset, eval_dataset = split["train"], split["test"]
    elif needs_test_split:
        eval_rows = load_questions(
            script_args.dataset_name, split=script_args.dataset_test_split, config=script_args.dataset_config
        )
        eval_dataset = prepare_dataset(eval_rows, script_args)
    return dataset, eval_dataset


def build_reward_funcs(script_args: ARPOScriptArguments) -> list:
    """The reward model (if any) first, then the named reward functions, as ``trl grpo`` orders them."""
    rewards: list = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    return rewards + [get_reward_function(name) for name in script_args.reward_funcs]


def build_trainer(script_args: ARPOScriptArguments, training_args: ARPOConfig, model_args: ModelConfig) -> ARPOTrainer:
    path = resolve_model_path(model_args.model_name_or_path)
    quantization = quantization_config(model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    reward_funcs = build_reward_funcs(script_args)
    tools = build_tools(script_args)
    dataset, eval_dataset = build_datasets(script_args, training_args)
    tokenizer = load_tokenizer(path, model_args.model_revision)
    return ARPOTrainer(
        model=path,  # created by the trainer from model_init_kwargs, as TRL's scripts do
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=quantization,
        peft_config=get_peft_config(model_args),
        tools=tools,
    )


def main(argv: list[str] | None = None) -> ARPOTrainer:
    parser = TrlParser((ARPOScriptArguments, ARPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv if argv is not None else sys.argv[1:])
    # Dotted paths to the user's rewards and tools import from the current directory, as under `trl grpo` (the
    # console script's sys.path starts at its own bin directory, not here).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Finish the trackers and destroy the process group: exiting with live communicator threads can abort a rank.
    trainer.end()
    return trainer


def cli() -> None:
    """Console-script entry point: `main` returns the trainer, which as an exit status would read as a failure."""
    main()


if __name__ == "__main__":
    main()
