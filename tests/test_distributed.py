"""Real 2-process runs (`accelerate launch` on CPU) whose ranks branch differently on purpose: DDP over gloo, and
DeepSpeed ZeRO-2 / ZeRO-3 on DeepSpeed's CPU accelerator."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "distributed_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(backend: str, tmp_path: Path, timeout: int, overrides: dict | None = None) -> list[dict]:
    """`accelerate launch` the 2-rank script on CPU; its exit status must be 0; return each rank's report."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if backend == "ddp":
        # --multi_gpu selects accelerate's torchrun launcher; with use_cpu=True the processes run on CPU over gloo.
        launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    else:
        # Under ZeRO-3 every generate call (and every weight sync to vLLM) gathers the partitioned parameters
        # collectively: a rank that skipped one would leave the other waiting forever.
        launch = ["--config_file", str(SCRIPT.parent / f"accelerate_cpu_{backend}.yaml")]
    cmd = [str(accelerate), "launch", *launch, "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path)]
    if overrides:
        cmd.append(json.dumps(overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
def test_two_ranks_with_different_trees_make_the_same_generate_calls(backend, tmp_path, tool_model_state):
    # tool_model_state: the cached SFT model exists before both ranks load it.
    reports = launch_two_ranks(backend, tmp_path, timeout=420)
    assert [r["world"] for r in reports] == [2, 2]
    expected = "DistributedType.MULTI_CPU" if backend == "ddp" else "DistributedType.DEEPSPEED"
    assert all(r["distributed_type"] == expected for r in reports)
    assert all(r["global_step"] == 2 for r in reports)
    # rank 0 forks at every decision, rank 1 never: different trees...
    assert reports[0]["branches"] > 0 and reports[1]["branches"] == 0
    # ...and still the same number of generate calls on both ranks (idle rounds joined with a dummy batch)
    assert reports[0]["generate_calls"] == reports[1]["generate_calls"]
    assert reports[0]["idle_calls"] + reports[1]["idle_calls"] > 0  # one rank did wait for the other
