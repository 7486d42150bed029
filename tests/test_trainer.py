"""The real `ARPOTrainer.train()` on a tiny real model that calls real tools (see tests/README.md)."""

import math
import time

import pytest
import torch
from trl import GRPOConfig

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.advantages import hard_attribution
from arpo_trl.testing import calc, calc_dataset, chat_template_tokenizer, closeness_reward

M, N = 4, 2


class RecordingTrainer(ARPOTrainer):
    """Keeps each generation batch's rollout, TRL's gathered rewards and the output handed to the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def _calculate_rewards(self, *args, **kwargs):
        rewards = super()._calculate_rewards(*args, **kwargs)
        self._rewards = rewards.clone()
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.batches.append({"rollout": self.observed_rollout, "rewards": self._rewards, "out": out})
        return out


def make_trainer(model, tokenizer, args, tools=(calc,), cls=RecordingTrainer, **kwargs):
    return cls(
        model=model,
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=calc_dataset(64),
        processing_class=tokenizer,
        tools=list(tools),
        **kwargs,
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def group_advantages(rewards, group_size):
    """TRL's GRPO advantage: (r − group mean) / (group std + 1e-4), unbiased std."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + 1e-4)).view(-1)


def test_forced_branching_soft_mode(tool_model, tokenizer, arpo_config):
    trainer = make_trainer(tool_model, tokenizer, arpo_config())
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert len(trainer.batches) == 2
    for batch in trainer.batches:
        trajs, out = batch["rollout"].trajectories, batch["out"]
        # exactly M completions per prompt, in the group's own slots
        assert len(trajs) == 8 and out["completion_ids"].shape[0] == 8
        assert [t.slot for t in trajs] == list(range(8))
        # α = 1, β = 0: every decision forks until the budget M − N is used
        stats = batch["rollout"].stats
        assert stats.branches == 2 * (M - N) and stats.fresh == 0
        for t in trajs:
            if t.kind == "branch":
                parent = trajs[t.parent]
                cut = t.fork_position
                assert t.completion_ids[:cut] == parent.completion_ids[:cut]  # token for token
                assert tokenizer.decode(t.completion_ids[:cut]).endswith("</result>")  # through the tool result
        # tool-result tokens are masked out of the loss, model tokens are not
        mask = out["tool_mask"]
        for i, t in enumerate(trajs):
            ids = out["completion_ids"][i, : len(t.completion_ids)]
            m = mask[i, : len(t.completion_ids)]
            env_text = tokenizer.decode(ids[m == 0])
            model_text = tokenizer.decode(ids[m == 1])
            assert env_text.count("<result>") == len(t.tool_events)
            assert "<result>" not in model_text and "</result>" not in model_text
        # soft attribution: TRL's GRPO advantages over the M rows, untouched
        torch.testing.assert_close(out["advantages"], group_advantages(batch["rewards"].sum(1), M))
    assert any(b["out"]["advantages"].abs().sum() > 0 for b in trainer.batches)  # rewards differed in some group
    # the loss trained the model
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    # ARPO's metrics reach the logs (and so wandb)
    for key in [
        "arpo/branches_per_group",
        "arpo/fresh_rollouts_per_group",
        "arpo/entropy_delta_mean",
        "arpo/branch_probability_mean",
        "tools/calls_per_completion",
        "tools/executions_per_completion",
        "tools/errors",
    ]:
        assert logged(trainer, key), key
    assert logged(trainer, "arpo/branches_per_group") == [M - N, M - N]
    assert logged(trainer, "arpo/branch_probability_mean") == [1.0, 1.0]
    calls, execs = logged(trainer, "tools/calls_per_completion"), logged(trainer, "tools/executions_per_completion")
    assert all(e < c for c, e in zip(calls, execs))  # shared prefixes ran their tools once
    # Per-tool-step entropies: the logged means are those of the decisions this step took (H_t, H_t − ΔH).
    for logged_h_t, logged_h0, batch in zip(
        logged(trainer, "arpo/entropy_after_tool_mean"), logged(trainer, "arpo/entropy_initial_mean"), trainer.batches
    ):
        stats = batch["rollout"].stats
        h_t = sum(stats.entropy_after_tool) / len(stats.entropy_after_tool)
        h0 = h_t - sum(stats.entropy_deltas) / len(stats.entropy_deltas)
        assert logged_h_t == pytest.approx(h_t, rel=1e-3) and logged_h0 == pytest.approx(h0, rel=1e-3)
        roots = [t for t in batch["rollout"].trajectories if t.kind == "root"]
        assert min(t.h_initial for t in roots) - 1e-6 <= h0 <= max(t.h_initial for t in roots) + 1e-6


