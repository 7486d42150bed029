"""The transformers generator (`arpo_trl/rollout/generation.py`): left-padded batches, sampling settings, the
entropy recorder's hook, segments cut at their stops, a collective source's padding and a crash mid-window."""

import math

import pytest
import torch

from arpo_trl.rollout.entropy import EntropyRecorder


def test_a_left_padded_batch_generates_what_each_row_generates_alone(tokenizer):
    """Greedy, rows of different lengths and budgets (one past `generate`'s default of 20 tokens): the padding
    and its attention mask change nothing, each row gets its own budget, and the generator counts its calls."""
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    generator = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.0)
    try:
        prompts = [tokenizer.encode("Add 3, 4 and 5, then twice that."), tokenizer.encode("Add 1.")]
        budgets = [30, 7]
        batched = generator(prompts, budgets)
        alone = [generator([p], [b])[0] for p, b in zip(prompts, budgets)]
        assert [s.ids for s in batched] == [s.ids for s in alone]
        assert [len(s.ids) for s in batched] == [30, 7] and [s.finish for s in batched] == ["length", "length"]
        assert generator([], []) == [] and (generator.calls, generator.idle_calls) == (3, 0)
    finally:
        generator.close()


@pytest.mark.parametrize(
    "temperature, top_p, top_k, sampled", [(0.7, 0.9, 5, True), (0.0, 0.9, 5, False), (1.0, 1.0, 0, True)]
)
def test_plain_model_sampling_config(tokenizer, temperature, top_p, top_k, sampled):
    """The analyser's sampling settings: filters only when sampling; EOS ids of the model and the tokenizer, each
    once; the pad id the tokenizer's (else the first EOS)."""
    from arpo_trl.rollout.generation import PlainModel
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    config = PlainModel.sampling(model, tokenizer, temperature, top_p, top_k)
    assert config.do_sample is sampled
    if sampled:
        assert (config.temperature, config.top_p, config.top_k) == (temperature, top_p, top_k)
    else:
        assert (config.temperature, config.top_p, config.top_k) == (None, None, None)
    assert config.eos_token_id == [7, tokenizer.eos_token_id] and config.pad_token_id == tokenizer.pad_token_id
    source = PlainModel(model, tokenizer, config)
    assert (source.eos_token_ids, source.pad_token_id, source.model, source.tokenizer) == (
        [7, tokenizer.eos_token_id], tokenizer.pad_token_id, model, tokenizer
    )  # fmt: skip


def test_plain_model_sampling_adds_the_tokenizers_eos_and_pads_with_the_first_without_a_pad(tokenizer):
    import copy

    from arpo_trl.rollout.generation import PlainModel
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    model.generation_config.eos_token_id = 9
    config = PlainModel.sampling(model, tok, 1.0)
    assert config.eos_token_id == [9, tok.eos_token_id] and config.pad_token_id == 9
    assert PlainModel(model, tok, config).eos_token_ids == [9, tok.eos_token_id]
    model.generation_config.eos_token_id = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="^the model and its tokenizer name no EOS token: generation would never end$"):
        PlainModel.sampling(model, tok, 1.0)
    model.generation_config = None
    with pytest.raises(ValueError, match="name no EOS token"):
        PlainModel.sampling(model, tok, 1.0)


@pytest.mark.parametrize("temperature, recorded", [(0.7, 0.7), (0.0, 1.0)])
def test_for_model_hooks_a_recorder_at_the_sampling_temperature_and_close_removes_it(tokenizer, temperature, recorded):
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    head = model.get_output_embeddings()
    generator = TransformersGenerator.for_model(model, tokenizer, ["</calc>"], temperature=temperature,
                                                entropy_estimator="top_k")  # fmt: skip
    r = generator.recorder
    assert (r.temperature, r.logit_scale, r.softcap, r.estimator) == (recorded, 1.0, None, "top_k")
    assert generator.measure_every_token is True and generator.stop_strings == ["</calc>"]
    assert generator.source.generation_config.do_sample is (temperature > 0)
    assert head._forward_hooks or head._forward_pre_hooks
    generator.close()
    assert not head._forward_hooks and not head._forward_pre_hooks and generator._hooks == []
    default = TransformersGenerator.for_model(model, tokenizer, None, measure_every_token=False)
    assert (default.recorder.temperature, default.recorder.estimator, default.measure_every_token) == (
        1.0,
        "exact",
        False,
    )
    assert default.stop_strings is None and default.stop_criterion is None
    default.close()


