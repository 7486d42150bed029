"""ARPO training entry point, the TRL way (also the console script ``arpo-train``).

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m arpo_trl.train \\
        --config recipes/arpo_qwen2.5_7b_reasoning.yaml --learning_rate 2e-6

A YAML ``--config`` sets the defaults of three dataclasses — `ARPOScriptArguments` (data, tools, rewards),
`ARPOConfig` (training and ARPO) and TRL's `ModelConfig` (model, dtype, ``--use_peft --lora_r ...``) — and
command-line flags override it. An ``env:`` mapping in the YAML is exported to the environment.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM
from trl import ModelConfig, TrlParser, get_peft_config

from .config import ARPOConfig
from .data import load_questions, tag_system_prompt, to_conversational
from .models import load_tokenizer, resolve_model_path
from .rewards import get_reward_function
from .trainer import ARPOTrainer

logger = logging.getLogger(__name__)


@dataclass
class ARPOScriptArguments:
    """Data, tools and rewards of an ARPO run."""

    dataset_name: str = field(
        default="reasoning_gym:basic_arithmetic",
        metadata={"help": "reasoning_gym:<task>, a .jsonl file, a saved dataset directory, or a dataset name."},
    )
    dataset_size: int | None = field(default=512, metadata={"help": "Rows to use (generated ones for reasoning_gym)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the generated or sampled rows."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the gold answer(s)."})
    eval_size: int = field(default=0, metadata={"help": "Rows held out for evaluation (0: none)."})
    tools: list[str] = field(
        default_factory=lambda: ["python"],
        metadata={"help": "Tools: python (sandboxed), search (BM25 over search_corpus), or dotted paths to callables."},
    )
    search_corpus: str | None = field(
        default=None, metadata={"help": "JSONL corpus (title/text) for the search tool; 'wiki' for the demo corpus."}
    )
    python_timeout: float = field(default=10.0, metadata={"help": "Wall-clock seconds per Python tool run."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["arpo_f1"], metadata={"help": "Rewards: arpo_f1, math_exact, or dotted paths."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt; default: the tag-format instructions for the chosen tools."}
    )


def build_tools(script_args: ARPOScriptArguments) -> list:
    from .tools import LocalSearch, PythonInterpreter, build_wiki_corpus

    tools = []
    for name in script_args.tools:
        if name == "python":
            tools.append(PythonInterpreter(timeout=script_args.python_timeout))
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


def build_trainer(script_args: ARPOScriptArguments, training_args: ARPOConfig, model_args: ModelConfig) -> ARPOTrainer:
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    tokenizer = load_tokenizer(path)
    tool_names = list(script_args.tools)
    system_prompt = script_args.system_prompt or tag_system_prompt(tool_names)
    questions = load_questions(script_args.dataset_name, script_args.dataset_size, script_args.dataset_seed)
    dataset = to_conversational(questions, system_prompt, script_args.question_column, script_args.answer_column)
    eval_dataset = None
    if script_args.eval_size:
        split = dataset.train_test_split(test_size=script_args.eval_size, seed=script_args.dataset_seed)
        dataset, eval_dataset = split["train"], split["test"]
    return ARPOTrainer(
        model=model,
        reward_funcs=[get_reward_function(name) for name in script_args.reward_funcs],
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        tools=build_tools(script_args),
    )


def main(argv: list[str] | None = None) -> ARPOTrainer:
    parser = TrlParser((ARPOScriptArguments, ARPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv if argv is not None else sys.argv[1:])
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Finish the trackers and destroy the process group: exiting with live communicator threads can abort a rank.
    trainer.end()
    return trainer


if __name__ == "__main__":
    main()
