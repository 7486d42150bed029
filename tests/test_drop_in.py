"""The drop-in promise: a script written for TRL's `GRPOTrainer` runs with `ARPOTrainer` swapped in.

The configurations mirror those TRL's own `tests/test_grpo_trainer.py` exercises (prompt types, reward kinds,
losses, iterations, masks, evaluation, tools, environments). Without tools ARPO has nothing to branch on, so with
N = M (the default then) it must sample exactly what `GRPOTrainer` samples: the tests run both on the same model,
data and seed and assert equal completions, equal reward-function inputs, equal losses and a superset of TRL's
metrics.
"""

import json

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.rollout.round_driver import Segment
from arpo_trl.testing import build_tiny_model, calc, calc_dataset, chat_template_tokenizer

M = 4


def grpo_args(tmp_path, name, **overrides):
    return GRPOConfig(**settings(tmp_path, name, **overrides))


def arpo_args(tmp_path, name, **overrides):
    return ARPOConfig(**settings(tmp_path, name, **overrides))


def settings(tmp_path, name, **overrides):
    values = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=8,
        num_generations=M,
        max_completion_length=24,
        max_steps=2,
        learning_rate=1e-2,
        # Δθ = −lr·∇: equal updates mean equal gradients. ARPO's shared-prefix forward sums the same terms in
        # another order; Adam would turn those float-rounding differences of near-zero gradients (|g| ~ its eps)
        # into steps of a fair fraction of lr, which no gradient comparison should read as a difference.
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
    )
    values.update(overrides)
    return values


def standard_prompts(dataset, tokenizer):
    """The same rows as plain text prompts (TRL's "standard_prompt_only" layout)."""
    return dataset.map(
        lambda row: {"prompt": tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)}
    )


class Recorder:
    """A string/conversational reward function that keeps what it received (TRL's reward signature)."""

    def __init__(self, name="length_reward"):
        self.__name__ = name
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append({"prompts": prompts, "completions": completions, "ids": completion_ids, "kwargs": kwargs})
        texts = [c if isinstance(c, str) else "".join(m["content"] or "" for m in c) for c in completions]
        return [float(len(t) % 7) for t in texts]  # differs within groups: advantages are not all zero


