import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arpo_trl.advantages import hard_attribution


def brute_force(ids, mask, adv, group_size):
    """Direct reading of paper Eq. 6-7: mean advantage over the rows sharing tokens 0..t exactly."""
    batch, length = ids.shape
    out = torch.zeros(batch, length, dtype=adv.dtype)
    for i in range(batch):
        g = (i // group_size) * group_size
        for t in range(length):
            if not mask[i, t]:
                continue
            sharers = [
                j
                for j in range(g, g + group_size)
                if bool(mask[j, : t + 1].all()) and torch.equal(ids[j, : t + 1], ids[i, : t + 1])
            ]
            out[i, t] = adv[sharers].mean()
    return out


@st.composite
def trees(draw):
    """Groups of rows built like rollout trees: branches copy a prefix of an earlier row, then diverge."""
    groups = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 5))
    length = draw(st.integers(1, 12))
    vocab = draw(st.integers(2, 4))  # small vocabularies make accidental sharing likely too
    rows, lengths = [], []
    for _ in range(groups):
        members = []
        for _ in range(group_size):
            n = draw(st.integers(1, length))
            own = draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length))
            if members and draw(st.booleans()):
                parent = draw(st.sampled_from(members))
                cut = draw(st.integers(0, length))
                own = parent[0][:cut] + own[cut:]
            members.append((own, n))
        rows += [m[0] for m in members]
        lengths += [m[1] for m in members]
    ids = torch.tensor(rows)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    adv = torch.tensor(
        draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=len(rows), max_size=len(rows))), dtype=torch.float64
    )
    return ids, mask, adv, group_size


@settings(max_examples=200, deadline=None)
@given(trees())
def test_hard_attribution_is_the_mean_over_sharers(case):
    ids, mask, adv, group_size = case
    torch.testing.assert_close(hard_attribution(ids, mask, adv, group_size), brute_force(ids, mask, adv, group_size))


def test_unshared_tokens_keep_their_row_advantage_and_shared_ones_average():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9], [1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    adv = torch.tensor([1.0, -1.0, 0.5])
    out = hard_attribution(ids, mask, adv, group_size=3)
    assert out[0].tolist() == [0.0, 0.0, 1.0, 1.0]  # shared [5, 6] averages 1 and -1
    assert out[1].tolist() == [0.0, 0.0, -1.0, -1.0]
    assert out[2].tolist() == [0.5] * 4


def test_groups_do_not_mix_and_padding_gets_zero():
    ids = torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv = torch.tensor([2.0, 0.0, -4.0, 4.0])
    out = hard_attribution(ids, mask, adv, group_size=2)
    assert out.tolist() == [[1.0, 2.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_shape_errors_are_clear():
    import pytest

    with pytest.raises(ValueError, match="group_size"):
        hard_attribution(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), torch.zeros(3), 2)
    with pytest.raises(ValueError, match="advantages"):
        hard_attribution(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), torch.zeros(3), 2)


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


@pytest.mark.parametrize("ids_shape, mask_shape", [((2, 3), (2, 4)), ((2, 3, 1), (2, 3, 1))])
def test_hard_attribution_names_both_shapes_when_ids_and_mask_disagree(ids_shape, mask_shape):
    """Either condition alone is refused (2-D but different shapes; same shapes but not 2-D), and the message
    gives both shapes."""
    ids, mask = torch.zeros(ids_shape, dtype=torch.long), torch.ones(mask_shape)
    expected = f"must both be (B, T); got {tuple(ids_shape)} and {tuple(mask_shape)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        hard_attribution(ids, mask, torch.zeros(2), group_size=2)


def test_hard_attribution_returns_on_the_advantages_device_whatever_the_default_device():
    """The output is allocated where the advantages live (on GPU: the trainer's device), not on torch's default."""
    ids = torch.tensor([[1, 2], [1, 3]])
    advantages = torch.tensor([1.0, -1.0])
    with torch.device("meta"):
        out = hard_attribution(ids, torch.ones(2, 2, device="cpu"), advantages, group_size=2)
    assert out.device == advantages.device
    assert out.tolist() == [[0.0, 1.0], [0.0, -1.0]]
