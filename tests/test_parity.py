"""Numerical parity with TRL: given the same completions, `ARPOTrainer` computes GRPO's loss and gradients.

Both trainers get the same fixed completions (teacher-forced: GRPOTrainer's single-turn generation and ARPO's
generation seam are replaced by the same table of completions), the same model copy and the same data, and take
one SGD step, so the parameter change is the learning rate times the gradient. With N = M and α = β = 0 (no tree)
ARPO's soft attribution is GRPO; under hard attribution, a group whose rows share no prefix token gives every token
its row's own advantage, so it is GRPO too.
"""

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.rollout.round_driver import Segment
from arpo_trl.testing import build_tiny_model, calc, calc_dataset

M = 4
# Completions of one group: distinct first tokens (no shared prefix), different lengths and rewards.
TEXTS = [
    "<calc>1+2</calc> The answer is \\boxed{3}.",
    "Maybe \\boxed{4}.",
    "The sum is 17, so \\boxed{17}.",
    "I think it is \\boxed{2} or more",
]


def table(tokenizer):
    return [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in TEXTS]


def reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t) % 5) - 1.0 for t in texts]


class FixedGRPO(GRPOTrainer):
    """GRPOTrainer whose sampler returns the table (one completion per row, in row order)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rows = table(self.processing_class)
        return [list(rows[i % M]) for i in range(len(prompt_ids))], None


class FixedGenerator:
    """ARPO's generation seam returning the same table for the roots' first (and only) segment."""

    def __init__(self, tokenizer):
        self.rows = table(tokenizer)
        self.calls = 0

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        self.calls += 1
        assert self.calls == 1 and len(prefixes) == 2 * M  # every row starts at once (N = M), then all are done
        return [Segment(list(self.rows[i % M]), [1.0] * len(self.rows[i % M]), "eos") for i in range(len(prefixes))]


def settings(tmp_path, name):
    return dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=2 * M,
        num_generations=M,
        max_completion_length=32,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",  # Δθ = −lr · ∇: equal updates mean equal gradients
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
    )


@pytest.mark.parametrize("attribution", ["soft", "hard"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_same_completions_give_grpos_loss_and_gradients(tool_model_state, tokenizer, tmp_path, attribution, loss_type):
    results = {}
    for name in ("grpo", "arpo"):
        model = build_tiny_model(tokenizer)
        model.load_state_dict(tool_model_state)
        before = {k: v.clone() for k, v in model.named_parameters()}
        common = dict(model=model, reward_funcs=[reward], train_dataset=calc_dataset(16), processing_class=tokenizer)
        if name == "grpo":
            trainer = FixedGRPO(args=GRPOConfig(**settings(tmp_path, name), loss_type=loss_type), **common)
        else:
            args = ARPOConfig(
                **settings(tmp_path, name),
                loss_type=loss_type,
                initial_rollouts=M,
                branch_base_probability=0.0,
                branch_entropy_weight=0.0,
                advantage_attribution=attribution,
            )
            trainer = ARPOTrainer(args=args, tools=[calc], **common)  # tools present, never called
            trainer.rollout_backend.generator = FixedGenerator(tokenizer)
        trainer.train()
        delta = {k: before[k] - v.detach() for k, v in trainer.model.named_parameters()}
        results[name] = ([e for e in trainer.state.log_history if "loss" in e][0], delta)
    (g_log, g_delta), (a_log, a_delta) = results["grpo"], results["arpo"]
    assert a_log["loss"] == pytest.approx(g_log["loss"], rel=1e-6, abs=1e-8)
    assert a_log["reward_std"] == pytest.approx(g_log["reward_std"]) and g_log["reward_std"] > 0
    assert any(d.abs().max() > 0 for d in g_delta.values())  # the step really moved the model
    # ARPO's shared-prefix forward computes the prompt once for the group and sums the same gradient terms in
    # another order: equal up to float32 rounding, i.e. relative to the size of the step (not element-wise, where a
    # near-zero gradient's rounding is all of it).
    scale = max(d.abs().max().item() for d in g_delta.values())
    for key, want in g_delta.items():
        torch.testing.assert_close(a_delta[key], want, rtol=1e-5, atol=1e-5 * scale)
