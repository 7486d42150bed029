"""A user's script that starts the engine at top level, with no `if __name__ == "__main__":` guard (as most TRL
scripts are written: TRL's colocated engine spawns no process), must run: vLLM spawns its engine process, and
`spawn` would otherwise run the script again inside it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from arpo_trl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(sys.argv[1], temperature=0.0, max_model_len=256, kv_cache_gib=0.25)

    async def generate():
        return [t for u in [u async for u in engine.stream("top-level", [1, 2, 3], 5, None)] for t in u.token_ids]

    print("TOKENS", len(engine.run(generate())))
    engine.shutdown()
    """
)


def test_a_script_without_a_main_guard_starts_the_engine(model_dir, tmp_path):
    script = tmp_path / "train_like_trl.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(model_dir)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS 5" in proc.stdout
    assert "bootstrapping phase" not in proc.stderr