def test_no_branching_when_alpha_and_beta_are_zero(tool_model, tokenizer, arpo_config):
    args = arpo_config(branch_base_probability=0.0, branch_entropy_weight=0.0, max_steps=1)
    trainer = make_trainer(tool_model, tokenizer, args)
    trainer.train()
    stats = trainer.batches[0]["rollout"].stats
    assert stats.branches == 0 and stats.fresh == 2 * (M - N)
    assert logged(trainer, "arpo/branches_per_group") == [0.0]
    assert logged(trainer, "arpo/fresh_rollouts_per_group") == [M - N]
    assert all(t.kind in ("root", "fresh") for t in trainer.batches[0]["rollout"].trajectories)


def test_speculative_fill_and_forks_train_with_the_real_model(tool_model, tokenizer, arpo_config):
    args = arpo_config(
        branch_base_probability=0.5, branch_entropy_weight=0.2, rollout_fill="speculative",
        speculative_forks=True, max_steps=1,
    )  # fmt: skip
    trainer = make_trainer(tool_model, tokenizer, args)
    trainer.train()
    rollout = trainer.batches[0]["rollout"]
    trajs, stats = rollout.trajectories, rollout.stats
    assert [t.slot for t in trajs] == list(range(8)) and all(t.done for t in trajs)
    assert all(t.finish_reason != "discarded" for t in trajs)
    assert stats.branches + stats.fresh == 2 * (M - N) and stats.discarded == stats.branches
    assert stats.discarded_forks == len(stats.branch_probabilities) - stats.branches
    for t in trajs:
        if t.kind == "branch":
            cut = t.fork_position
            assert t.completion_ids[:cut] == trajs[t.parent].completion_ids[:cut]
            assert tokenizer.decode(t.completion_ids[:cut]).endswith("</result>")
    assert logged(trainer, "arpo/discarded_fresh_per_group") == [stats.discarded / 2]
    assert logged(trainer, "arpo/discarded_forks_per_group") == [stats.discarded_forks / 2]


def test_hard_attribution_replaces_advantages_with_the_mean_over_sharers(tool_model, tokenizer, arpo_config):
    args = arpo_config(advantage_attribution="hard", max_steps=1)
    trainer = make_trainer(tool_model, tokenizer, args)
    trainer.train()
    batch = trainer.batches[0]
    out, trajs = batch["out"], batch["rollout"].trajectories
    assert out["advantages"].shape == out["completion_ids"].shape
    soft = group_advantages(batch["rewards"].sum(1), M)
    lengths = torch.tensor([len(t.completion_ids) for t in trajs])
    valid = (torch.arange(out["completion_ids"].shape[1])[None] < lengths[:, None]).long()
    torch.testing.assert_close(out["advantages"], hard_attribution(out["completion_ids"], valid, soft, M))
    # a branch and its parent carry the same advantage on their shared prefix
    for i, t in enumerate(trajs):
        if t.kind == "branch":
            cut = t.fork_position
            torch.testing.assert_close(out["advantages"][i, :cut], out["advantages"][t.parent, :cut])


