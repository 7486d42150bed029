"""Helpers of the vLLM tests: prompts, streams, teacher forcing, the environment of a fresh machine, and the colocated
trainer's arguments, recording trainer and head-size-32 model (`vllm_args`, `Recording`, `wide_model`; the head-size
re-layout, `widen_heads`, is in `arpo_trl.testing`)."""

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import torch

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.rollout.entropy import token_entropy
from arpo_trl.testing import build_tiny_model, calc_prompt, widen_heads

REPO = Path(__file__).resolve().parents[2]

# |vLLM − transformers| on logprobs and entropies, float32 on both sides. Measured on this model (32 tokens × 4
# requests, T = 1 and 0.7, tests/vllm_backend/measure_engine.py): at most 9e-6 for logprobs and 7e-6 for entropies; the
# bounds leave room for other CPUs' kernels (the issue asks ≤ 1e-3 for entropies).
LOGPROB_TOL = 1e-4
ENTROPY_TOL = 1e-4


def prompt_ids(tokenizer, a: int, b: int, c: int) -> list[int]:
    return tokenizer.apply_chat_template(calc_prompt(a, b, c), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)  # fmt: skip


class Result:
    """A finished stream, merged, and the entropies read right after it."""

    def __init__(self, updates, entropies):
        self.updates = updates
        self.ids = [t for u in updates for t in u.token_ids]
        self.logprobs = [x for u in updates for x in u.logprobs]
        self.top = [x for u in updates for x in u.top_logprobs]
        self.finish = updates[-1].finish_reason
        self.cached = updates[-1].num_cached_tokens
        self.entropies = entropies


async def collect(engine, request_id: str, prompt: list[int], max_tokens: int, stop=None, read_entropies=True,
                  **kwargs) -> Result:  # fmt: skip
    updates = [u async for u in engine.stream(request_id, prompt, max_tokens, stop, **kwargs)]
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    entropies = (
        (await engine.entropies([request_id]))[request_id] if read_entropies and kwargs.get("entropy_tokens") else None
    )
    return Result(updates, entropies)


def teacher_forced(model, prompt: list[int], ids: list[int], temperature: float = 1.0):
    """(log_softmax, entropy) at `temperature` of the distributions `ids` were sampled from, by transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    scaled = logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1), token_entropy(logits, temperature)


def fresh_env(root: Path) -> dict[str, str]:
    """An environment with nothing a previous run could have left: every cache under `root`, which is empty."""
    home = root / "home"
    home.mkdir()
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "VLLM_CACHE_ROOT": str(root / "vllm-cache"),
        "VLLM_CONFIG_ROOT": str(root / "vllm-config"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "HF_HOME": str(root / "hf"),
        "ARPO_CACHE": str(root / "arpo"),
    }


def cached_architectures(cache_root: Path) -> list[str]:
    """The architectures vLLM described in its cache under `cache_root` (once it has inspected a model class)."""
    return sorted(p.stem.rsplit("-", 1)[1] for p in (cache_root / "modelinfos").glob("*.json"))


# ------------------------------------ the colocated trainer (test_trainer_vllm.py, test_aepo_vllm.py, test_server.py)

M, N = 4, 2


def vllm_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=M,
        initial_rollouts=N,
        max_completion_length=64,
        max_tool_calling_iterations=3,
        max_steps=2,
        learning_rate=1e-2,  # large: stale engine weights would show in the importance-sampling ratio
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        branch_base_probability=1.0,  # α = 1, β = 0: every decision forks while slots remain
        branch_entropy_weight=0.0,
        entropy_window=4,
        tool_timeout=10,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_kv_cache_gib=0.25,
    )
    values.update(overrides)
    return ARPOConfig(**values)


class Recording(ARPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.batches = getattr(self, "batches", []) + [{"rollout": self.observed_rollout, "out": out}]
        return out


def wide_model(tokenizer, tool_model_state):
    model = build_tiny_model(tokenizer)
    model.load_state_dict(tool_model_state)
    return widen_heads(model).train()


# ------------------------------------------------------------------------ a `vllm serve` process on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, port: int, workdir: Path, cache_root: Path) -> tuple[subprocess.Popen, str]:
    """A real `vllm serve` of `model_dir` on 127.0.0.1:`port` (its log in `workdir`, its vLLM cache `cache_root`),
    once `/health` answers; its own process group, so its engine processes go with it."""
    from arpo_trl.rollout.vllm_server import VLLMServerEngine, server_command

    log = workdir / f"server-{port}-{time.monotonic_ns()}.log"
    command = server_command(model_dir, port, enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
                             kv_cache_memory_bytes=2**28, max_logprobs=20, dtype="float32")  # fmt: skip
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1", VLLM_CACHE_ROOT=str(cache_root))
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:  # until /health answers, the process dies or 5 minutes pass
        try:
            VLLMServerEngine(url, connection_timeout=0).shutdown()
            return process, url
        except ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                raise RuntimeError(f"the vLLM server did not start:\n{log.read_text()[-4000:]}") from None
            time.sleep(2)


def stop_server(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """`sig` to the server's process group (SIGTERM: it shuts its engine down), SIGKILL after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
