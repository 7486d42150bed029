"""`make bench`'s transformers benchmark runs end to end: its probes wrap library functions (the model's generate,
the tool executor, the tree's fill), so a change of their signatures must not break it unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_transformers_benchmark_runs_and_measures_both_trainers(tmp_path, tool_model_state):
    cmd = [sys.executable, str(REPO / "bench" / "arpo_vs_grpo.py"), "--trainers", "grpo-tags,arpo-tags",
           "--steps", "2", "--prompts-per-step", "1", "--no-plot", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    medians = json.loads((tmp_path / "arpo_vs_grpo.json").read_text())["medians"]
    for name in ("grpo-tags", "arpo-tags"):
        m = medians[name]
        assert m["generate_calls"] >= 2 and m["generate_s"] > 0 and m["tools_s"] > 0  # every probe saw its calls
        assert m["tool_executions_per_completion"] > 0 and 0 < m["rollout_s"] < m["step_s"]
    assert medians["grpo-tags"]["branches_per_group"] == 0 < medians["arpo-tags"]["branches_per_group"]
