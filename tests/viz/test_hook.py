"""`log_rollout_trees` called from inside a real `ARPOTrainer.train()` step, reporting to a real (offline) wandb."""

import re
import time

import pytest
import torch

from arpo_trl import ARPOTrainer
from arpo_trl.testing import calc, calc_dataset, closeness_reward
from arpo_trl.viz.hook import TREES_DIR, WANDB_KEY

M, N = 4, 2


class TreeLoggingTrainer(ARPOTrainer):
    """Records what the built-in hook (`log_rollout_trees=1`) was given, to check the page against it."""

    def _maybe_log_rollout_trees(self, result, rewards_per_func, advantages):
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        self.seen = (result, rewards.clone(), advantages.clone())
        super()._maybe_log_rollout_trees(result, rewards_per_func, advantages)


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "arpo-viz-test")
    import wandb

    wandb.teardown()  # wandb caches its settings (WANDB_DIR) per process: start from this test's environment
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def test_trainer_step_writes_the_page_and_logs_it_to_wandb(tool_model, tokenizer, tmp_path, offline_wandb, arpo_config):
    import wandb

    args = arpo_config(
        max_completion_length=48, max_tool_calling_iterations=2, max_steps=1, report_to="wandb",
        gradient_checkpointing=True, log_rollout_trees=1, log_rollout_trees_prompts=1,
    )  # fmt: skip
    trainer = TreeLoggingTrainer(model=tool_model, reward_funcs=[closeness_reward], args=args,
                                 train_dataset=calc_dataset(16), processing_class=tokenizer, tools=[calc])  # fmt: skip
    trainer.train()
    record, rewards, advantages = trainer.seen
    path = tmp_path / "out" / TREES_DIR / "step-000000.html"
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-000000.html"]
    page = path.read_text(encoding="utf-8")
    # one prompt drawn (max_prompts=1): its M leaves carry the trainer's rewards and GRPO advantages
    leaves = re.findall(r'<g class="leaf" data-slot="(\d+)" data-reward="([^"]+)" data-advantage="([^"]+)"', page)
    assert [int(s) for s, _, _ in leaves] == list(range(M))
    for slot, reward, advantage in leaves:
        assert float(reward) == pytest.approx(float(rewards[int(slot)]))
        assert float(advantage) == pytest.approx(float(advantages[int(slot)]))
    assert torch.count_nonzero(advantages) > 0 or rewards.std() == 0
    assert page.count('<svg class="tree"') == 1 and "step 0" in page
    assert "α: 1.0" in page and "β: 0.0" in page and f"branches: {record.stats.branches}" in page
    # α = 1: every root that got a tool result forks; a slot no fork took is filled with a fresh rollout. How many
    # roots call the tool depends on the model's samples, so the page is checked against what the rollout did.
    assert record.stats.branches + record.stats.fresh == 2 * (M - N) and record.stats.branches > 0
    drawn = [t for t in record.trajectories if t.group == 0 and t.parent is not None]  # prompt 0's branches
    assert page.count(">fork<") >= len(drawn)
    # wandb (offline run): the same page, as an HTML media file, with nothing injected (no remote stylesheet)
    assert wandb.run is not None
    run_dir = wandb.run.dir
    wandb.finish()
    pattern = f"offline-run-*/files/media/html/{WANDB_KEY}_*.html"
    deadline = time.monotonic() + 60  # wandb's service moves media files asynchronously, even after finish()
    while not list((tmp_path / "wandb").glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.5)
    media = list((tmp_path / "wandb").glob(pattern))
    assert len(media) == 1, list((tmp_path / "wandb").rglob("*.html"))
    assert str(media[0]).startswith(str(run_dir).rsplit("/files", 1)[0])
    assert media[0].read_text(encoding="utf-8") == page