@pytest.mark.parametrize(
    "loss_type, level",
    [("grpo", "sequence"), ("dapo", "token"), ("dr_grpo", "token"), ("bnpo", "token"), ("cispo", "token"),
     ("sapo", "token"), ("luspo", "sequence"), ("vespo", "token")],
)  # fmt: skip
def test_hard_attribution_trains_with_every_trl_loss(tool_model, tokenizer, arpo_config, loss_type, level):
    """(B, T) advantages go through each of TRL's losses, GSPO's sequence-level importance sampling included."""
    args = arpo_config(advantage_attribution="hard", loss_type=loss_type, importance_sampling_level=level, max_steps=1)
    trainer = make_trainer(tool_model, tokenizer, args)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.batches[0]["out"]["advantages"].dim() == 2
    losses = logged(trainer, "loss")
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


def test_real_sandboxed_python_tool_and_lagged_timing(tool_model, tokenizer, arpo_config):
    from arpo_trl.tools import PythonInterpreter

    sandboxed = PythonInterpreter(name="calc", timeout=10)  # the tiny model writes "<calc>4+5+6</calc>": valid Python
    args = arpo_config(entropy_timing="lagged", branch_base_probability=0.5, branch_entropy_weight=0.2, max_steps=1)
    trainer = make_trainer(tool_model, tokenizer, args, tools=[sandboxed])
    trainer.train()
    trajs = trainer.batches[0]["rollout"].trajectories
    texts = [tokenizer.decode(t.completion_ids) for t in trajs]
    results = [x for x in texts if "<result>" in x]
    assert results
    # the sandbox evaluated the expression the model wrote (its last bare expression is printed)
    import re

    for text in results:
        m = re.search(r"<calc>([0-9+ ]+)</calc><result>\n(.*?)\n</result>", text, re.S)
        if m:
            assert m.group(2).strip() == str(eval(m.group(1)))  # noqa: S307 - digits and '+' only, checked by the regex
            break
    else:
        pytest.fail("no well-formed call found")


def test_hanging_and_crashing_tools_never_stall_training(tool_model, tokenizer, arpo_config):
    import itertools
    import threading

    invocations, lock, kinds = itertools.count(), threading.Lock(), []

    def calc(expression: str) -> str:
        """
        Hangs on every other invocation (the first included), crashes on the rest: both happen in one step.

        Args:
            expression: anything.
        """
        with lock:
            hang = next(invocations) % 2 == 0
            kinds.append("hang" if hang else "crash")
        if hang:
            time.sleep(30)
        raise RuntimeError("calculator is broken")

    calc.thread_safe = True  # ARPO's time limits apply to tools run in its worker threads (user tools: main thread)
    args = arpo_config(tool_timeout=0.5, max_steps=1)
    trainer = make_trainer(tool_model, tokenizer, args, tools=[calc])
    rounds = []  # wall time of each tool round: a 30 s hang must not hold one past its 0.5 s timeout
    run = trainer.tool_executor.run

    def timed_run(calls, *rest):
        start = time.monotonic()
        results = run(calls, *rest)
        rounds.append((time.monotonic() - start, results))
        return results

    trainer.tool_executor.run = timed_run
    trainer.train()
    assert rounds and max(seconds for seconds, _ in rounds) < 0.5 + 5  # timeout plus scheduling slack, not 30 s
    results = [r for _, batch in rounds for r in batch]
    n = len(results)
    # the model called the tool more than once (as it does in nearly every trajectory): both kinds happened
    assert kinds.count("hang") >= 1 and kinds.count("crash") >= 1
    hung = [r for r in results if r.timed_out]
    crashed = [r for r in results if "calculator is broken" in r.text]
    assert len(hung) == kinds.count("hang") and len(crashed) == kinds.count("crash")
    assert all(r.error and r.text == "Error: tool 'calc' timed out after 0.5 s." for r in hung)
    assert all(r.error and not r.timed_out for r in crashed)
    assert all(r.error for r in results)  # the rest are malformed calls the model wrote, answered without running
    errors, timeouts = logged(trainer, "tools/errors")[0], logged(trainer, "tools/timeouts")[0]
    assert errors == n and timeouts == len(hung)
    # and the model read both kinds as its results
    texts = [tokenizer.decode(t.completion_ids) for t in trainer.batches[0]["rollout"].trajectories]
    assert any("timed out after 0.5 s" in x for x in texts) and any("calculator is broken" in x for x in texts)


