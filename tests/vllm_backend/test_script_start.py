"""A user's script that starts the engine at top level, with no `if __name__ == "__main__":` guard (as most TRL
scripts are written: TRL's colocated engine spawns no process), must run: vLLM spawns its engine process, and
`spawn` would otherwise run the script again inside it. It runs as on a fresh machine (an empty home and vLLM cache),
where vLLM inspects the model class while the engine starts, so hiding the script must not break that."""

import subprocess
import sys
import textwrap
from pathlib import Path

from vllm_helpers import cached_architectures, fresh_env

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
    env = fresh_env(tmp_path)
    proc = subprocess.run([sys.executable, str(script), str(model_dir)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS 5" in proc.stdout
    assert "bootstrapping phase" not in proc.stderr
    assert cached_architectures(Path(env["VLLM_CACHE_ROOT"])) == ["LlamaForCausalLM"]  # the cold path ran
