"""A backend that dies mid-rollout ends the step with an error naming what died, within a bounded time, and training
resumes from the last checkpoint once it is back. The test kills, from inside a tool call of the second step's
rollout (other requests streaming meanwhile), the colocated engine's core process, and the real `vllm serve` process.
"""

import os
import signal
import threading
import time

import psutil
import pytest
from transformers import TrainerCallback
from vllm_helpers import free_port, start_server, stop_server, vllm_args, wide_model

from arpo_trl import ARPOTrainer
from arpo_trl.rollout.backends import RolloutBackendError
from arpo_trl.testing import calc, calc_dataset, closeness_reward

BOUND_S = 60  # from the kill to the error


class Arm(TrainerCallback):
    """Arms the killing tool once step 1 (and its checkpoint) is done."""

    def __init__(self, armed: threading.Event) -> None:
        self.armed = armed

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.armed.set()


def killing_calc(kill, armed: threading.Event, killed: list):
    """The calc tool, which at its first call once armed runs `kill` and notes when."""

    def tool(expression: str) -> str:
        if armed.is_set() and not killed:
            kill()
            killed.append(time.monotonic())
        return calc(expression)

    tool.__name__, tool.__doc__ = "calc", calc.__doc__
    return tool


def kill_engine_core() -> None:
    """SIGKILL to this process's vLLM engine core (vLLM names it ``VLLM::EngineCore``)."""
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline()) + " " + process.name()
        except psutil.Error:
            continue
        if "EngineCore" in title:
            process.kill()
            return
    raise AssertionError("no vLLM EngineCore process to kill")


def train_until_it_dies(trainer: ARPOTrainer, killed: list, match: str) -> RolloutBackendError:
    with pytest.raises(RolloutBackendError, match=match) as info:
        trainer.train()
    assert killed and time.monotonic() - killed[0] < BOUND_S
    assert "resume_from_checkpoint" in str(info.value)
    assert trainer.state.global_step == 1  # the step in flight is lost, the one before it is checkpointed
    return info.value


def close_within_bound(trainer: ARPOTrainer) -> None:
    closer = threading.Thread(target=trainer.rollout_backend.close, daemon=True)
    closer.start()
    closer.join(BOUND_S)
    assert not closer.is_alive(), "closing the dead backend hung"


def resume(tokenizer, tool_model_state, args) -> ARPOTrainer:
    trainer = ARPOTrainer(
        model=wide_model(tokenizer, tool_model_state), reward_funcs=[closeness_reward], args=args,
        train_dataset=calc_dataset(64), processing_class=tokenizer, tools=[calc],
    )  # fmt: skip
    try:
        trainer.train(resume_from_checkpoint=True)
        assert trainer.state.global_step == 2
    finally:
        trainer.rollout_backend.close()
    return trainer


@pytest.mark.slow
def test_a_killed_colocated_engine_ends_the_step_with_its_name_and_training_resumes(
    tokenizer, tool_model_state, tmp_path
):
    armed, killed = threading.Event(), []
    args = vllm_args(tmp_path)
    trainer = ARPOTrainer(
        model=wide_model(tokenizer, tool_model_state), reward_funcs=[closeness_reward], args=args,
        train_dataset=calc_dataset(64), processing_class=tokenizer,
        tools=[killing_calc(kill_engine_core, armed, killed)], callbacks=[Arm(armed)],
    )  # fmt: skip
    train_until_it_dies(trainer, killed, "ARPO's colocated vLLM engine stopped answering during the rollout")
    close_within_bound(trainer)
    assert os.path.isdir(os.path.join(args.output_dir, "checkpoint-1"))
    resume(tokenizer, tool_model_state, args)


@pytest.mark.slow
def test_a_killed_server_ends_the_step_with_its_url_and_training_resumes_once_it_is_back(
    model_dir, tokenizer, tool_model_state, tmp_path
):
    port, cache_root = free_port(), tmp_path / "vllm-cache"
    process, url = start_server(model_dir, port, tmp_path, cache_root)
    try:
        armed, killed = threading.Event(), []
        args = vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url=url, vllm_server_timeout=30)
        trainer = ARPOTrainer(
            model=wide_model(tokenizer, tool_model_state), reward_funcs=[closeness_reward], args=args,
            train_dataset=calc_dataset(64), processing_class=tokenizer,
            tools=[killing_calc(lambda: os.killpg(process.pid, signal.SIGKILL), armed, killed)],
            callbacks=[Arm(armed)],
        )  # fmt: skip
        train_until_it_dies(trainer, killed, f"the vLLM server at {url} stopped answering during the rollout")
        close_within_bound(trainer)
        stop_server(process, signal.SIGKILL)
        process, _ = start_server(model_dir, port, tmp_path, cache_root)  # the server is back, same address
        resume(tokenizer, tool_model_state, args)
    finally:
        stop_server(process)