def reward_model(tokenizer, seed=1):
    """A tiny sequence classifier with the same tokenizer (TRL's tests use tiny-Qwen2ForSequenceClassification)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config)


def run_both(tool_model_state, tokenizer, tmp_path, dataset, make_rewards, **config):
    """Train GRPOTrainer and ARPOTrainer on the same model copy, data and seed; return both trainers and rewards."""
    out = {}
    for cls in (GRPOTrainer, ARPOTrainer):
        model = build_tiny_model(tokenizer)
        model.load_state_dict(tool_model_state)
        if config.get("beta"):  # TRL loads the reference model from the model's path
            model.save_pretrained(tmp_path / "model")
            model = str(tmp_path / "model")
        rewards = make_rewards()
        trainer = cls(
            model=model,
            reward_funcs=[r for r, _ in rewards],
            reward_processing_classes=[p for _, p in rewards] if any(p for _, p in rewards) else None,
            args=grpo_args(tmp_path, cls.__name__, **config),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        if cls is ARPOTrainer and config.get("per_device_train_batch_size", 8) < 8:
            # Micro-batches smaller than the generation batch: the shared-prefix forward's shuffle keeps groups
            # whole, so each micro-batch holds other rows than GRPOTrainer's row shuffle gives it (same RNG draw,
            # same gradient summed over a generation batch, other per-micro-batch figures). Exact comparison
            # with GRPO uses TRL's row shuffle; tests/test_shared_prefix.py covers the grouped micro-batches.
            trainer.args.shared_prefix_forward = False
        trainer.train()
        out[cls] = (trainer, [r for r, _ in rewards])
    return out[GRPOTrainer], out[ARPOTrainer]


def assert_same_training(grpo, arpo):
    (g, g_rewards), (a, a_rewards) = grpo, arpo
    assert isinstance(a.args, ARPOConfig) and a.initial_rollouts == M  # no tools: N = M, one generation round
    for g_reward, a_reward in zip(g_rewards, a_rewards):
        if not isinstance(g_reward, Recorder):
            continue
        assert len(g_reward.calls) == len(a_reward.calls) > 0
        for got, want in zip(a_reward.calls, g_reward.calls):
            assert got["completions"] == want["completions"]  # same type, same text, same messages
            assert got["ids"] == want["ids"]
            assert got["prompts"] == want["prompts"]
            assert got["kwargs"].keys() == want["kwargs"].keys()
    g_logs = [e for e in g.state.log_history if "loss" in e]
    a_logs = [e for e in a.state.log_history if "loss" in e]
    assert len(g_logs) == len(a_logs) > 0
    for want, got in zip(g_logs, a_logs):
        missing = set(want) - set(got) - {"step_time"}
        assert not missing, f"TRL metrics missing from ARPOTrainer's logs: {sorted(missing)}"
        for key in ("loss", "reward", "reward_std", "grad_norm", "completions/mean_length", "entropy"):
            if key not in want:  # e.g. a step that reuses the generation batch (num_iterations > 1)
                continue
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for name, param in g.model.named_parameters():
        torch.testing.assert_close(a.model.get_parameter(name), param, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prompt_type", ["conversational", "standard"])
def test_no_tools_samples_and_trains_exactly_like_grpo(tool_model_state, tokenizer, tmp_path, prompt_type):
    dataset = calc_dataset(32)
    if prompt_type == "standard":
        dataset = standard_prompts(dataset, tokenizer)
    grpo, arpo = run_both(tool_model_state, tokenizer, tmp_path, dataset, lambda: [(Recorder(), None)])
    assert_same_training(grpo, arpo)
    completions = arpo[1][0].calls[0]["completions"]
    if prompt_type == "standard":
        assert all(isinstance(c, str) for c in completions)
    else:
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type="dapo", gradient_accumulation_steps=2, per_device_train_batch_size=4),
        dict(loss_type="dr_grpo"),
        dict(loss_type="bnpo", scale_rewards="batch"),
        dict(loss_type="cispo"),
        dict(loss_type="sapo"),
        dict(num_iterations=2),
        dict(steps_per_generation=2, per_device_train_batch_size=4),
        dict(importance_sampling_level="sequence"),
        dict(mask_truncated_completions=True),
        dict(top_entropy_quantile=0.5),
        dict(beta=0.1),
        dict(scale_rewards="none", temperature=0.7),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_grpo_settings_without_tools_match_grpo(tool_model_state, tokenizer, tmp_path, config):
    grpo, arpo = run_both(
        tool_model_state, tokenizer, tmp_path, calc_dataset(32), lambda: [(Recorder(), None)], **config
    )
    assert_same_training(grpo, arpo)


def test_reward_model_with_processing_class_and_string_rewards(tool_model_state, tokenizer, tmp_path):
    """TRL's most common test: a reward *model* (sequence classifier) plus a string reward function, standard
    prompts, two weighted rewards. The reward model crashed on message-list completions before."""
    dataset = standard_prompts(calc_dataset(32), tokenizer)
    grpo, arpo = run_both(
        tool_model_state,
        tokenizer,
        tmp_path,
        dataset,
        lambda: [(reward_model(tokenizer), tokenizer), (Recorder(), None)],
        reward_weights=[1.0, 0.5],
    )
    assert_same_training(grpo, arpo)
    g_logs = [e for e in grpo[0].state.log_history if "loss" in e]
    a_logs = [e for e in arpo[0].state.log_history if "loss" in e]
    model_key = [k for k in g_logs[0] if k.startswith("rewards/") and "length_reward" not in k and k.endswith("/mean")]
    assert len(model_key) == 1
    model_key = model_key[0]
    for want, got in zip(g_logs, a_logs):
        assert got[model_key] == pytest.approx(want[model_key], rel=1e-5)
        assert want[model_key] != 0.0  # the model really scored the completions


def test_evaluation_matches_grpo(tool_model_state, tokenizer, tmp_path):
    """eval_strategy with an eval_dataset (and eval before training): the same eval metrics as GRPOTrainer."""
    results = {}
    for cls in (GRPOTrainer, ARPOTrainer):
        model = build_tiny_model(tokenizer)
        model.load_state_dict(tool_model_state)
        args = grpo_args(
            tmp_path,
            f"eval-{cls.__name__}",
            per_device_eval_batch_size=4,
            num_generations_eval=2,
            eval_strategy="steps",
            eval_steps=1,
            eval_on_start=True,
        )
        trainer = cls(
            model=model,
            reward_funcs=[Recorder()],
            args=args,
            train_dataset=calc_dataset(16),
            eval_dataset=calc_dataset(8, seed=1),
            processing_class=tokenizer,
        )
        trainer.train()
        results[cls] = [e for e in trainer.state.log_history if "eval_reward" in e]
    want, got = results[GRPOTrainer], results[ARPOTrainer]
    assert len(got) == len(want) == 3  # on start, after step 1, after step 2
    for w, g in zip(want, got):
        assert set(w) - set(g) - {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"} == set()
        assert g["eval_reward"] == pytest.approx(w["eval_reward"], rel=1e-5)
        assert g["eval_completions/mean_length"] == pytest.approx(w["eval_completions/mean_length"])


def test_n_defaults_to_m_without_tools_and_to_half_with_tools(tool_model, tokenizer, tmp_path):
    common = dict(
        model=tool_model, reward_funcs=[Recorder()], train_dataset=calc_dataset(8), processing_class=tokenizer
    )
    with pytest.warns(UserWarning, match="no tools"):
        no_tools = ARPOTrainer(args=grpo_args(tmp_path, "a"), **common)
    assert no_tools.initial_rollouts == M and no_tools.args.initial_rollouts is None
    with_tools = {**common, "processing_class": chat_template_tokenizer()}
    assert ARPOTrainer(args=grpo_args(tmp_path, "b"), tools=[calc], **with_tools).initial_rollouts == M // 2
    explicit = arpo_args(tmp_path, "c", initial_rollouts=1)
    assert ARPOTrainer(args=explicit, **common).initial_rollouts == 1


def test_images_are_refused_at_construction(tool_model, tokenizer, tmp_path):
    from datasets import Dataset

    with_image_column = calc_dataset(8).add_column("image", [None] * 8)
    image_part = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ]
    with_image_parts = Dataset.from_dict({"prompt": [image_part] * 8, "answer": ["x"] * 8})
    for name, dataset in (("train_dataset", with_image_column), ("eval_dataset", with_image_parts)):
        kwargs = {"train_dataset": calc_dataset(8), name: dataset}
        with pytest.raises(ValueError, match=f"{name} holds images"):
            ARPOTrainer(
                model=tool_model, reward_funcs=[Recorder()], args=grpo_args(tmp_path, "img"), processing_class=tokenizer,
                **kwargs,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- tools


class ScriptedTurns:
    """Constrained decoding of chosen chat turns (the tiny model was taught the tag format, not JSON tool calls).

    `script(turn, row)` gives the text of assistant turn `turn` (0-based: the number of tool responses already in
    the prefix) for the `row`-th scripted row so far, or None to let the real model sample that turn through the
    trainer's real generator. Scripted tokens get entropy 0, so H_initial = H_t = 0 and ΔH = 0.
    """

    def __init__(self, inner, tokenizer, script):
        self.inner, self.tok, self.script = inner, tokenizer, script
        self.scripted_rows = 0

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        texts = []
        for prefix in prefixes:
            turn = self.tok.decode(prefix).count("<tool_response>")
            text = self.script(turn, self.scripted_rows)
            self.scripted_rows += text is not None
            texts.append(text)
        need_entropy = need_entropy or [True] * len(prefixes)
        free = [i for i, t in enumerate(texts) if t is None]
        sampled = iter(
            self.inner([prefixes[i] for i in free], [max_new_tokens[i] for i in free], [need_entropy[i] for i in free])
        )
        out = []
        for text in texts:
            if text is None:
                out.append(next(sampled))
            else:
                ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
                out.append(Segment(ids, [0.0] * len(ids), "eos"))
        return out


def tool_call(name, **arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def failing(expression: str) -> str:
    """
    Always fails.

    Args:
        expression: ignored.
    """
    raise RuntimeError("boom")


@pytest.mark.parametrize("tool, failures", [(calc, 0.0), (failing, 1.0)])
def test_trl_tool_metrics_are_logged(tool_model, tokenizer, tmp_path, tool, failures):
    """TRL's `tools/call_frequency` (calls per completion) and `tools/failure_frequency` (failed / executed)."""
    chat_tok = chat_template_tokenizer()
    args = grpo_args(tmp_path, "tools", max_steps=1, max_completion_length=96)
    trainer = ARPOTrainer(
        model=tool_model, reward_funcs=[Recorder()], args=args, train_dataset=calc_dataset(8), processing_class=chat_tok,
        tools=[tool],
    )  # fmt: skip
    name = tool.__name__
    arg = {"expression": "4+5"}
    trainer.rollout_backend.generator = ScriptedTurns(
        trainer.rollout_backend.generator, chat_tok, lambda turn, row: tool_call(name, **arg) if turn == 0 else None
    )
    trainer.train()
    trajs = trainer.observed_rollout.trajectories
    log = [e for e in trainer.state.log_history if "loss" in e][0]
    assert log["tools/call_frequency"] == pytest.approx(sum(len(t.tool_events) for t in trajs) / len(trajs))
    assert log["tools/call_frequency"] >= 1.0  # every root called once before any branch
    assert log["tools/failure_frequency"] == failures


