"""Shared fixtures. Everything is offline: see arpo_trl/testing.py and tests/README.md."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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