def test_entropies_only_for_the_rows_that_need_them_and_segments_cut_at_their_first_stop(tokenizer, tool_model_state):
    """Greedy on the calc-tool model: row 1 needs no entropy (NaN), row 0 does (finite). With the stop string
    `</calc>`, each row is cut right after its first call, with finish "stop"."""
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=0)
    model.load_state_dict(tool_model_state)
    model.eval()
    prompts = [tokenizer.encode("Add 3, 4 and 5."), tokenizer.encode("Add 1 and 2, then 7.")]
    plain = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.0, measure_every_token=False)
    try:
        free = plain(prompts, [40, 40], [True, False])
        assert all(math.isfinite(e) for e in free[0].entropies) and all(math.isnan(e) for e in free[1].entropies)
        every = plain(prompts, [40, 40])  # None: every row
        assert all(math.isfinite(e) for s in every for e in s.entropies)
        assert [s.ids for s in every] == [s.ids for s in free]
    finally:
        plain.close()
    stopping = TransformersGenerator.for_model(model, tokenizer, ["</calc>"], temperature=0.0)
    try:
        cut = stopping(prompts, [40, 40])
    finally:
        stopping.close()
    for whole, segment in zip(free, cut):
        text = tokenizer.decode(whole.ids)
        assert "</calc>" in text
        first = next(n for n in range(1, len(whole.ids) + 1) if "</calc>" in tokenizer.decode(whole.ids[:n]))
        assert segment.ids == whole.ids[:first] and segment.finish == "stop"


def _recording_source(model, tokenizer, config, *, collective: bool = True, fail_after: int | None = None):
    """A `PlainModel` whose `generate` records what it receives (`source.seen`); `collective` as a trainer's model
    under ZeRO-3 (a rank with no rows must still join), and with `fail_after` it raises from inside `generate`
    after that many decoding steps."""
    import contextlib
    import copy

    from transformers import StoppingCriteria

    from arpo_trl.rollout.generation import PlainModel

    class CrashAt(StoppingCriteria):
        steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            if self.steps == fail_after:
                raise RuntimeError("the model crashed mid-generation")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    class Recording(PlainModel):
        seen: list[dict]

        @contextlib.contextmanager
        def generating(self):
            with torch.no_grad():
                yield self

        def generate(self, **kwargs):
            self.seen.append(dict(kwargs, generation_config=copy.copy(kwargs["generation_config"])))
            if fail_after is not None:
                kwargs["stopping_criteria"].append(CrashAt())
            return self.model.generate(**kwargs)

    source = Recording(model, tokenizer, config)
    source.collective, source.seen = collective, []
    return source


def test_a_rank_with_no_rows_joins_a_collective_source_with_one_throwaway_row_and_batches_are_padded_as_trl_pads(
    tokenizer,
):
    """Under ZeRO-3 every rank must join each `generate`: a rank with nothing to generate sends one EOS with a
    budget of 1 and returns nothing, counted as idle. A real batch reaches `generate` left-padded with the pad id
    and masked, with the largest row budget and the source's own config left untouched."""
    from arpo_trl.rollout.generation import PlainModel, TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    config = PlainModel.sampling(model, tokenizer, 0.0)
    source = _recording_source(model, tokenizer, config)
    generator = TransformersGenerator(source, None, EntropyRecorder(1.0))
    assert generator([], []) == [] and generator([], []) == []
    assert (generator.calls, generator.idle_calls) == (2, 2)
    for dummy in source.seen:
        assert dummy["input_ids"].tolist() == [[tokenizer.eos_token_id]]
        assert dummy["attention_mask"].tolist() == [[1]] and dummy["generation_config"].max_new_tokens == 1
    short, long = tokenizer.encode("Add 1."), tokenizer.encode("Add 3, 4 and 5.")
    pad = len(long) - len(short)
    segments = generator([short, long], [1, 1])
    assert [len(s.ids) for s in segments] == [1, 1] and (generator.calls, generator.idle_calls) == (3, 2)
    batch = source.seen[-1]
    assert batch["input_ids"].tolist() == [[tokenizer.pad_token_id] * pad + short, long]
    assert batch["attention_mask"].tolist() == [[0] * pad + [1] * len(short), [1] * len(long)]
    assert batch["generation_config"].max_new_tokens == 1
    generator([short, long], [3, 5])
    assert source.seen[-1]["generation_config"].max_new_tokens == 5
    assert config.max_new_tokens is None  # each call sets its budget on a copy
    alone = TransformersGenerator(_recording_source(model, tokenizer, config, collective=False), None,
                                  EntropyRecorder(1.0))  # fmt: skip
    assert alone([], []) == [] and (alone.calls, alone.idle_calls, alone.source.seen) == (0, 0, [])


def test_a_generate_that_crashes_mid_window_raises_its_own_error_and_leaves_the_recorder_disarmed(tokenizer):
    """`top_k` keeps a step pending for the next input; a crash after 3 steps must surface as itself (not as an
    error of the cleanup), and the next call measures afresh."""
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    generator = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.0, entropy_estimator="top_k")
    healthy = generator.source
    try:
        generator.source = _recording_source(model, tokenizer, healthy.generation_config, fail_after=3)
        with pytest.raises(RuntimeError, match="^the model crashed mid-generation$"):
            generator([tokenizer.encode("Add 1.")], [8])
        generator.source = healthy
        [segment] = generator([tokenizer.encode("Add 1.")], [4])
        assert len(segment.entropies) == 4 and all(math.isfinite(e) for e in segment.entropies)
    finally:
        generator.close()