# ---------------------------------------------------------------------------------------------- environments


class CounterEnv:
    """A stateful TRL environment: a counter the model adds to."""

    def reset(self, **kwargs):
        self.count = 0
        self.history = []

    def add(self, n: int) -> str:
        """
        Add n to the counter.

        Args:
            n: how much to add.

        Returns:
            The counter's new value.
        """
        self.count += n
        self.history.append(n)
        return str(self.count)


class ForkingCounterEnv(CounterEnv):
    """Defines fork(): ARPO must use it (not deepcopy) and must not offer it to the model as a tool."""

    forks = 0

    def fork(self):
        ForkingCounterEnv.forks += 1
        twin = ForkingCounterEnv()
        twin.count, twin.history = self.count, list(self.history)
        return twin


class LockedEnv(CounterEnv):
    def __init__(self):
        import threading

        self.lock = threading.Lock()  # cannot be deep-copied


def env_reward(environments, **kwargs):
    return [float(e.count) for e in environments]


@pytest.mark.parametrize("env_class", [CounterEnv, ForkingCounterEnv])
def test_environment_is_forked_with_its_branch(tool_model, tokenizer, tmp_path, env_class):
    """Roots add 1 (shared by their branches), then every trajectory adds its own amount: a branch's counter shares
    the state before the fork and diverges after it; rewards see each completion's own environment."""
    chat_tok = chat_template_tokenizer()
    args = arpo_args(
        tmp_path,
        "env",
        max_steps=1,
        max_completion_length=160,
        tool_format="chat_template",
        initial_rollouts=2,
        branch_base_probability=1.0,  # α = 1, β = 0: every decision forks while slots remain
        branch_entropy_weight=0.0,
        max_tool_calling_iterations=3,
    )
    trainer = ARPOTrainer(
        model=tool_model,
        reward_funcs=[env_reward],
        args=args,
        train_dataset=calc_dataset(8),
        processing_class=chat_tok,
        environment_factory=env_class,
    )
    assert [t.__name__ for t in trainer.tools] == ["add"]  # fork() is not offered to the model

    def script(turn, row):
        if turn == 0:
            return tool_call("add", n=1)
        if turn == 1:
            return tool_call("add", n=10 * (row + 1))  # a distinct amount for every trajectory
        return "Done."

    trainer.rollout_backend.generator = ScriptedTurns(trainer.rollout_backend.generator, chat_tok, script)
    ForkingCounterEnv.forks = 0
    trainer.train()
    trajs = trainer.observed_rollout.trajectories
    branches = [t for t in trajs if t.kind == "branch"]
    assert len(branches) == 2 * (M - 2)  # 2 groups × (M − N) slots, all filled by forks
    for branch in branches:
        parent = trajs[branch.parent]
        assert branch.env is not parent.env
        assert branch.env.history[0] == parent.env.history[0] == 1  # the call before the fork, run once
        assert branch.env.history[1] != parent.env.history[1]  # each continued on its own copy
        assert branch.env.count == 1 + branch.env.history[1] and parent.env.count == 1 + parent.env.history[1]
        results = [m["content"] for m in branch.messages if m["role"] == "tool"]
        assert results == ["1", str(branch.env.count)]
    assert trainer.environments == [t.env for t in trajs]
    assert trainer.state.log_history[0]["rewards/env_reward/mean"] == pytest.approx(
        sum(t.env.count for t in trajs) / len(trajs)
    )
    if env_class is ForkingCounterEnv:
        assert ForkingCounterEnv.forks == len(branches)


def test_environment_that_cannot_be_copied_is_refused(tool_model, tokenizer, tmp_path):
    args = grpo_args(tmp_path, "locked")
    with pytest.raises(ValueError, match="LockedEnv that cannot be copied.*fork\\(\\)"):
        ARPOTrainer(
            model=tool_model, reward_funcs=[env_reward], args=args, train_dataset=calc_dataset(8),
            processing_class=chat_template_tokenizer(), environment_factory=LockedEnv,
        )  # fmt: skip
