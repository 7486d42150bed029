"""`arpo-analyze entropy --backend vllm`: ARPO's asynchronous rollout on a real vLLM engine, every sampled token's
entropy from the engine, against the transformers model's teacher-forced values."""

import json

import pytest

from arpo_trl.rollout.vllm_engine import vllm_available
from arpo_trl.viz.analyze import main
from arpo_trl.viz.sampling import teacher_forced_entropies

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make install)")

K = 4
# |vLLM − transformers| entropy, float32 both sides: measured at most 7e-6 on this model (tests/vllm_backend); the bound
# leaves room for other CPUs' kernels.
TOL = 1e-4


@pytest.fixture(scope="module")
def vllm_analysis(tmp_path_factory, tool_model_state):  # tool_model_state: the fixture model is built first
    out = tmp_path_factory.mktemp("entropy-vllm")
    argv = ["entropy", "--backend", "vllm", "--model", "fixture:tiny-calc", "--dataset", "fixture:calc",
            "--tools", "calc", "--num-prompts", "3", "--samples", "2", "--max-new-tokens", "48",
            "--max-tool-calls", "2", "--window", str(K), "--out", str(out), "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    return out, json.loads((out / "entropy.json").read_text(encoding="utf-8"))


def test_vllm_entropies_match_the_transformers_models_teacher_forced_values(vllm_analysis, viz_model):
    """Every sampled token's entropy, recorded by the engine's logits processor (`measure_every_token`: the whole
    completion, not only ARPO's k-token windows), equals H(softmax(z)) of the transformers model's logits in one
    forward pass over prompt + completion. The engine serves the model re-laid out with heads of 32, so this
    also checks that re-layout end to end."""
    out, report = vllm_analysis
    assert report["config"]["backend"] == "vllm" and len(report["trajectories"]) == 6
    assert report["summary"]["tool_results"] > 0  # the fixture model called its tool through the async driver
    checked = late = 0
    for row in report["trajectories"]:
        ref = teacher_forced_entropies(viz_model, row["prompt_ids"], row["completion_ids"])
        sampled = 0
        for e, r, m in zip(row["entropies"], ref, row["tool_mask"]):
            if not m:
                assert e is None  # tool-result tokens are the environment's
                continue
            assert e is not None and e == pytest.approx(r, abs=TOL)
            checked += 1
            sampled += 1
            late += sampled > K  # beyond ARPO's windows: measured only because the analyser asks for every token
    assert checked > 50 and late > 10
    assert (out / "entropy.png").stat().st_size > 10_000
