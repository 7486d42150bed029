"""The vLLM backend's parts that need no running engine, on real vLLM types: the shared-memory entropy table and
its client, the worker's entropy processor driven by vLLM's own `BatchUpdate`s, the conversion of vLLM's outputs
into `StreamUpdate`s, and the environment the engine is spawned in. `tests/vllm_backend/` runs them inside real engines;
here each rule is checked on its own, fast enough for `make mutate`."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from arpo_trl.rollout.vllm_engine import (
    EXTRA_ARGS_KEY,
    EntropyTable,
    StreamUpdate,
    _EntropyTables,
    _environ,
    _main_not_reimported,
    vllm_available,
)

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (`make install` brings it)")


def reference_entropy(logits: torch.Tensor, temperature: float = 1.0) -> list[float]:
    """H of softmax(logits / T) per row, by torch.distributions (independent of the library's formula)."""
    return torch.distributions.Categorical(logits=logits.double() / temperature).entropy().tolist()


# ---------------------------------------------------------------------------------------------- EntropyTable


def test_the_entropy_table_is_shared_through_its_file_and_sized_by_its_layout(tmp_path):
    path = str(tmp_path / "t.entropy")
    client = EntropyTable(path, rows=3, width=4)
    assert os.path.getsize(path) == 8 * (2 + 2 * 3) + 4 * 3 * 4  # header, tags, counts, float32 values
    worker = EntropyTable(path)  # the worker opens it by path
    assert (worker.rows, worker.width) == (3, 4)
    client.claim(1, tag=7)
    worker.write(1, 7, 0, 0.5)
    worker.write(1, 7, 2, 1.5)
    assert client.read(1, 10) == [0.5, 0.0, 1.5] and client.read(1, 2) == [0.5, 0.0]
    worker.write(1, 7, 1, 0.25)  # an earlier position: the count stays at the furthest one
    assert client.read(1, 10) == [0.5, 0.25, 1.5]
    worker.write(1, 7, 4, 9.0)  # past the width: ignored
    assert client.read(1, 10) == [0.5, 0.25, 1.5] and client.read(0, 10) == []
    worker.close()
    assert os.path.exists(path)  # the worker's close leaves the file to its owner
    client.close(unlink=True)
    assert not os.path.exists(path)
    client.close(unlink=True)  # closed and gone already: nothing to do


def test_a_released_row_takes_no_write_from_its_old_request_and_a_new_claim_starts_empty(tmp_path):
    """The tag guards a row handed to the next request: the previous request's late writes never land in it."""
    path = str(tmp_path / "t.entropy")
    client, worker = EntropyTable(path, rows=2, width=4), EntropyTable(path)
    client.claim(0, tag=1)
    worker.write(0, 1, 0, 0.5)
    worker.write(0, 2, 1, 7.0)  # another request's tag: ignored
    assert client.read(0, 4) == [0.5]
    client.release(0)
    worker.write(0, 1, 1, 7.0)  # the released request, late
    assert int(client.counts[0]) == 1 and client.values[0, 1] == 0.0
    client.claim(0, tag=3)
    assert client.read(0, 4) == []  # the count restarts, whatever the old values
    worker.write(0, 1, 0, 7.0)
    worker.write(0, 3, 0, 2.0)
    assert client.read(0, 4) == [2.0]
    worker.close()
    client.close(unlink=True)


def test_closing_a_table_whose_values_are_still_viewed_leaves_the_map_to_the_collector(tmp_path):
    path = str(tmp_path / "t.entropy")
    table = EntropyTable(path, rows=1, width=2)
    alive = table.values[0]  # a numpy view keeps the map's buffer exported
    table.close(unlink=True)  # must not raise BufferError
    assert not os.path.exists(path) and alive.shape == (2,)


def test_the_table_client_hands_out_rows_by_width_reuses_released_ones_and_unlinks_at_close(tmp_path):
    tables = _EntropyTables(str(tmp_path))
    first, spec = tables.claim(10)  # the narrowest table is 64 tokens wide
    assert (first.table.width, first.row, spec["row"], spec["tag"], spec["tokens"]) == (64, 0, 0, 1, 10)
    assert spec["table"] == first.table.path and os.path.dirname(spec["table"]) == str(tmp_path)
    wide, spec = tables.claim(100)  # too wide for the first: a new table, the next power of two
    assert (wide.table.width, wide.row, spec["tag"], len(tables.tables)) == (128, 0, 2, 2)
    exact, _ = tables.claim(64)  # fits the first table exactly
    assert (exact.table, exact.row) == (first.table, 1)
    assert (tables.claim(65)[0].table, tables.claim(1)[0].table) == (wide.table, first.table)
    assert int(first.table.tags[0]) == 1
    tables.release(first)
    assert int(first.table.tags[0]) == 0 and first.table.tags[1:3].tolist() == [3, 5]  # only its own row
    again, spec = tables.claim(5)
    assert (again.table, again.row, spec["tag"]) == (first.table, 0, 6)  # the freed row, a fresh tag
    for _ in range(256 - 3):  # fill the first table (rows 0, 1 and 2 are taken)
        tables.claim(5)
    full, _ = tables.claim(5)
    assert (full.table, full.row) == (wide.table, 2)  # any table wide enough with a free row
    paths = [t.path for t in tables.tables]
    tables.close()
    assert tables.tables == [] and tables.free == [] and not any(os.path.exists(p) for p in paths)


def test_the_entropy_tables_file_layout_is_the_documented_one(tmp_path):
    """Client and worker are separate processes that share only the file: int64 rows and width, int64 tags, int64
    counts, then float32 values, row-major."""
    import numpy as np

    path = str(tmp_path / "t.entropy")
    table = EntropyTable(path, rows=3, width=4)
    table.claim(1, tag=7)
    table.write(1, 7, 2, 0.5)
    with open(path, "rb") as f:
        raw = f.read()
    assert np.frombuffer(raw, dtype="<i8", count=2).tolist() == [3, 4]
    assert np.frombuffer(raw, dtype="<i8", count=3, offset=16).tolist() == [0, 7, 0]
    assert np.frombuffer(raw, dtype="<i8", count=3, offset=40).tolist() == [0, 3, 0]
    values = np.frombuffer(raw, dtype="<f4", count=12, offset=64).reshape(3, 4)
    assert values.tolist() == [[0.0] * 4, [0.0, 0.0, 0.5, 0.0], [0.0] * 4]
    table.close(unlink=True)


@pytest.mark.parametrize("tokens, width", [(1, 64), (64, 64), (65, 128), (128, 128), (129, 256), (1000, 1024)])
def test_a_new_table_is_the_next_power_of_two_wide_enough_and_at_least_64(tmp_path, tokens, width):
    tables = _EntropyTables(str(tmp_path))
    slot, _ = tables.claim(tokens)
    assert slot.table.width == width
    tables.close()


def test_two_engines_in_one_process_get_tables_of_their_own(tmp_path):
    first, second = _EntropyTables(str(tmp_path)), _EntropyTables(str(tmp_path))
    a, spec_a = first.claim(8)
    b, spec_b = second.claim(8)
    assert spec_a["table"] != spec_b["table"] and (spec_a["row"], spec_b["row"]) == (0, 0)
    first.close()
    assert os.path.exists(spec_b["table"])
    second.close()


@pytest.mark.parametrize("find, available", [(None, False), ("namespace", False), ("module", True)])
def test_vllm_available_asks_for_vllm_and_refuses_a_bare_namespace_package(monkeypatch, find, available):
    """Under pytest, a `tests/vllm` folder on sys.path is an empty namespace package named vllm: no origin."""
    import importlib.machinery
    import importlib.util

    asked = []

    def find_spec(name, *args):
        asked.append(name)
        if find is None:
            return None
        return importlib.machinery.ModuleSpec(name, None, origin=None if find == "namespace" else "/x/vllm/__init__.py")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert vllm_available() is available and asked == ["vllm"]


# ---------------------------------------------------------------------------------------------- engine process


def test_environ_sets_and_removes_variables_for_the_block_and_restores_them_after_an_error(monkeypatch):
    monkeypatch.setenv("ARPO_TEST_SET", "before")
    monkeypatch.delenv("ARPO_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError, match="inside"), _environ(ARPO_TEST_SET=None, ARPO_TEST_NEW="x"):
        assert "ARPO_TEST_SET" not in os.environ and os.environ["ARPO_TEST_NEW"] == "x"
        raise RuntimeError("inside")
    assert os.environ["ARPO_TEST_SET"] == "before" and "ARPO_TEST_NEW" not in os.environ
    with _environ(ARPO_TEST_SET="during"):
        assert os.environ["ARPO_TEST_SET"] == "during"
    assert os.environ["ARPO_TEST_SET"] == "before"


def test_the_script_is_not_reimported_by_spawned_children_and_main_stays_readable(monkeypatch):
    import inspect
    import multiprocessing.spawn as spawn
    import threading

    original = spawn.get_preparation_data
    script = types.ModuleType("__main__")
    spec = types.SimpleNamespace(name="train")
    script.__file__, script.__spec__ = "/work/train.py", spec
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert spawn.get_preparation_data("p")["init_main_from_name"] == "train"
    with pytest.raises(RuntimeError, match="start failed"), _main_not_reimported():
        data = spawn.get_preparation_data("p")
        assert "init_main_from_name" not in data and "init_main_from_path" not in data
        assert data["sys_path"] == original("p")["sys_path"]  # the rest of the data is multiprocessing's own
        # `__main__` itself is untouched (vLLM's start reads it through `inspect` when its cache is empty).
        assert (script.__file__, script.__spec__) == ("/work/train.py", spec)
        inspect.getframeinfo(sys._getframe())
        raise RuntimeError("start failed")
    assert spawn.get_preparation_data is original
    script.__spec__ = None  # run as a file: the path is what the child would run
    assert spawn.get_preparation_data("p")["init_main_from_path"] == "/work/train.py"
    with _main_not_reimported():
        assert "init_main_from_path" not in spawn.get_preparation_data("p")
    assert spawn.get_preparation_data is original
    # Starts from several threads overlap: multiprocessing's own comes back only when the last one ends.
    entered, release = threading.Barrier(3), threading.Event()

    def start() -> None:
        with _main_not_reimported():
            entered.wait()
            release.wait()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    entered.wait()
    with _main_not_reimported():
        pass
    assert "init_main_from_path" not in spawn.get_preparation_data("p")  # the other two are still starting
    release.set()
    for thread in threads:
        thread.join()
    assert spawn.get_preparation_data is original
    monkeypatch.delitem(sys.modules, "__main__")
    with _main_not_reimported():  # embedded interpreters may have none
        pass


# ---------------------------------------------------------------------------------------------- vLLM outputs


def _request_output(ids, logprobs, finished, reason=None, stop_reason=None, cached=None):
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    positions = None if logprobs is None else [{t: Logprob(lp) for t, lp in pos.items()} for pos in logprobs]
    completion = CompletionOutput(index=0, text="", token_ids=ids, cumulative_logprob=None, logprobs=positions,
                                  finish_reason=reason, stop_reason=stop_reason)  # fmt: skip
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                         outputs=[completion], finished=finished, num_cached_tokens=cached)  # fmt: skip


@needs_vllm
def test_an_engine_output_becomes_a_stream_update_with_the_sampled_tokens_logprobs_and_top_k_only_when_asked():
    from arpo_trl.rollout.vllm_engine import _to_update

    positions = [{5: -0.25, 9: -2.0}, {9: -1.5, 6: -0.5}]  # the sampled token is not always listed first
    out = _request_output([5, 6], positions, finished=False, cached=32)
    assert _to_update(out, top_logprobs=0) == StreamUpdate([5, 6], [-0.25, -0.5], False, None, 32, [])
    assert _to_update(out, top_logprobs=2).top_logprobs == positions
    unlogged = _to_update(_request_output([5], None, finished=False), top_logprobs=0)
    assert (unlogged.token_ids, unlogged.logprobs, unlogged.num_cached_tokens) == ([5], [], 0)


@needs_vllm
@pytest.mark.parametrize(
    "reason, stop_reason, finished, ours",
    [
        ("stop", "</calc>", True, "stop"),  # a stop string
        ("stop", None, True, "eos"),  # the EOS token
        ("stop", 7, True, "eos"),  # a stop token id
        ("length", None, True, "length"),
        ("abort", None, True, "abort"),
        ("stop", "</calc>", False, None),  # not finished: no reason yet
    ],
)
def test_vllms_finish_reasons_map_to_the_trees(reason, stop_reason, finished, ours):
    from arpo_trl.rollout.vllm_engine import _to_update

    update = _to_update(_request_output([5], [{5: -0.1}], finished, reason, stop_reason), top_logprobs=0)
    assert (update.finished, update.finish_reason) == (finished, ours)


# ---------------------------------------------------------------------------------------------- EntropyProcessor


def _spec(path, row, tag, tokens):
    return {"table": path, "row": row, "tag": tag, "tokens": tokens}


def _params(temperature, spec=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, extra_args=None if spec is None else {EXTRA_ARGS_KEY: spec})


def _update(size, removed=(), added=(), moved=()):
    from vllm.v1.sample.logits_processor import BatchUpdate

    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


@pytest.fixture
def processor_and_table(tmp_path):
    from arpo_trl.rollout.vllm_worker import EntropyProcessor

    path = str(tmp_path / "t.entropy")
    table = EntropyTable(path, rows=4, width=8)
    for row in range(4):
        table.claim(row, tag=10 + row)
    processor = EntropyProcessor(None, torch.device("cpu"), False)
    yield processor, table, path
    table.close(unlink=True)


@needs_vllm
def test_the_processor_records_each_opted_in_requests_first_tokens_at_its_temperature(processor_and_table):
    """Rows 0 and 2 opt in (T = 0.5, and greedy, which reads T = 1); row 1 does not. vLLM's running output lists
    say which token each step samples; past `tokens` a request is dropped. The logits are never changed."""
    from arpo_trl.rollout.vllm_worker import STATS, EntropyProcessor

    processor, table, path = processor_and_table
    assert processor.is_argmax_invariant() is False  # else vLLM skips it for greedy batches
    a_out, b_out = [], []
    processor.update_state(_update(3, added=[
        (0, _params(0.5, _spec(path, 0, 10, tokens=3)), [1, 2], a_out),
        (1, _params(1.0), [1], []),
        (2, _params(0.0, _spec(path, 1, 11, tokens=2)), [3], b_out),
    ]))  # fmt: skip
    torch.manual_seed(0)
    steps = []
    stats = dict(STATS)
    for _ in range(3):
        logits = torch.randn(3, 50) * 3
        kept = logits.clone()
        assert processor.apply(logits) is logits and torch.equal(logits, kept)
        steps.append(kept)
        a_out.append(1)
        b_out.append(1)
    assert table.read(0, 8) == pytest.approx([reference_entropy(s[0:1], 0.5)[0] for s in steps], rel=1e-5, abs=1e-6)
    assert table.read(1, 8) == pytest.approx([reference_entropy(s[2:3])[0] for s in steps[:2]], rel=1e-5, abs=1e-6)
    assert table.read(2, 8) == []  # nobody's row: the request that did not opt in writes nothing
    assert (STATS["steps"] - stats["steps"], STATS["rows"] - stats["rows"]) == (3, 5)
    processor.apply(torch.randn(3, 50))  # both windows complete: dropped, nothing written
    assert processor._rows == {} and table.read(0, 8) == table.read(0, 3)
    assert STATS["steps"] - stats["steps"] == 4
    processor.apply(torch.randn(3, 50))  # no tracked row: not even timed
    assert STATS["steps"] - stats["steps"] == 4
    assert EntropyProcessor.validate_params(_params(1.0)) is None
    assert EntropyProcessor.validate_params(_params(1.0, _spec(path, 0, 1, 2))) is None
    with pytest.raises(ValueError, match=r"^extra_args\['arpo_entropy'\] needs table, row, tag and tokens, got "):
        EntropyProcessor.validate_params(_params(1.0, {"table": path, "row": 0}))


@needs_vllm
def test_the_processor_follows_vllms_batch_moves_removals_and_replacements(processor_and_table):
    """vLLM reorders its persistent batch: removed, then added (which may take an index), then moved (one way, or
    swapped). Each request's entropies must keep landing in its own table row."""
    from vllm.v1.sample.logits_processor import MoveDirectionality

    processor, table, path = processor_and_table
    outs = [[], [], [], []]
    processor.update_state(_update(3, added=[
        (i, _params(1.0, _spec(path, i, 10 + i, tokens=6)), [1], outs[i]) for i in range(3)
    ]))  # fmt: skip
    expected = {row: [] for row in range(4)}

    def step(size, at):  # `at[index] = table row` of the request now at that batch index
        logits = torch.randn(size, 40) * 2
        processor.apply(logits)
        for index, row in at.items():
            expected[row].append(reference_entropy(logits[index : index + 1])[0])
            outs[row].append(1)

    step(3, {0: 0, 1: 1, 2: 2})
    processor.update_state(_update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    step(3, {0: 2, 1: 1, 2: 0})
    processor.update_state(_update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    step(2, {0: 2, 1: 0})
    # The request at index 0 finished; a new one takes its index, with 2 tokens already sampled (table row 3).
    outs[3] = [1, 1]
    replacement = (0, _params(1.0, _spec(path, 3, 13, tokens=6)), [1], outs[3])
    processor.update_state(_update(2, removed=[0], added=[replacement]))
    step(2, {0: 3, 1: 0})
    # A step whose logits cover fewer rows: index 1 is skipped (still tracked), index 0 is recorded.
    step(1, {0: 3})
    assert sorted(processor._rows) == [0, 1]
    recorded = table.read(3, 8)
    assert recorded[:2] == [0.0, 0.0] and recorded[2:] == pytest.approx(expected[3], rel=1e-5, abs=1e-6)
    for row in range(3):
        assert table.read(row, 8) == pytest.approx(expected[row], rel=1e-5, abs=1e-6), row
    assert [len(expected[row]) for row in range(3)] == [4, 2, 3]
    # A request whose window is already complete, or one with no sampling params, is not tracked.
    processor.update_state(_update(3, added=[(2, _params(1.0, _spec(path, 2, 12, tokens=1)), [1], [4]),
                                             (1, None, [1], [])]))  # fmt: skip
    assert sorted(processor._rows) == [0]
    processor.update_state(None)  # a step without changes
    assert sorted(processor._rows) == [0]


@needs_vllm
def test_scaled_entropy_equals_the_distributions_entropy_per_row_with_masked_tokens():
    from arpo_trl.rollout.vllm_worker import scaled_entropy

    spread, shift = torch.tensor([[1.0], [10.0], [100.0], [0.1]]), torch.tensor([[0.0], [50.0], [-80.0], [3.0]])
    logits = torch.randn(4, 30) * spread + shift
    logits[1, :5] = float("-inf")
    scale = torch.tensor([[1.0], [0.5], [2.0], [1 / 0.7]])
    got = scaled_entropy(logits.clone(), scale).tolist()
    want = [reference_entropy(logits[i : i + 1] * scale[i], 1.0)[0] for i in range(4)]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@needs_vllm
def test_the_processor_pairs_rows_by_batch_index_whatever_order_they_came_in(processor_and_table):
    """Requests added at indices 0, 2, 1, 3 (in that order) fill a contiguous run: each must still get its own
    row's entropy."""
    processor, table, path = processor_and_table
    order = [0, 2, 1, 3]
    processor.update_state(_update(4, added=[(i, _params(1.0, _spec(path, i, 10 + i, tokens=4)), [1], [])
                                             for i in order]))  # fmt: skip
    logits = torch.randn(4, 40) * torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    processor.apply(logits)
    for i in range(4):
        assert table.read(i, 8) == pytest.approx(reference_entropy(logits[i : i + 1]), rel=1e-5, abs=1e-6), i
    assert processor._table(path) is processor._table(path)  # each table file mapped once per worker


@needs_vllm
def test_the_processor_survives_untracked_removals_and_moves_and_drops_what_a_move_overwrites(processor_and_table):
    from vllm.v1.sample.logits_processor import MoveDirectionality

    processor, table, path = processor_and_table
    processor.update_state(_update(4, added=[
        (0, _params(1.0, _spec(path, 0, 10, tokens=4)), [1], []),
        (1, _params(1.0), [1], []),  # not opted in
        (2, _params(1.0, _spec(path, 2, 12, tokens=4)), [1], []),
    ]))  # fmt: skip
    processor.update_state(_update(4, removed=[3]))  # nothing tracked there: no error
    processor.update_state(_update(4, moved=[(1, 3, MoveDirectionality.UNIDIRECTIONAL)]))  # untracked: no error
    assert sorted(processor._rows) == [0, 2]
    processor.update_state(_update(4, moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))  # overwrites index 0
    assert sorted(processor._rows) == [0] and processor._rows[0].row == 2
    logits = torch.randn(4, 40)
    processor.apply(logits)
    assert table.read(0, 8) == [] and table.read(2, 8) == pytest.approx(reference_entropy(logits[0:1]), abs=1e-6)
    processor.update_state(_update(1, removed=[0]))
    assert processor._rows == {}


@needs_vllm
def test_the_processor_adds_up_its_time(processor_and_table, monkeypatch):
    from arpo_trl.rollout.vllm_worker import STATS

    processor, _, path = processor_and_table
    monkeypatch.setitem(STATS, "seconds", 100.0)
    processor.update_state(_update(1, added=[(0, _params(1.0, _spec(path, 0, 10, tokens=4)), [1], [])]))
    processor.apply(torch.randn(1, 40))
    assert 100.0 < STATS["seconds"] < 160.0
