"""Real 2-process runs (`accelerate launch` on CPU) whose ranks branch differently on purpose: DDP over gloo, and
DeepSpeed ZeRO-2 / ZeRO-3 on DeepSpeed's CPU accelerator."""

import pytest
from fakes import launch_two_ranks


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
