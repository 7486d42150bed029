"""Fixtures for the visualisation tests: one real branching rollout of the tiny tool-calling model, shared."""

import pytest
import torch


@pytest.fixture(scope="session")
def viz_model(tokenizer, tool_model_state):
    """The calc-tool model (read-only here: nothing trains it)."""
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer)
    model.load_state_dict(tool_model_state)
    return model.eval()


@pytest.fixture(scope="session")
def branching_batch(viz_model, tokenizer):
    """2 prompts × M=4 rows: N=2 roots, α=1, β=0 (every decision forks until the budget is used), real calc tool,
    per-token entropies recorded; graded rewards from the real reward function, GRPO advantages."""
    from arpo_trl.testing import calc, calc_dataset, closeness_reward
    from arpo_trl.viz.sampling import rollout_with_entropies

    data = calc_dataset(2, seed=3)
    prompts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
        for p in data["prompt"]
    ]
    batch = rollout_with_entropies(
        viz_model,
        tokenizer,
        prompts,
        [calc],
        samples=4,
        initial_rollouts=2,
        branching=True,
        alpha=1.0,
        beta=0.0,
        max_new_tokens=48,
        max_tool_calls=2,
        entropy_window=4,
        seed=0,
    )
    texts = [tokenizer.decode(t.completion_ids, skip_special_tokens=True) for t in batch.trajectories]
    answers = [a for a in data["answer"] for _ in range(4)]
    rewards = torch.tensor(closeness_reward(texts, answers))
    grouped = rewards.view(-1, 4)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    return batch, rewards, advantages