def test_lora_via_peft_config(tool_model, tokenizer, arpo_config):
    from peft import LoraConfig, PeftModel

    args = arpo_config(max_steps=1, learning_rate=1e-2)
    trainer = make_trainer(
        tool_model, tokenizer, args, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    assert isinstance(trainer.model, PeftModel)
    lora_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    base_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora" not in k}
    trainer.train()
    assert trainer.batches[0]["rollout"].stats.branches == 2 * (M - N)
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[k], v) for k, v in lora_before.items())
    assert all(torch.equal(params[k], v) for k, v in base_before.items())


def test_checkpoint_save_and_resume(tool_model, tokenizer, tmp_path, arpo_config):
    args = arpo_config(max_steps=2, save_strategy="steps", save_steps=1)
    make_trainer(tool_model, tokenizer, args).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "model.safetensors").exists()
    assert (tmp_path / "out" / "checkpoint-1").exists()

    from arpo_trl.testing import build_tiny_model

    resumed = make_trainer(build_tiny_model(tokenizer), tokenizer, arpo_config(max_steps=3))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert len(resumed.batches) == 1  # only the third step was run


def test_drop_in_with_a_plain_grpo_config(tool_model, tokenizer, tmp_path):
    """A GRPOTrainer script with tools, trainer class swapped: its chat-template tool calls keep working."""
    import json

    chat_tok = chat_template_tokenizer()  # TRL's bundled Qwen2.5 template: tool-aware, prefix-preserving
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=M,
        max_completion_length=96,
        max_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = make_trainer(tool_model, chat_tok, args)
    assert isinstance(trainer.args, ARPOConfig) and trainer.initial_rollouts == M // 2  # tools: N = M // 2
    assert trainer.args.tool_format == "chat_template" and [f.__name__ for f in trainer.tools] == ["calc"]
    call = json.dumps({"name": "calc", "arguments": {"expression": "4+5"}})
    trainer.rollout_backend.generator = FirstTurnScripted(
        trainer.rollout_backend.generator, chat_tok, f"<tool_call>\n{call}\n</tool_call>"
    )
    trainer.train()
    trajs = trainer.batches[0]["rollout"].trajectories
    assert len(trajs) == 8
    assert all(t.messages[1] == {"role": "tool", "name": "calc", "content": "9"} for t in trajs)


def test_evaluation_keeps_plain_sampling_with_tools(tool_model, tokenizer, arpo_config):
    """Evaluation samples whole trajectories and never forks, even where a fork would fit: here each eval group gets
    room for one (M = 2, N = 1) and α = 1, so the same scenario with branching switched on does fork."""
    import dataclasses

    class RoomToBranch(ARPOTrainer):
        force_branching = False

        def _rollout_parts(self, mode):
            parts = super()._rollout_parts(mode)
            if mode != "eval":
                return parts
            room = dataclasses.replace(parts.settings, group_size=2, initial_rollouts=1)  # rows come in prompt pairs
            parts.settings = dataclasses.replace(room, branching=True) if self.force_branching else room
            return parts

    args = arpo_config(per_device_eval_batch_size=4, num_generations_eval=2)
    trainer = RoomToBranch(
        model=tool_model,
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=calc_dataset(8),
        eval_dataset=calc_dataset(4, seed=1),
        processing_class=tokenizer,
        tools=[calc],
    )
    assert trainer.args.branch_base_probability == 1.0 and trainer.args.branch_entropy_weight == 0.0
    metrics = trainer.evaluate()
    record = trainer.observed_rollout
    assert trainer.observed_mode == "eval" and record.stats.branches == 0 and record.stats.branch_probabilities == []
    assert all(t.kind != "branch" for t in record.trajectories)
    assert "eval_reward" in metrics and metrics["eval_tools/calls_per_completion"] > 0  # results to fork at
    # control: the same evaluation with branching on forks at those results
    trainer.force_branching = True
    trainer.evaluate()
    assert trainer.observed_rollout.stats.branches > 0
    assert any(t.kind == "branch" for t in trainer.observed_rollout.trajectories)


