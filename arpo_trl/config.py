"""`ARPOConfig`: TRL's `GRPOConfig` plus the knobs of ARPO's tree rollout and advantage attribution.

Paper symbols (Dong et al., arXiv 2507.19849, §3.1 and Algorithm 1):

=====  ==============================  ===========================
M      global rollout budget per prompt  `num_generations` (TRL's)
N      initial trajectory-level samples   `initial_rollouts`
Z      copies forked per branching decision  `branch_factor`
k      tokens whose entropy is measured    `entropy_window`
α      base branching probability          `branch_base_probability`
β      entropy weight                      `branch_entropy_weight`
τ      threshold of the paper's rule       `branch_threshold`
=====  ==============================  ===========================
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field

from trl import GRPOConfig

logger = logging.getLogger(__name__)

_CHOICES: dict[str, tuple[str, ...]] = {
    "entropy_timing": ("after_tool", "lagged"),
    "entropy_normalization": ("sum_lnV", "mean", "sum_V"),
    "branch_rule": ("bernoulli", "threshold", "aepo_official"),
    "advantage_attribution": ("soft", "hard"),
    "rollout_fill": ("fresh", "speculative", "duplicate", "sequential"),
    "tool_format": ("tags", "chat_template"),
    "call_limit_action": ("eos", "message"),
    "entropy_estimator": ("exact", "top_k"),
    "initial_entropy": ("per_root", "frozen_per_slot"),
    "empty_tool_call": ("error", "end"),
    "result_format": ("paper", "official"),
}
# rollout_preset="official": the official code's rollout (RUC-NLPIR/ARPO, docs/reproduction.md), knob by knob.
OFFICIAL_ROLLOUT = {
    "entropy_timing": "lagged",
    "rollout_fill": "sequential",
    "entropy_estimator": "top_k",
    "entropy_normalization": "sum_lnV",
    "entropy_window": 20,
    "branch_rule": "bernoulli",
    "branch_factor": 1,
    "initial_entropy": "frozen_per_slot",
    "call_limit_action": "eos",
    "call_limit_eos_trained": True,
    "empty_tool_call": "end",
    "result_format": "official",
    "speculative_forks": False,
}
# algorithm_preset: AEPO (arXiv 2510.14545; docs/aepo.md). A preset fills the fields still at their defaults.
AEPO_PRESETS: dict[str, dict[str, object]] = {
    # The paper's AEPO: all four parts on, with the official constants.
    "aepo": {
        "entropy_balanced_clipping": True,
        "entropy_advantage_coef": 0.2,
        "branch_penalty_rate": 0.05,
        "dynamic_rollouts": "paper",
    },
    # The released AEPO scripts as they run: ARPO's official rollout, AEPO's own branching rule and penalty, the
    # stop-gradient clip, the entropy-aware advantage off (their entropy was never computed: a no-op), no budget split
    # (both scripts set enable_dynamic_rollouts=False).
    "aepo_official": {
        "rollout_preset": "official",
        "branch_rule": "aepo_official",
        "branch_penalty_rate": 0.05,
        "entropy_balanced_clipping": True,
        "entropy_advantage_coef": 0.0,
        "dynamic_rollouts": None,
    },
}
# The loss types whose PPO clip AEPO's entropy-balanced clipping rewrites (the others have no hard upper clip).
AEPO_CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_SHAPE_CHANGING_GENERATION_KWARGS = {
    "assistant_model",
    "prompt_lookup_num_tokens",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "num_beam_groups",
}


@dataclass
class ARPOConfig(GRPOConfig):
    r"""Configuration of [`ARPOTrainer`]: everything [`trl.GRPOConfig`] takes, plus ARPO's rollout knobs.

    `num_generations` is ARPO's global budget **M**: every prompt ends with exactly M completions (N initial
    rollouts, branches forked after tool results, fresh rollouts filling what branching left unused), so TRL's
    group normalisation applies unchanged. `max_tool_calling_iterations` (TRL's) is the per-trajectory tool-call
    limit and `max_completion_length` (TRL's) bounds each completion, tool-result tokens included.

    Branching (paper Eq. 4–5): after tool result t, the entropy H_t of the first k sampled tokens is compared with
    the trajectory's initial entropy H_initial (its first k tokens, measured afresh every batch); with
    ΔH = H_t − H_initial normalised per `entropy_normalization`, Z copies fork with probability
    P_t = clip(α + β·ΔH, 0, 1) (`branch_rule="bernoulli"`, as the official code), or when α + β·ΔH > τ
    (`branch_rule="threshold"`, the paper's text). α = 0 and β = 0 never branch; α = 1 and β = 0 always branch.
    """

    initial_rollouts: int | None = field(
        default=None,
        metadata={
            "help": "N: trajectory-level rollouts started per prompt (1 ≤ N ≤ M). Default (None): M // 2 when the "
            "trainer has tools or environments, M without (nothing to branch on, so every rollout starts at once). "
            "The trainer resolves it: `ARPOTrainer.initial_rollouts`."
        },
    )
    branch_factor: int = field(
        default=1,
        metadata={"help": "Z: copies forked per branching decision (the official beam_size − 1)."},
    )
    entropy_window: int = field(
        default=20,
        metadata={"help": "k: number of sampled tokens whose entropy forms H_initial and H_t."},
    )
    branch_base_probability: float = field(
        default=0.5,
        metadata={"help": "α: base branching probability, in [0, 1]."},
    )
    branch_entropy_weight: float = field(
        default=0.2,
        metadata={"help": "β: weight of the entropy change ΔH in the branching probability."},
    )
    branch_rule: str = field(
        default="bernoulli",
        metadata={
            "help": "'bernoulli': fork with probability clip(α + β·ΔH, 0, 1) (official code); "
            "'threshold': fork when α + β·ΔH > τ (paper text); 'aepo_official': the official AEPO code, fork when "
            "clip((u + β·ΔH)·(1 − P̂(c)), 0, 1) ≥ α with u ~ U(0, 1), where α is a threshold (higher α, fewer forks: "
            "the opposite sense to ARPO's; the two agree only at α = 0.5). With branch_penalty_rate λ > 0 the other "
            "rules multiply α + β·ΔH by 1 − P̂(c) (AEPO paper).",
            "choices": list(_CHOICES["branch_rule"]),
        },
    )
    branch_threshold: float = field(
        default=0.5,
        metadata={"help": "τ: threshold of branch_rule='threshold'."},
    )
    entropy_timing: str = field(
        default="after_tool",
        metadata={
            "help": "'after_tool': decide on the k tokens generated after tool result t (paper); "
            "'lagged': decide on the segment generated before it (official code; docs/reproduction.md).",
            "choices": list(_CHOICES["entropy_timing"]),
        },
    )
    entropy_normalization: str = field(
        default="sum_lnV",
        metadata={
            "help": "How a window's token entropies become H: 'sum_lnV' = sum over the window / ln V (official "
            "code; β=0.2 was tuned on this scale), 'mean' = mean in nats, 'sum_V' = sum / V (paper's literal "
            "formula; makes ΔH tiny).",
            "choices": list(_CHOICES["entropy_normalization"]),
        },
    )
    advantage_attribution: str = field(
        default="soft",
        metadata={
            "help": "'soft': GRPO advantages over the M rows (shared prefixes appear in each row); 'hard': a token "
            "whose whole prefix is shared by d rows of its group gets the mean of their d advantages.",
            "choices": list(_CHOICES["advantage_attribution"]),
        },
    )
    rollout_fill: str = field(
        default="fresh",
        metadata={
            "help": "Budget left unused by branching: 'fresh' = top up with trajectory-level rollouts from the "
            "prompt once the group's tree can no longer branch (paper); 'sequential' = one fresh rollout at a time "
            "while the group has nothing live, each allowed to branch (the official loop); 'speculative' = start "
            "those fresh rollouts with the "
            "roots, in the free slots, and discard the one whose slot a branch needs (same distribution as 'fresh', "
            "fewer generation rounds, more tokens sampled); 'duplicate' = repeat the group's last trajectory "
            "(official padding, reproduction only).",
            "choices": list(_CHOICES["rollout_fill"]),
        },
    )
    speculative_forks: bool = field(
        default=False,
        metadata={
            "help": "With entropy_timing='after_tool': sample Z copies of the state after each tool result beside the "
            "parent's continuation (in the same round; with use_vllm, as requests started with it), keep them if the "
            "decision forks, else discard them. Same distribution as forking at the decision, without waiting for "
            "the k tokens it reads; more tokens sampled."
        },
    )
    entropy_estimator: str | None = field(
        default=None,
        metadata={
            "help": "How each token's entropy H is measured: 'exact' = over the whole vocabulary at the sampling "
            "temperature (paper Eq. 3); 'top_k' = the official code's truncated estimate, Σ −p·ln p over the 10 "
            "most likely tokens plus the sampled one, at the sampling temperature. Unset: 'exact', except with "
            "vllm_mode='server', whose server computes no exact entropy ('top_k').",
            "choices": [None, *_CHOICES["entropy_estimator"]],
        },
    )
    vllm_kv_cache_gib: float | None = field(
        default=None,
        metadata={
            "help": "use_vllm, colocate: KV-cache size of ARPO's engine in GiB. None: 1 GiB on CPU; on GPU TRL's "
            "vllm_gpu_memory_utilization decides."
        },
    )
    initial_entropy: str = field(
        default="per_root",
        metadata={
            "help": "H_initial: 'per_root' = the first k tokens of each tree's root, every batch (paper); "
            "'frozen_per_slot' = keyed by slot index and frozen when the slot is first measured in the process's "
            "lifetime (the official code's dictionary, reproduction only).",
            "choices": list(_CHOICES["initial_entropy"]),
        },
    )
    call_limit_eos_trained: bool = field(
        default=False,
        metadata={"help": "call_limit_action='eos': train on the appended EOS (official code) instead of masking it."},
    )
    empty_tool_call: str = field(
        default="error",
        metadata={
            "help": "A tag call with nothing inside: 'error' = the model reads an error result and continues; 'end' = "
            "the trajectory ends silently (official code).",
            "choices": list(_CHOICES["empty_tool_call"]),
        },
    )
    result_format: str = field(
        default="paper",
        metadata={
            "help": "Tag format: 'paper' wraps results as '<result>\\n…\\n</result>'; 'official' adds the official code's "
            "leading space (' <result>\\n…\\n</result>').",
            "choices": list(_CHOICES["result_format"]),
        },
    )
    rollout_preset: str | None = field(
        default=None,
        metadata={
            "help": "'official': set every rollout knob to the official code's behaviour (lagged timing, sequential "
            "fill, top-10 entropy, frozen per-slot H_initial, trained EOS at the call limit, empty calls end, the "
            "official result wrapper; needs use_vllm for the top-10 entropy). It overrides those knobs. None: each "
            "knob as set.",
            "choices": [None, "official"],
        },
    )
    tool_format: str = field(
        default="tags",
        metadata={
            "help": "'tags': inline <tool>…</tool> calls answered by <result>…</result> in one assistant turn "
            "(paper); 'chat_template': TRL-native tool calls through the tokenizer's chat template.",
            "choices": list(_CHOICES["tool_format"]),
        },
    )
    call_limit_action: str = field(
        default="eos",
        metadata={
            "help": "A tool call past max_tool_calling_iterations: 'eos' ends the trajectory (official code); "
            "'message' answers with a limit notice and lets the model continue.",
            "choices": list(_CHOICES["call_limit_action"]),
        },
    )
    tool_timeout: float | None = field(
        default=None,
        metadata={
            "help": "Seconds one call of a tool without a time limit of its own may take before the model gets a "
            "timeout error (thread-safe and async tools; a plain synchronous tool runs inline on the main thread, "
            "as in GRPOTrainer, unbounded). A tool's own limit (e.g. python_timeout) applies to it instead; one "
            "shorter than this contradicts it and is refused. Unset: 60."
        },
    )
    tool_max_workers: int = field(
        default=16,
        metadata={
            "help": "Tool calls run concurrently on at most this many workers (per round of the transformers driver; "
            "over the whole rollout with vLLM)."
        },
    )
    max_tool_response_chars: int | None = field(
        default=None,
        metadata={
            "help": "Outputs of a tool without an output limit of its own longer than this are cut (with a note) "
            "before the model sees them; a returned list is kept whole. A tool's own limit (e.g. "
            "python_max_output_chars) applies to it instead; a smaller cap here contradicts it and is refused. "
            "Unset: 4000."
        },
    )

    log_rollout_trees: int = field(
        default=0,
        metadata={
            "help": "Every N logging steps, render a few prompts' rollout trees to <output_dir>/rollout_trees/ as "
            "self-contained HTML (and to wandb when it is on); 0: never."
        },
    )
    log_rollout_trees_prompts: int = field(default=2, metadata={"help": "Prompts drawn per rollout-tree page."})

    # --- The shared-prefix training forward (docs/shared_prefix.md) ---
    shared_prefix_forward: bool = field(
        default=True,
        metadata={
            "help": "Compute the log-probabilities of a micro-batch with one forward over its distinct tokens: rows "
            "that start alike (a group's prompt, a branch's parent prefix) share those tokens' hidden states "
            "instead of recomputing them per row. Same numbers as TRL's per-row forward (checked against it once "
            "per model at the first forward); models or attention implementations that cannot take the packed "
            "layout fall back to the per-row forward with one log line. Groups are kept whole when TRL shuffles "
            "a generation batch into micro-batches."
        },
    )
    shared_prefix_max_tokens: int = field(
        default=4096,
        metadata={
            "help": "Most packed tokens per forward of the shared-prefix forward: its attention mask holds the square "
            "of this many booleans (4096: 16 MiB). Rows beyond it go to the next forward."
        },
    )

    # --- AEPO (Agentic Entropy-Balanced Policy Optimization, arXiv 2510.14545; docs/aepo.md) ---
    algorithm_preset: str | None = field(
        default=None,
        metadata={
            "help": "'aepo': AEPO as the paper describes it (entropy-balanced clipping, entropy-aware advantage a = 0.2, "
            "consecutive-branch penalty λ = 0.05, dynamic budget split); 'aepo_official': the released AEPO scripts "
            "(rollout_preset='official', branch_rule='aepo_official', λ = 0.05, clipping on, the entropy-aware "
            "advantage off as their code silently skipped it, no budget split). A preset fills the AEPO and rollout "
            "fields still at their defaults; a field you set keeps your value. None: ARPO.",
            "choices": [None, *AEPO_PRESETS],
        },
    )
    entropy_balanced_clipping: bool = field(
        default=False,
        metadata={
            "help": "AEPO's stop-gradient clip: the upper bound 1 + ε_h becomes (1 + ε_h)·δ/sg(δ) (δ the importance "
            "ratio), same loss value, but a token with δ > 1 + ε_h and A > 0 keeps the gradient (1 + ε_h)·A·∇log π "
            "instead of 0. The lower bound stays hard. loss_type grpo, bnpo, dr_grpo, dapo or luspo."
        },
    )
    entropy_advantage_coef: float = field(
        default=0.0,
        metadata={
            "help": "a: AEPO's entropy-aware advantage Ã = A·(1 + a·z(H)), z the token entropy standardized over the "
            "micro-batch's valid tokens, detached (official constant 0.2). 0: off, which is what the released AEPO "
            "runs did in effect (their entropy was computed only with an entropy bonus, set to 0)."
        },
    )
    branch_penalty_rate: float = field(
        default=0.0,
        metadata={
            "help": "λ of AEPO's consecutive-branch penalty P̂(c) = min(1, λ·c), c the consecutive rounds in which the "
            "prompt forked (reset by a round without a fork; on the vLLM driver, which has no rounds, each decision "
            "of the prompt is a round). Official value 0.05. 0: ARPO (no penalty)."
        },
    )
    dynamic_rollouts: str | None = field(
        default=None,
        metadata={
            "help": "AEPO's dynamic budget split: one extra tool-using probe rollout per prompt measures H_root and the "
            "mean tool-step entropy H̄; the prompt then starts m global samples and leaves M − m to branches. "
            "'paper': m = round(M·σ(β_b·(H_root − H̄))); 'official': int(M·σ(β_b·(H_root − H̄))) + 1; both kept in "
            "[1, M]. Overrides initial_rollouts (N). None: N fixed.",
            "choices": [None, "paper", "official"],
        },
    )
    aepo_budget_sensitivity: float = field(
        default=0.5,
        metadata={"help": "β_b: sensitivity of the dynamic budget split (the paper's β there; official 0.5)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shared_prefix_max_tokens < 2:
            raise ValueError(
                f"shared_prefix_max_tokens must be at least 2 (a token and the one it predicts), got "
                f"{self.shared_prefix_max_tokens}"
            )
        self._apply_algorithm_preset()
        self._validate_arpo()
        if self.algorithm_preset == "aepo_official":
            self.branch_rule = "aepo_official"  # rollout_preset='official' has just set ARPO's official rule
        self._validate_aepo()

    def _apply_algorithm_preset(self) -> None:
        """algorithm_preset: fill the fields it names that are still at their defaults (a value you set wins)."""
        if self.algorithm_preset is None:
            return
        if self.algorithm_preset not in AEPO_PRESETS:
            raise ValueError(
                f"algorithm_preset={self.algorithm_preset!r} is not one of None, {', '.join(map(repr, AEPO_PRESETS))}"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in AEPO_PRESETS[self.algorithm_preset].items():
            current = getattr(self, name)
            if current == defaults[name]:
                setattr(self, name, value)
            elif current != value:
                logger.info("algorithm_preset=%r leaves %s=%r (set explicitly; preset: %r)", self.algorithm_preset,
                            name, current, value)  # fmt: skip

    def _validate_aepo(self) -> None:
        """Checks AEPO's fields against the loss and the rollout they change."""
        if self.entropy_balanced_clipping and self.loss_type not in AEPO_CLIPPED_LOSSES:
            raise ValueError(
                f"entropy_balanced_clipping=True needs a loss with a PPO upper clip ({', '.join(AEPO_CLIPPED_LOSSES)}); "
                f"loss_type={self.loss_type!r} has none to rewrite (cispo already keeps the gradient of clipped tokens, "
                "sapo gates softly, vespo weights sequences)"
            )
        a = self.entropy_advantage_coef
        if not isinstance(a, (int, float)) or a != a or a in (float("inf"), float("-inf")):
            raise ValueError(f"entropy_advantage_coef (a) must be a finite number, got {a!r}")
        if a and self.loss_type == "vespo":
            raise ValueError(
                "entropy_advantage_coef != 0 is not supported with loss_type='vespo': its gamma weights are chosen per "
                "sequence from the advantage's sign, which token advantages would split"
            )
        rate = self.branch_penalty_rate
        if not isinstance(rate, (int, float)) or rate != rate or not 0.0 <= rate < float("inf"):
            raise ValueError(f"branch_penalty_rate (λ) must be a finite number >= 0, got {rate!r}")
        if self.dynamic_rollouts not in (None, "paper", "official"):
            raise ValueError(f"dynamic_rollouts={self.dynamic_rollouts!r} is not one of None, 'paper', 'official'")
        b = self.aepo_budget_sensitivity
        if not isinstance(b, (int, float)) or b != b or b in (float("inf"), float("-inf")):
            raise ValueError(f"aepo_budget_sensitivity (β_b) must be a finite number, got {b!r}")

    def resolve_initial_rollouts(self, has_tools: bool) -> int:
        """N: `initial_rollouts` when set, else M // 2 with tools and M without (no tool result, no branch)."""
        if self.initial_rollouts is not None:
            return self.initial_rollouts
        m = self.num_generations
        return max(1, m // 2) if has_tools else m

    def _validate_arpo(self) -> None:
        """Checks ARPO's own fields; runs after GRPOConfig has derived the batch geometry."""
        m = self.num_generations
        if self.rollout_preset not in (None, "official"):
            raise ValueError(f"rollout_preset={self.rollout_preset!r} is not one of None, 'official'")
        if self.rollout_preset == "official":
            for name, value in OFFICIAL_ROLLOUT.items():
                if getattr(self, name) != value:
                    logger.info("rollout_preset='official' sets %s=%r (was %r)", name, value, getattr(self, name))
                setattr(self, name, value)
        server = self.use_vllm and self.vllm_mode == "server"
        if self.entropy_estimator is None:
            self.entropy_estimator = "top_k" if server else "exact"
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
        if self.initial_rollouts is not None and self.initial_rollouts < 1:
            raise ValueError(f"initial_rollouts (N) must be at least 1, got {self.initial_rollouts}")
        if self.initial_rollouts is not None and self.initial_rollouts > m:
            raise ValueError(
                f"initial_rollouts (N={self.initial_rollouts}) cannot exceed num_generations (M={m}), "
                "the global budget per prompt"
            )
        if self.speculative_forks and self.entropy_timing != "after_tool":
            raise ValueError(
                "speculative_forks=True needs entropy_timing='after_tool' (with 'lagged' the decision is taken at "
                f"the tool result and forks already start in the next round), got entropy_timing={self.entropy_timing!r}"
            )
        if self.branch_factor < 1:
            raise ValueError(f"branch_factor (Z) must be at least 1, got {self.branch_factor}")
        if self.entropy_window < 1:
            raise ValueError(f"entropy_window (k) must be at least 1, got {self.entropy_window}")
        if not 0.0 <= self.branch_base_probability <= 1.0:
            raise ValueError(f"branch_base_probability (α) must lie in [0, 1], got {self.branch_base_probability}")
        if not 0.0 <= self.branch_threshold <= 1.0:
            raise ValueError(f"branch_threshold (τ) must lie in [0, 1], got {self.branch_threshold}")
        if self.branch_entropy_weight != self.branch_entropy_weight:  # NaN
            raise ValueError("branch_entropy_weight (β) must be a number, got NaN")
        if self.tool_timeout is not None and self.tool_timeout <= 0:
            raise ValueError(f"tool_timeout must be > 0 seconds, got {self.tool_timeout}")
        if self.tool_max_workers < 1:
            raise ValueError(f"tool_max_workers must be at least 1, got {self.tool_max_workers}")
        if self.max_tool_response_chars is not None and self.max_tool_response_chars < 1:
            raise ValueError(f"max_tool_response_chars must be at least 1, got {self.max_tool_response_chars}")
        if self.log_rollout_trees < 0:
            raise ValueError(f"log_rollout_trees must be >= 0, got {self.log_rollout_trees}")
        if self.log_rollout_trees_prompts < 1:
            raise ValueError(f"log_rollout_trees_prompts must be at least 1, got {self.log_rollout_trees_prompts}")
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 0:
            raise ValueError(f"max_tool_calling_iterations must be >= 0, got {self.max_tool_calling_iterations}")
        # A prompt's M slots are filled by forking live trajectories, so the whole group must live on one process.
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        if local_rows % m:
            raise ValueError(
                f"per_device_train_batch_size × steps_per_generation = {local_rows} rows per process is not a "
                f"multiple of num_generations (M={m}): a prompt's group would straddle processes, and ARPO forks "
                "branches inside a group. Make per_device_train_batch_size × steps_per_generation a multiple of M."
            )
        if self.use_vllm:
            from .rollout.vllm_engine import INSTALL_HINT, vllm_available

            if self.vllm_mode not in ("colocate", "server"):
                raise ValueError(f"vllm_mode={self.vllm_mode!r} is not one of 'colocate', 'server'")
            if not server and not vllm_available():
                raise ValueError(f"use_vllm=True: {INSTALL_HINT}")
            if server and self.entropy_estimator == "exact":
                raise ValueError(
                    "entropy_estimator='exact' needs ARPO's logits processor inside the engine (vllm_mode='colocate'); "
                    "a vLLM server returns logprobs only: use entropy_estimator='top_k' (the official estimate)"
                )
        if self.vllm_kv_cache_gib is not None and self.vllm_kv_cache_gib <= 0:
            raise ValueError(f"vllm_kv_cache_gib must be > 0, got {self.vllm_kv_cache_gib}")
        if self.use_transformers_continuous_batching:
            raise ValueError(
                "use_transformers_continuous_batching=True is not supported by ARPOTrainer: it returns no "
                "per-token entropies, which branching needs"
            )
        self._validate_generation_kwargs()

    def _validate_generation_kwargs(self) -> None:
        """Refuse `generation_kwargs` the tree rollout would silently get wrong."""
        kwargs = self.generation_kwargs or {}
        if isinstance(kwargs, str):
            kwargs = json.loads(kwargs)
        # One row in, one sequence of single-token steps out: the generator slices rows and the entropy hook
        # counts one LM-head call per sampled token.
        shape_changing = sorted(set(kwargs) & _SHAPE_CHANGING_GENERATION_KWARGS)
        if shape_changing:
            raise ValueError(
                f"generation_kwargs {shape_changing} are not supported by ARPOTrainer: the tree rollout needs one "
                "sampled sequence per row, one token per decoding step (no beams, extra return sequences, "
                "assisted or speculative decoding, or dict outputs)"
            )
        for key in ("num_return_sequences", "num_beams"):
            if kwargs.get(key, 1) != 1:
                raise ValueError(f"generation_kwargs[{key!r}]={kwargs[key]!r} is not supported: it must be 1")
        if "temperature" in kwargs and kwargs["temperature"] != self.temperature:
            raise ValueError(
                f"generation_kwargs['temperature']={kwargs['temperature']!r} differs from temperature="
                f"{self.temperature!r}: the loss and the branching entropy use `temperature`, so sampling at another "
                "one would train on a distribution that was not sampled. Set `temperature` instead."
            )

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> ARPOConfig:
        """Upgrade a finished `GRPOConfig` to an `ARPOConfig` with ARPO's defaults (the drop-in path).

        GRPOConfig's `__post_init__` already ran (it derives fields and refuses to run twice on its own output), so
        the instance is copied and only ARPO's fields are added and validated. One default differs:
        `tool_format="chat_template"`, because that is how the `GRPOTrainer` script being swapped calls its tools
        (pass an `ARPOConfig` to get the paper's inline tags).
        """
        upgraded = copy.copy(args)
        upgraded.__class__ = cls
        grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
        for f in dataclasses.fields(cls):
            if f.name not in grpo_fields:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                setattr(upgraded, f.name, default)
        upgraded.tool_format = "chat_template"  # keep the swapped GRPOTrainer's tool calls working unchanged
        # N stays None: the trainer resolves it from whether it has tools (M // 2) or not (M).
        upgraded._validate_arpo()
        logger.info("GRPOConfig upgraded to ARPOConfig with ARPO's default rollout settings")
        return upgraded


@dataclass
class AEPOConfig(ARPOConfig):
    r"""[`ARPOConfig`] with `algorithm_preset="aepo"` by default: AEPO (Agentic Entropy-Balanced Policy Optimization,
    arXiv 2510.14545) as the paper describes it. Each part stays a field of its own (`entropy_balanced_clipping`,
    `entropy_advantage_coef`, `branch_penalty_rate`, `dynamic_rollouts`); `algorithm_preset="aepo_official"` runs the
    released scripts instead. docs/aepo.md lists what differs between the two."""

    algorithm_preset: str | None = field(
        default="aepo",
        metadata={"help": ARPOConfig.__dataclass_fields__["algorithm_preset"].metadata["help"]},
    )

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> AEPOConfig:
        """As [`ARPOConfig.from_grpo_config`], then AEPO's preset on top."""
        upgraded = super().from_grpo_config(args)
        upgraded._apply_algorithm_preset()
        upgraded._validate_aepo()
        return upgraded  # type: ignore[return-value]
