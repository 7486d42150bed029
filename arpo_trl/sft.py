"""The cold-start SFT stage before ARPO, the TRL way: ``python -m arpo_trl.sft --config recipes/cold_start_sft.yaml``.

TRL's `SFTTrainer` on the official cold-start traces (LLaMA-Factory's ShareGPT layout, read by
`arpo_trl.data.load_sharegpt`), or on any dataset TRL's own ``trl/scripts/sft.py`` reads. A YAML ``--config``
sets the defaults of `SFTScriptArguments`, TRL's `SFTConfig` and `ModelConfig`; flags override it. The model is
loaded from the same `ModelConfig` flags as `arpo-train` (revision, attention, dtype, quantization).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from datasets import load_dataset
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from .data import load_sharegpt, sharegpt_to_messages
from .models import load_tokenizer, quantization_config, resolve_model_path


@dataclass
class SFTScriptArguments:
    """The cold-start data."""

    dataset_name: str = field(
        metadata={
            "help": "A ShareGPT file (.json/.jsonl with conversations/system, e.g. final_5w4_still.jsonl), or a "
            "dataset name or directory (ShareGPT rows are converted, TRL messages/prompt-completion rows kept)."
        }
    )
    dataset_size: int | None = field(
        default=None, metadata={"help": "Rows to use, drawn with dataset_seed. Unset: the whole dataset."}
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the sampled rows."})
    repair_boxed: bool = field(default=True, metadata={"help": "Repair \\x08oxed into \\boxed in the traces."})


def load_sft_dataset(script_args: SFTScriptArguments):
    name = script_args.dataset_name
    if name.endswith((".json", ".jsonl")):
        return load_sharegpt(name, script_args.dataset_size, script_args.dataset_seed, script_args.repair_boxed)
    dataset = load_dataset(name, split="train")
    if "conversations" in dataset.column_names:
        dataset = dataset.map(
            lambda row: {"messages": sharegpt_to_messages(row, script_args.repair_boxed)},
            remove_columns=dataset.column_names,
        )
    if script_args.dataset_size is not None and script_args.dataset_size < len(dataset):
        dataset = dataset.shuffle(seed=script_args.dataset_seed).select(range(script_args.dataset_size))
    return dataset


def build_sft_trainer(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> SFTTrainer:
    path = resolve_model_path(model_args.model_name_or_path)
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    quantization = quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    training_args.model_init_kwargs = {**kwargs, **(training_args.model_init_kwargs or {})}
    return SFTTrainer(
        model=path,
        args=training_args,
        train_dataset=load_sft_dataset(script_args),
        processing_class=load_tokenizer(path, model_args.model_revision),
        peft_config=get_peft_config(model_args),
    )


def main(argv: list[str] | None = None) -> SFTTrainer:
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv if argv is not None else sys.argv[1:])
    trainer = build_sft_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def cli() -> None:
    """Console-script entry point: `main` returns the trainer, which as an exit status would read as a failure."""
    main()


if __name__ == "__main__":
    main()
