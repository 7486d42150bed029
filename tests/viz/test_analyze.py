"""`arpo-analyze entropy` on the tiny tool-calling model: its numbers against a direct computation from logits."""

import json
import math
import sys
import types

import pytest
from PIL import Image

from arpo_trl.viz.analyze import load_model, load_questions, main, make_tools
from arpo_trl.viz.sampling import teacher_forced_entropies

K = 4


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory, tool_model_state):  # tool_model_state: the fixture model is built (cached) first
    out = tmp_path_factory.mktemp("entropy")
    argv = ["entropy", "--model", "fixture:tiny-calc", "--dataset", "fixture:calc", "--tools", "calc",
            "--num-prompts", "3", "--samples", "2", "--max-new-tokens", "48", "--max-tool-calls", "2",
            "--window", str(K), "--out", str(out), "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    return out, strict_json((out / "entropy.json").read_text(encoding="utf-8"))


def test_writes_a_png_and_strict_json(analysis):
    out, report = analysis
    with Image.open(out / "entropy.png") as image:
        image.verify()
    with Image.open(out / "entropy.png") as image:
        assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 300
    assert len(report["trajectories"]) == 6
    assert report["config"]["tools"] == ["calc"] and report["window"] == K
    assert report["summary"]["tool_results"] > 0  # the fixture model calls its tool
    for name in ("before_first_call", "after_result", "after_result_1", "later", "aligned"):
        assert name in report["curves"]


def test_entropies_match_a_teacher_forced_forward(analysis, viz_model):
    """Each sampled token's entropy (captured by the LM-head hook during batched, left-padded generation) equals
    H(softmax(z)) of the logits of one unpadded forward pass over prompt + completion."""
    _, report = analysis
    checked = 0
    for row in report["trajectories"]:
        ref = teacher_forced_entropies(viz_model, row["prompt_ids"], row["completion_ids"])
        for e, r, m in zip(row["entropies"], ref, row["tool_mask"]):
            if m:
                assert e == pytest.approx(r, abs=1e-4)
                checked += 1
            else:
                assert e is None  # tool-result tokens are not sampled
    assert checked > 50


def test_curves_match_a_direct_computation(analysis, viz_model):
    """Recompute the categories from scratch (teacher-forced entropies, result positions from the mask)."""
    _, report = analysis
    before, after0, after_window, later, h_init, deltas = [], [], [], [], [], []
    for row in report["trajectories"]:
        ent = teacher_forced_entropies(viz_model, row["prompt_ids"], row["completion_ids"])
        mask = row["tool_mask"]
        sampled = [i for i, m in enumerate(mask) if m]
        h0 = sum(ent[i] for i in sampled[:K]) / len(sampled[:K])
        h_init.append(h0)
        resumes = [i for i in range(1, len(mask)) if mask[i - 1] == 0 and mask[i] == 1]
        if "result_spans" in row and row["result_spans"]:
            first_result = row["result_spans"][0][0]
            before += [ent[i] for i in sampled if i < first_result]
        for r, start in enumerate(resumes):
            stop = resumes[r + 1] if r + 1 < len(resumes) else len(mask)
            post = [i for i in sampled if start <= i < stop and all(mask[j] for j in range(start, i + 1))]
            after0.append(ent[post[0]])
            after_window += [ent[i] for i in post[:K]]
            later += [ent[i] for i in post[K:]]
            deltas.append(sum(ent[i] for i in post[:K]) / len(post[:K]) - h0)
    curves, summary = report["curves"], report["summary"]
    assert curves["after_result"]["offset"][0] == 0
    assert curves["after_result"]["count"][0] == len(after0) == summary["tool_results"]
    assert curves["after_result"]["mean"][0] == pytest.approx(sum(after0) / len(after0), abs=1e-4)
    assert summary["after_result_mean"] == pytest.approx(sum(after_window) / len(after_window), abs=1e-4)
    assert summary["before_first_call_mean"] == pytest.approx(sum(before) / len(before), abs=1e-4)
    if later:
        assert summary["later_mean"] == pytest.approx(sum(later) / len(later), abs=1e-4)
    assert summary["h_initial_mean"] == pytest.approx(sum(h_init) / len(h_init), abs=1e-4)
    assert summary["delta_h_mean"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-4)
    # the aligned curve at offset 0 is the same set of tokens as after_result at offset 0
    aligned = dict(zip(curves["aligned"]["offset"], curves["aligned"]["mean"]))
    assert aligned[0] == pytest.approx(curves["after_result"]["mean"][0], abs=1e-9)
    assert min(curves["aligned"]["offset"]) == -K


def test_embedded_models_need_the_resolver(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "arpo_trl.models", None)  # as when issue 4's module is absent
    code = main(["entropy", "--model", "embedded:smollm2-135m-instruct", "--dataset", "fixture:calc",
                 "--tools", "calc", "--out", str(tmp_path)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "embedded:smollm2-135m-instruct" in err and "arpo_trl.models.resolve_model_path" in err


def test_embedded_resolves_to_a_local_hf_directory(monkeypatch, tmp_path, viz_model, tokenizer):
    saved = tmp_path / "hf-model"
    viz_model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    fake = types.ModuleType("arpo_trl.models")
    fake.resolve_model_path = lambda name: saved if name == "embedded:tiny" else None  # takes the full name
    monkeypatch.setitem(sys.modules, "arpo_trl.models", fake)
    model, tok = load_model("embedded:tiny", device="cpu")
    assert tok.padding_side == "left" and len(tok) == len(tokenizer)
    ids = [1, 2, 3, 4]
    assert teacher_forced_entropies(model, ids[:2], ids[2:]) == pytest.approx(
        teacher_forced_entropies(viz_model, ids[:2], ids[2:]), abs=1e-5
    )


def test_jsonl_questions_tools_and_bad_arguments(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2**10?"}\n\n{"question": "Is 97 prime?", "answer": "yes"}\n')
    tools = make_tools(["calc"], timeout=5)
    prompts = load_questions(str(data), 10, 0, None, tools)
    assert [p[1]["content"] for p in prompts] == ["What is 2**10?", "Is 97 prime?"]
    assert "<calc>" in prompts[0][0]["content"] and "<result>" in prompts[0][0]["content"]
    assert load_questions(str(data), 1, 0, "S", tools) == [[{"role": "system", "content": "S"}, prompts[0][1]]]
    fixture = load_questions("fixture:calc", 2, 0, None, tools)
    assert len(fixture) == 2 and fixture[0][1]["content"].startswith("Add ")
    from arpo_trl.prompts import DEMO_SYSTEM_PROMPT

    demo = load_questions("demo:arithmetic", 3, 0, None, tools)
    assert [p[0]["content"] for p in demo] == [DEMO_SYSTEM_PROMPT] * 3  # the prompt the cold start learnt
    assert all(p[1]["content"].startswith("Calculate ") for p in demo)
    assert demo != load_questions("demo:arithmetic", 3, 1, None, tools)  # --seed draws other problems
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no question field"}\n')
    for argv, message in [
        (["--dataset", str(bad), "--tools", "calc"], "'question'"),
        (["--dataset", str(tmp_path / "missing.jsonl"), "--tools", "calc"], "no such file"),
        (["--dataset", "fixture:calc", "--tools", "abacus"], "unknown tool 'abacus'"),
        (["--dataset", "fixture:calc", "--tools", "calc", "--model", str(tmp_path / "nope")], "not a directory"),
    ]:
        full = ["entropy", "--model", "fixture:tiny-calc", "--out", str(tmp_path / "o"), *argv]
        assert main(full) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_python_tool_is_the_sandboxed_interpreter():
    from arpo_trl.tools import PythonInterpreter, python_interpreter_available

    if not python_interpreter_available():
        pytest.skip("no sandbox here")
    (tool,) = make_tools(["python"], timeout=10)
    assert isinstance(tool, PythonInterpreter) and tool.sandboxed
    assert math.isclose(float(tool("print(2**0.5)")), 2**0.5, rel_tol=1e-9)
