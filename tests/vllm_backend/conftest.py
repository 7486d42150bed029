"""One real vLLM engine for the whole folder, over the tool-calling tiny model, and its transformers twin.

vLLM's CPU attention supports head sizes of 32 and more, and the tiny test model has 16 (hidden 64, 4 heads), so
the engine runs an exact re-layout of it with head size 32 (`arpo_trl.testing.widen_heads`): same function, same
tokens.
"""

from pathlib import Path

import pytest
import torch
from vllm_helpers import prompt_ids

from arpo_trl.rollout.vllm_engine import INSTALL_HINT, vllm_available
from arpo_trl.testing import build_tiny_model, widen_heads

SKIP_REASON = f"vLLM tests skipped: {INSTALL_HINT}"


class _SkippedModule(pytest.Module):
    """Without vLLM, each test module here is reported skipped with the reason, without being imported. (A skip
    raised by this conftest itself would crash pytest when it is given a path inside this folder.)"""

    def collect(self):
        pytest.skip(SKIP_REASON)


if not vllm_available():

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm_last: runs after the shared engine's other tests (it shuts it down)")


def pytest_collection_modifyitems(config, items):
    """Within this folder: the tests of the shared engine, then the one that shuts it down, then the rest (which
    start engines of their own: two at once would share two cores and twice the memory)."""
    here = Path(__file__).parent
    positions = [i for i, item in enumerate(items) if here in Path(str(item.path)).parents]

    def rank(item) -> int:
        if item.get_closest_marker("vllm_last"):
            return 1
        return 0 if "engine" in getattr(item, "fixturenames", ()) else 2

    ordered = sorted((items[i] for i in positions), key=rank)  # stable: file order otherwise
    for i, item in zip(positions, ordered):
        items[i] = item


@pytest.fixture(scope="session")
def hf_model(tokenizer, tool_model_state):
    """The transformers model the engine serves (float32, eval)."""
    narrow = build_tiny_model(tokenizer)
    narrow.load_state_dict(tool_model_state)
    narrow.eval()
    model = widen_heads(narrow)
    ids = torch.tensor([prompt_ids(tokenizer, 3, 4, 5)])
    with torch.no_grad():  # the re-layout is exact: it must not change what the model computes
        assert (model(ids).logits - narrow(ids).logits).abs().max() < 1e-4
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, hf_model):
    path = tmp_path_factory.mktemp("vllm-model")
    hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def engine(model_dir):
    from arpo_trl.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(model_dir, temperature=1.0, max_model_len=1024, kv_cache_gib=0.25, seed=0)
    yield eng
    eng.shutdown()