def test_constructor_rejects_what_arpo_cannot_do(tool_model, tokenizer, arpo_config):
    args = arpo_config()
    with pytest.raises(ValueError, match="rollout_func"):
        make_trainer(tool_model, tokenizer, args, rollout_func=lambda prompts, trainer: {})
    with pytest.raises(ValueError, match="unique"):
        make_trainer(tool_model, tokenizer, args, tools=[calc, calc])
    with pytest.raises(ValueError, match="environment_factory needs tool_format='chat_template'"):
        make_trainer(tool_model, tokenizer, args, environment_factory=object)


def test_settings_of_existing_grpo_scripts_train(tool_model, tokenizer, tmp_path, arpo_config):
    """What TRL users keep in their scripts: several micro-steps per generation, gradient accumulation, more than one
    iteration per batch, gradient checkpointing, a KL term against a reference model (loaded from a path, as TRL
    requires), entropy masking and truncation masking, all with hard attribution."""
    model_dir = tmp_path / "model"
    tool_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = arpo_config(
        advantage_attribution="hard", per_device_train_batch_size=4, steps_per_generation=2,
        gradient_accumulation_steps=2, num_iterations=2, gradient_checkpointing=True, beta=0.04,
        top_entropy_quantile=0.5, mask_truncated_completions=True, max_steps=2,
    )  # fmt: skip
    trainer = make_trainer(str(model_dir), tokenizer, args)
    trainer.train()
    assert trainer.ref_model is not None and trainer.state.global_step == 2
    rollout = trainer.batches[0]["rollout"]
    assert len(rollout.trajectories) == 8 and rollout.stats.branches == 2 * (M - N)  # one generation, 2 micro-steps
    assert trainer.batches[0]["out"]["advantages"].shape[0] == 8
    kl = logged(trainer, "kl")
    assert kl and all(math.isfinite(x) for x in kl + logged(trainer, "loss"))


class FirstTurnScripted:
    """Constrained decoding of the first segment, for tool_format="chat_template".

    The tiny model was taught the tag format only, so rows that have not called a tool yet receive a scripted
    `<tool_call>` turn; every later segment (after the tool's answer) is sampled by the real model through the
    trainer's real generator, so branching, masking and parsing run for real.
    """

    def __init__(self, inner, tokenizer, call_text):
        self.inner, self.tok = inner, tokenizer
        self.call_ids = tokenizer.encode(call_text, add_special_tokens=False) + [tokenizer.eos_token_id]

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        from arpo_trl.rollout.round_driver import Segment

        scripted = ["<tool_response>" not in self.tok.decode(p) for p in prefixes]
        need_entropy = need_entropy or [True] * len(prefixes)
        sampled = self.inner(
            [p for p, s in zip(prefixes, scripted) if not s],
            [b for b, s in zip(max_new_tokens, scripted) if not s],
            [n for n, s in zip(need_entropy, scripted) if not s],
        )
        out = []
        for s in scripted:
            out.append(Segment(list(self.call_ids), [0.0] * len(self.call_ids), "eos") if s else sampled.pop(0))
        return out


