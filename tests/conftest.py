"""Shared fixtures. Everything is offline: see arpo_trl/testing.py and tests/README.md."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# The caches `make test` points into one directory of its own (Makefile, TEST_ENV; tests/README.md, "Caches").
RUN_CACHES = ("XDG_CACHE_HOME", "ARPO_CACHE", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
              "TORCH_HOME", "HF_HOME", "HF_DATASETS_CACHE", "MPLCONFIGDIR")  # fmt: skip


def pytest_report_header(config):
    root = os.environ.get("ARPO_TEST_CACHES")
    if root is None:
        return "caches: this environment's own (make test gives the run fresh ones)"
    return f"caches: {root} ({'fresh' if os.environ.get('ARPO_FRESH_CACHES') == '1' else 'kept between runs'})"


def _check_fresh_caches() -> None:
    """Under `make test`, the run starts from nothing: every cache is inside its directory, which is empty. Checked
    when this file is imported, before any other conftest or test module imports torch or vLLM (which create cache
    directories as they load)."""
    root = os.environ.get("ARPO_TEST_CACHES")
    if root is None or os.environ.get("ARPO_FRESH_CACHES") != "1":
        return
    outside = [name for name in RUN_CACHES if Path(root) not in Path(os.environ.get(name, "/")).parents]
    if outside:
        pytest.exit(f"ARPO_FRESH_CACHES=1 but {', '.join(outside)} are not under {root}", returncode=4)
    if any(Path(root).iterdir()):
        pytest.exit(f"ARPO_FRESH_CACHES=1 but {root} is not empty: {sorted(os.listdir(root))}", returncode=4)


_check_fresh_caches()


@pytest.fixture(scope="session", autouse=True)
def observed_rollouts():
    """Every `ARPOTrainer` of the session (module and session fixtures' included) keeps the rollout it last scored
    (`trainer.observed_rollout`, its mode in `trainer.observed_mode`), through the trainer's `on_rollout` seam: the
    library itself keeps nothing."""
    from arpo_trl import ARPOTrainer

    def on_rollout(self, mode, result):
        self.observed_rollout, self.observed_mode = result, mode

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ARPOTrainer, "on_rollout", on_rollout)
        yield


@pytest.fixture(scope="session")
def tokenizer():
    from arpo_trl.testing import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tool_model_state(tokenizer):
    """State dict of the tiny model after its calc-tool SFT (built once, cached on disk across sessions)."""
    from arpo_trl.testing import tool_sft

    return {k: v.clone() for k, v in tool_sft(tokenizer).state_dict().items()}


@pytest.fixture
def tool_model(tokenizer, tool_model_state):
    """A fresh copy of the tool-calling tiny model for each test (training mutates it)."""
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer)
    model.load_state_dict(tool_model_state)
    return model


# The small run the trainer tests train: groups of M = 4 from N = 2 roots, forks forced at every decision (alpha = 1,
# beta = 0), 2 steps on CPU in float32 without gradient checkpointing, nothing saved or reported.
SMALL_RUN = dict(
    per_device_train_batch_size=8,
    num_generations=4,
    initial_rollouts=2,
    max_completion_length=64,
    max_tool_calling_iterations=3,
    max_steps=2,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    seed=0,
    branch_base_probability=1.0,
    branch_entropy_weight=0.0,
    tool_timeout=10,
)


@pytest.fixture
def arpo_config(tmp_path):
    """`arpo_config(**overrides)`: the `ARPOConfig` of `SMALL_RUN` with `overrides`, writing under the test's
    `tmp_path / "out"`."""
    from arpo_trl import ARPOConfig

    def make(**overrides) -> ARPOConfig:
        return ARPOConfig(**{"output_dir": str(tmp_path / "out"), **SMALL_RUN, **overrides})

    return make