def test_first_stop_keeps_each_rows_first_firing_length_and_passes_everything_through():
    from arpo_trl.rollout.generation import _FirstStop

    fired = iter([[False, True, False], [False, False, False], [True, True, False]])
    received = []

    def inner(input_ids, scores, **kwargs):
        received.append((scores, kwargs))
        return torch.tensor(next(fired))

    stop = _FirstStop(inner)
    outs = [stop(torch.zeros(3, width, dtype=torch.long), f"scores{width}", step=width).tolist() for width in (5, 6, 7)]
    assert outs == [[False, True, False], [False, False, False], [True, True, False]]
    assert stop.first.tolist() == [7, 5, -1] and stop.first.dtype == torch.long
    assert received == [("scores5", {"step": 5}), ("scores6", {"step": 6}), ("scores7", {"step": 7})]


def test_output_segments_cuts_each_row_at_its_eos_its_first_stop_or_its_own_budget():
    """Six rows of one batch (prompt width 10, EOS id 9, the recorder stopped after 4 steps)."""
    from arpo_trl.rollout.generation import _FirstStop, output_segments

    new_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6], [1, 2, 3, 4, 5, 6],
                            [1, 2, 3, 4, 5, 6], [1, 9, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])  # fmt: skip
    entropies = torch.arange(24, dtype=torch.float).reshape(6, 4)
    stop = _FirstStop(None)
    stop.first = torch.tensor([13, 13, 15, 14, 14, -1])
    budgets = [6, 6, 3, 4, 6, 6]
    segments = output_segments(new_ids, entropies, budgets, [9], stop, prompt_width=10)

    def seen(values):
        return [None if math.isnan(v) else v for v in values]

    assert [(s.ids, s.finish) for s in segments] == [
        ([1, 2, 3], "stop"),  # the stop string ends at the 3rd token
        ([1, 2, 9], "eos"),  # the stop string ends with the EOS itself: an EOS
        ([1, 2, 3], "length"),  # the stop fired after this row's own budget, which the batch's outran
        ([1, 2, 3, 4], "stop"),  # the stop string ends at the last token of the budget
        ([1, 9], "eos"),
        ([1, 2, 3, 4, 5, 6], "length"),
    ]
    assert seen(segments[5].entropies) == [20.0, 21.0, 22.0, 23.0, None, None]
    assert seen(segments[3].entropies) == [12.0, 13.0, 14.0, 15.0]
    unmeasured = output_segments(new_ids[:1], None, [6], [9], None, prompt_width=10)
    assert (unmeasured[0].ids, seen(unmeasured[0].entropies)) == ([1, 2, 3, 4, 5, 6], [None] * 6)


@pytest.mark.parametrize("eos, listed", [(None, []), (5, [5]), ([5, 6], [5, 6])])
def test_plain_model_reads_eos_ids_given_as_none_one_id_or_a_list(tokenizer, eos, listed):
    from transformers import GenerationConfig

    from arpo_trl.rollout.generation import PlainModel

    source = PlainModel(None, tokenizer, GenerationConfig(eos_token_id=eos, pad_token_id=4))
    assert (source.eos_token_ids, source.pad_token_id) == (listed, 4)


def test_for_model_and_sampling_defaults_filters_and_the_models_logit_transform(tokenizer):
    """Defaults: plain sampling at T = 1 with no top-p/top-k filter; filters reach the config; the recorder applies the
    model's logit scale and soft-cap (read from its config, as `output_logit_transform` reads them)."""
    from arpo_trl.rollout.generation import PlainModel, TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    defaults = PlainModel.sampling(model, tokenizer)
    assert (defaults.do_sample, defaults.temperature, defaults.top_p, defaults.top_k) == (True, 1.0, 1.0, 0)
    plain = TransformersGenerator.for_model(model, tokenizer, None)
    config = plain.source.generation_config
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 1.0, 1.0, 0)
    plain.close()
    model.config.logit_scale, model.config.final_logit_softcapping = 0.5, 30.0
    filtered = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.7, top_p=0.9, top_k=5)
    config = filtered.source.generation_config
    assert (config.temperature, config.top_p, config.top_k) == (0.7, 0.9, 5)
    assert (filtered.recorder.logit_scale, filtered.recorder.softcap) == (0.5, 30.0)
    filtered.close()
    bare = TransformersGenerator(PlainModel(model, tokenizer, defaults), None, EntropyRecorder(1.0))
    assert bare.measure_every_token is False
    bare.close()  # no hooks of its own: nothing to remove
    assert bare._hooks == []