def test_chat_template_tool_format_with_the_sandboxed_interpreter(tool_model, tokenizer, arpo_config):
    import json

    from arpo_trl.tools import PythonInterpreter

    chat_tok = chat_template_tokenizer()  # TRL's bundled Qwen2.5 template: tool-aware, prefix-preserving
    args = arpo_config(tool_format="chat_template", max_completion_length=160, max_steps=1)
    trainer = make_trainer(tool_model, chat_tok, args, tools=[PythonInterpreter(timeout=10)])
    call = json.dumps({"name": "python", "arguments": {"code": "x = 20\nx + 22"}})
    trainer.rollout_backend.generator = FirstTurnScripted(
        trainer.rollout_backend.generator, chat_tok, f"<tool_call>\n{call}\n</tool_call>"
    )
    trainer.train()

    batch = trainer.batches[0]
    trajs, out = batch["rollout"].trajectories, batch["out"]
    assert len(trajs) == 8 and batch["rollout"].stats.branches == 2 * (M - N)
    for i, t in enumerate(trajs):
        # TRL-style messages: the assistant's call, the tool's answer (from the sandbox), the next assistant turn
        assert t.messages[0]["tool_calls"][0]["function"]["name"] == "python"
        assert t.messages[1] == {"role": "tool", "name": "python", "content": "42"}
        ids, mask = out["completion_ids"][i, : len(t.completion_ids)], out["tool_mask"][i, : len(t.completion_ids)]
        env_text = chat_tok.decode(ids[mask == 0])
        assert "<tool_response>\n42\n</tool_response>" in env_text and "<tool_call>" not in env_text
        assert "<tool_response>" not in chat_tok.decode(ids[mask == 1])
        if t.kind == "branch":
            cut = t.fork_position
            assert t.completion_ids[:cut] == trajs[t.parent].completion_ids[:cut]
            assert chat_tok.decode(t.completion_ids[:cut]).endswith("<|im_start|>assistant\n")


def test_official_preset_on_transformers_measures_the_top_k_estimate(
    tool_model, tokenizer, tool_model_state, arpo_config
):
    """rollout_preset="official" without vLLM: the transformers backend records, for every token it measured, the
    official top-10 + sampled-token entropy of the rollout's model (teacher-forced recompute), and training runs."""
    from arpo_trl.rollout.entropy import truncated_entropy
    from arpo_trl.testing import build_tiny_model

    args = arpo_config(rollout_preset="official", max_steps=1, entropy_window=4)
    trainer = make_trainer(tool_model, tokenizer, args)
    assert trainer.args.entropy_estimator == "top_k" and trainer.args.use_vllm is False
    trainer.train()
    record = trainer.batches[0]["rollout"]
    reference = build_tiny_model(tokenizer)
    reference.load_state_dict(tool_model_state)  # the weights the rollout sampled with (before the step)
    reference.eval()
    checked = 0
    for traj in record.trajectories:
        prompt = record.prompt_ids[traj.group * M]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + traj.completion_ids])).logits[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(logits.double() / args.temperature, dim=-1)
        for i, measured in enumerate(traj.token_entropies):
            if math.isnan(measured):
                continue
            token = traj.completion_ids[i]
            candidates = {int(t): float(logprobs[i, t]) for t in logprobs[i].topk(10).indices}
            candidates[token] = float(logprobs[i, token])
            # 1e-3: the bound for a teacher-forced recompute (batched, left-padded sampling differs ~1e-4)
            assert measured == pytest.approx(truncated_entropy(candidates), abs=1e-3), (traj.slot, i)
            checked += 1
    assert checked >= len(record.trajectories) * 4  # every trajectory's first window at least
    assert math.isfinite(logged(trainer, "loss")[0])


def test_vllm_under_autocast_with_float32_weights_is_named_at_construction():
    """bf16/fp16 autocast over float32 weights: the engine (weights' dtype) and the trainer's logprobs differ by
    the autocast rounding, which TRL's importance-sampling ratios would report as off-policy drift."""
    from arpo_trl.rollout.vllm_weights import autocast_mismatch

    message = autocast_mismatch("float32", "bf16")
    assert "bfloat16 autocast" in message and "bf16=False" in message
    assert "float16 autocast" in autocast_mismatch("float32", "fp16")
    assert autocast_mismatch("float32", "no") is None
    assert autocast_mismatch("bfloat16", "bf16") is None  # both sides compute in bf16
