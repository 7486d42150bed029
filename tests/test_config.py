import pytest
from trl import GRPOConfig

from arpo_trl import ARPOConfig
from arpo_trl.rollout.vllm_engine import vllm_available

BASE = dict(
    output_dir="/tmp/arpo-test-config",
    per_device_train_batch_size=8,
    num_generations=4,
    use_cpu=True,
    bf16=False,
    report_to="none",
)


def test_defaults_follow_the_paper_and_the_issue():
    c = ARPOConfig(**BASE)
    # N unset: the trainer resolves it, M // 2 with tools, M without
    assert c.initial_rollouts is None
    assert (c.resolve_initial_rollouts(has_tools=True), c.resolve_initial_rollouts(has_tools=False)) == (2, 4)
    assert (c.branch_factor, c.entropy_window) == (1, 20)
    assert (c.branch_base_probability, c.branch_entropy_weight) == (0.5, 0.2)
    assert (c.entropy_timing, c.advantage_attribution, c.rollout_fill, c.tool_format) == (
        "after_tool",
        "soft",
        "fresh",
        "tags",
    )


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(initial_rollouts=5), "initial_rollouts"),
        (dict(initial_rollouts=0), "initial_rollouts"),
        (dict(entropy_window=0), "entropy_window"),
        (dict(branch_factor=0), "branch_factor"),
        (dict(branch_base_probability=1.5), "branch_base_probability"),
        (dict(branch_base_probability=-0.1), "branch_base_probability"),
        (dict(branch_threshold=2.0), "branch_threshold"),
        (dict(entropy_timing="before"), "entropy_timing"),
        (dict(advantage_attribution="medium"), "advantage_attribution"),
        (dict(rollout_fill="copy"), "rollout_fill"),
        (dict(tool_format="json"), "tool_format"),
        (dict(branch_rule="always"), "branch_rule"),
        (dict(entropy_normalization="max"), "entropy_normalization"),
        (dict(tool_timeout=0), "tool_timeout"),
        (dict(generation_kwargs={"temperature": 0.5}), r"generation_kwargs\['temperature'\]"),
        (dict(generation_kwargs={"num_beams": 4}), r"generation_kwargs\['num_beams'\]"),
        (dict(generation_kwargs='{"num_return_sequences": 2}'), r"generation_kwargs\['num_return_sequences'\]"),
        (dict(generation_kwargs={"prompt_lookup_num_tokens": 3}), "generation_kwargs"),
        (dict(generation_kwargs={"return_dict_in_generate": True}), "generation_kwargs"),
        (dict(use_transformers_continuous_batching=True), "use_transformers_continuous_batching"),
    ],
)
def test_bad_config_fails_at_construction_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        ARPOConfig(**{**BASE, **override})


def test_group_straddling_two_processes_is_refused(monkeypatch):
    # 2 processes × 6 rows = 12 rows per generation batch: TRL accepts it (12 % 4 == 0), but each process would
    # hold 6 rows, one and a half groups of M = 4, and ARPO forks inside a group.
    monkeypatch.setattr(ARPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="multiple of num_generations"):
        ARPOConfig(**{**BASE, "per_device_train_batch_size": 6, "num_generations": 4})


def test_use_vllm_without_vllm_installed_says_how_to_install(monkeypatch):
    import arpo_trl.rollout.vllm_engine as vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match=r"use_vllm=True: vLLM is not installed: install it with `make install`"):
        ARPOConfig(**BASE, use_vllm=True)


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make install brings the CPU build)")
def test_vllm_settings_arpo_cannot_honour_are_refused():
    server = ARPOConfig(**BASE, use_vllm=True, vllm_mode="server")
    assert (server.entropy_estimator, ARPOConfig(**BASE).entropy_estimator) == ("top_k", "exact")
    with pytest.raises(ValueError, match="a vLLM server returns logprobs only: use entropy_estimator='top_k'"):
        ARPOConfig(**BASE, use_vllm=True, vllm_mode="server", entropy_estimator="exact")
    assert ARPOConfig(**BASE, use_vllm=True, vllm_mode="colocate", speculative_forks=True).speculative_forks
    assert ARPOConfig(**BASE, entropy_estimator="top_k").entropy_estimator == "top_k"  # both backends
    assert ARPOConfig(**BASE, use_vllm=True, vllm_mode="colocate").use_vllm


def test_grpo_config_upgrades_with_arpo_defaults():
    g = GRPOConfig(**BASE, learning_rate=3e-6)
    a = ARPOConfig.from_grpo_config(g)
    assert isinstance(a, ARPOConfig) and a.learning_rate == 3e-6 and a.initial_rollouts is None
    assert a.steps_per_generation == g.steps_per_generation
    assert a.tool_format == "chat_template"  # the swapped GRPOTrainer's tool calls keep their format


def test_yaml_recipe_parses_into_arpo_config(tmp_path):
    from trl import TrlParser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "output_dir: /tmp/x\nnum_generations: 4\nper_device_train_batch_size: 4\n"
        "initial_rollouts: 1\nadvantage_attribution: hard\nuse_cpu: true\nbf16: false\n"
    )
    (config,) = TrlParser((ARPOConfig,)).parse_args_and_config(["--config", str(recipe), "--branch_factor", "2"])
    assert (config.initial_rollouts, config.advantage_attribution, config.branch_factor) == (1, "hard", 2)


def test_speculative_forks_need_after_tool_timing():
    with pytest.raises(ValueError, match="speculative_forks=True needs entropy_timing='after_tool'"):
        ARPOConfig(**BASE, speculative_forks=True, entropy_timing="lagged")
    assert ARPOConfig(**BASE, speculative_forks=True, rollout_fill="speculative").speculative_forks


def test_harmless_generation_kwargs_are_kept():
    c = ARPOConfig(**BASE, temperature=0.7, generation_kwargs={"temperature": 0.7, "suppress_tokens": [3]})
    assert c.generation_kwargs["suppress_tokens"] == [3]
