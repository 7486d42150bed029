"""vLLM starts on a machine whose vLLM cache is empty (a new machine, container or cluster job).

With no cached description of the model's architecture, vLLM inspects the model class in the engine's parent
process, which imports `vllm._custom_ops`, whose `torch.library.register_fake` reads the caller's source through
`inspect`: anything done to `__main__` while the engine starts must leave it readable. An earlier run that cached
the architecture hides such a fault, so the engine here starts in a subprocess whose environment is built from
scratch: an empty home, an empty `VLLM_CACHE_ROOT`, nothing inherited but the path to the interpreter.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from vllm_helpers import cached_architectures, fresh_env, prompt_ids

# Guarded, as vLLM's docs ask: this is the colocated start every `use_vllm=True` trainer makes.
SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from arpo_trl.rollout.vllm_engine import VLLMEngine

    async def generate(engine, prompt):
        return [t for u in [u async for u in engine.stream("cold", prompt, 6, None)] for t in u.token_ids]

    if __name__ == "__main__":
        engine = VLLMEngine(sys.argv[1], temperature=0.0, max_model_len=256, kv_cache_gib=0.25)
        print("TOKENS", json.dumps(engine.run(generate(engine, json.loads(sys.argv[2])))))
        engine.shutdown()
    """
)


def test_the_engine_starts_with_an_empty_vllm_cache(model_dir, tokenizer, hf_model, tmp_path):
    env = fresh_env(tmp_path)
    cache_root = Path(env["VLLM_CACHE_ROOT"])
    assert not cache_root.exists()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    prompt = prompt_ids(tokenizer, 3, 4, 5)
    proc = subprocess.run([sys.executable, str(script), model_dir, json.dumps(prompt)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is a built-in module" not in proc.stderr
    # The start took the cold path: vLLM inspected the architecture and cached what it found.
    assert cached_architectures(cache_root) == ["LlamaForCausalLM"]
    # And the engine it started serves the model: greedy tokens equal transformers' greedy continuation.
    tokens = json.loads(proc.stdout.split("TOKENS", 1)[1])
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    assert tokens == want.tolist()
