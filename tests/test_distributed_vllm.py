"""Real 2-process runs with `use_vllm=True` (`accelerate launch` on CPU, one colocated vLLM engine per rank) whose
ranks branch differently on purpose, under DDP (gloo) and DeepSpeed ZeRO-3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arpo_trl.rollout.vllm_engine import vllm_available

SCRIPT = Path(__file__).parent / "scripts" / "distributed_vllm.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make install brings the CPU build)"),
]


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_ranks_with_vllm_engines_and_different_trees(backend, tmp_path, tool_model_state):
    from test_distributed import free_port

    accelerate = Path(sys.executable).with_name("accelerate")
    if backend == "ddp":
        launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    else:  # the weight sync gathers ZeRO-3's partitioned parameters: a collective both ranks must enter together
        launch = ["--config_file", str(SCRIPT.parent / f"accelerate_cpu_{backend}.yaml")]
    cmd = [str(accelerate), "launch", *launch, "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    assert all(r["global_step"] == 2 for r in reports)
    assert reports[0]["branches"] > 0 and reports[1]["branches"] == 0  # different trees, no deadlock
    assert all(r["weight_syncs"] == 2 for r in reports)  # each engine got the weights before each rollout
    for r in reports:  # and sampled with them: TRL's importance-sampling ratio is 1
        assert all(abs(x - 1.0) < 2e-3 for x in r["importance_sampling_ratios"])
