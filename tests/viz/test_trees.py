"""Rollout trees rebuilt from trajectories: a hand-made tree with known answers, and a real branching rollout."""

import math

import pytest
import torch
from viz_fixtures import hand_group

from arpo_trl.rollout.entropy import window_entropy
from arpo_trl.rollout.trajectory import BRANCH, DUPLICATE, FRESH, ROOT
from arpo_trl.viz import build_trees, mask_spans
from arpo_trl.viz.sampling import teacher_forced_entropies


def test_mask_spans_end_where_the_model_resumes():
    assert mask_spans([1, 1, 0, 0, 1, 1, 0, 1]) == [(0, 4), (4, 7), (7, 8)]
    assert mask_spans([1, 1, 1]) == [(0, 3)]
    assert mask_spans([1, 0, 0]) == [(0, 3)]  # a call-limit EOS written by the environment ends the row
    assert mask_spans([]) == []


def test_hand_made_tree_structure_decisions_and_advantages(tokenizer):
    trajs, prompts, (a1, a2, a3, b2, c1) = hand_group(tokenizer)
    rewards = [1.0, 0.0, 0.7, 0.2]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    (tree,) = build_trees(trajs, prompts, rewards, advantages, entropy_window=4)
    assert [n.ids for n in tree.nodes] == [a1, a2, a3, b2, c1]
    n_a1, n_a2, n_a3, n_b2, n_c1 = tree.nodes
    assert tree.roots == [n_a1, n_c1]
    assert [n.depth for n in tree.nodes] == [1, 2, 3, 2, 1]
    assert n_a1.children == [n_a2, n_b2] and n_a2.children == [n_a3]
    assert n_a1.rows == [0, 1] and n_c1.rows == [2, 3]
    assert n_c1.ending_rows == [2, 3] and n_a3.ending_rows == [0] and n_b2.ending_rows == [1]
    # the branch's first own segment is a fork; the parent's continuation is not
    assert n_b2.forked and n_b2.origin_kind == BRANCH and n_b2.origin_slot == 1
    assert not n_a2.forked and n_c1.origin_kind == FRESH and not n_c1.forked
    # H_initial on the first segment of each root; decisions where A's tool results end, H_t = H_initial + ΔH
    assert n_a1.h_initial == 0.5 and n_c1.h_initial == 0.9 and n_a2.h_initial is None
    (d1,) = n_a1.decisions
    (d2,) = n_a2.decisions
    assert d1.slot == 0 and d1.forked and d1.event.forked_slots == [1] and d1.h_t == pytest.approx(0.8)
    assert not d2.forked and d2.h_t == pytest.approx(0.3) and d2.event.probability == 0.3
    assert not n_a3.decisions and not n_b2.decisions
    # tool calls: A's two (the second failed); B's inherited copy is not counted again
    assert [(e.name, e.error) for e in n_a1.tool_events] == [("calc", False)]
    assert [(e.name, e.error) for e in n_a2.tool_events] == [("calc", True)]
    assert n_a1.result_ids and n_a1.sampled_ids == tokenizer.encode("<calc>1+2</calc>", add_special_tokens=False)
    # hard attribution: a shared token gets the mean of its sharers' Â
    assert n_a1.hard_range == pytest.approx((0.0, 0.0))  # A (+1) and B (−1)
    assert n_a2.hard_range == pytest.approx((1.0, 1.0)) and n_b2.hard_range == pytest.approx((-1.0, -1.0))
    assert n_c1.hard_range == pytest.approx((0.0, 0.0))  # C (+0.5) and its duplicate D (−0.5)
    leaves = {leaf.slot: leaf for leaf in tree.leaves}
    assert [leaves[s].node for s in range(4)] == [n_a3, n_b2, n_c1, n_c1]
    assert [leaves[s].advantage for s in range(4)] == [1.0, -1.0, 0.5, -0.5]
    assert [leaves[s].reward for s in range(4)] == rewards
    assert [leaves[s].hard_last for s in range(4)] == pytest.approx([1.0, -1.0, 0.0, 0.0])
    model_tokens_a = sum(len(n.sampled_ids) for n in (n_a1, n_a2, n_a3))
    shared = len(n_a1.sampled_ids)
    assert leaves[0].hard_mean == pytest.approx((model_tokens_a - shared) / model_tokens_a)
    assert leaves[3].kind == DUPLICATE and leaves[3].parent == 2


def test_groups_are_selected_and_inputs_validated(tokenizer):
    g0, p0, _ = hand_group(tokenizer, 0)
    g1, p1, _ = hand_group(tokenizer, 1)
    trajs, prompts = g0 + g1, p0 + p1
    trees = build_trees(trajs, prompts, [0.0] * 8, [0.0] * 8, groups=[1])
    assert [t.group for t in trees] == [1] and trees[0].leaves[0].slot == 4
    with pytest.raises(ValueError, match="slot order"):
        build_trees(trajs[::-1], prompts, [0.0] * 8, [0.0] * 8)
    with pytest.raises(ValueError, match="one reward and one advantage"):
        build_trees(trajs, prompts, [0.0] * 7, [0.0] * 8)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        build_trees(trajs, prompts, [0.0] * 8, torch.zeros(8, 5))  # per-token (hard) advantages are refused


def test_real_branching_rollout_tree(branching_batch, tokenizer):
    batch, rewards, advantages = branching_batch
    trajs = batch.trajectories
    assert batch.stats.branches > 0  # α = 1: forks happened
    trees = build_trees(trajs, batch.prompt_ids, rewards, advantages, token_entropies=batch.entropies,
                        entropy_window=4, entropy_normalization="sum_lnV", vocab_size=len(tokenizer))  # fmt: skip
    assert len(trees) == 2
    for tree in trees:
        # every row's path, read root to leaf, is its completion token for token
        for leaf in tree.leaves:
            path, node = [], leaf.node
            while node is not None:
                path.append(node)
                node = node.parent
            path.reverse()
            assert sum((n.ids for n in path), []) == trajs[leaf.slot].completion_ids
            assert all(leaf.slot in n.rows for n in path)
            traj = trajs[leaf.slot]
            if traj.kind == BRANCH:  # shares exactly the parent's segments up to the fork
                fork = next(n for n in path if n.start == traj.fork_position)
                assert fork.forked and fork.origin_slot == traj.slot
                assert all(traj.parent in n.rows for n in path if n.end <= traj.fork_position)
                assert traj.parent not in fork.rows or fork.origin_slot != traj.slot
        # each decision the engine took sits on the node its tool result ends, with the forks as children
        decisions = [d for n in tree.nodes for d in n.decisions]
        events = [e for t in trajs if t.group == tree.group for e in t.branch_events]
        assert len(decisions) == len(events)
        for node in tree.nodes:
            for d in node.decisions:
                assert node.end == d.event.position and node.result_ids
                forked_children = {c.origin_slot for c in node.children if c.forked}
                assert set(d.event.forked_slots) <= forked_children
                # after_tool timing: H_t is the window of the first k tokens the deciding row sampled next
                (cont,) = [c for c in node.children if d.slot in c.rows]
                assert cont.h_window == pytest.approx(d.h_t, abs=1e-4)
            if node.depth == 1 and node.h_initial is not None:
                assert node.h_window == pytest.approx(node.h_initial, abs=1e-4)


def test_recorded_entropies_match_a_teacher_forced_forward(branching_batch, viz_model, tokenizer):
    """Every row's per-token entropies (a branch's inherited prefix included) equal H computed from the logits
    of one forward pass over prompt + completion; tool-result tokens carry NaN."""
    batch, _, _ = branching_batch
    for traj, ent in zip(batch.trajectories, batch.entropies):
        ref = teacher_forced_entropies(viz_model, batch.prompt_ids[traj.slot], traj.completion_ids)
        assert len(ent) == len(traj.completion_ids)
        for e, r, m in zip(ent, ref, traj.tool_mask):
            if m:
                assert e == pytest.approx(r, abs=1e-4)
            else:
                assert math.isnan(e)
    # and H_initial, as the engine measured it, is the window of a root's first k recorded entropies
    for traj, ent in zip(batch.trajectories, batch.entropies):
        if traj.kind == ROOT:
            expected = window_entropy([e for e in ent if not math.isnan(e)], 4, "sum_lnV", len(tokenizer))
            assert traj.h_initial == pytest.approx(expected, abs=1e-5)


def test_rows_of_different_prompts_share_no_node_and_each_prompt_leads_its_own_rows(tokenizer):
    """Slot 2 (fresh) started from another reset observation than slots 0..1 and its duplicate in slot 3 continues
    it. Made to sample exactly A's first segment, it still opens a node of its own under its own prompt, and the hard
    advantages average only over rows of one prompt."""
    from arpo_trl.viz import tree_html

    trajs, prompts, (a1, a2, a3, b2, c1) = hand_group(tokenizer)
    other = tokenizer.encode("Add 1, 2 and 4. Observation: 9.", add_special_tokens=False)
    c, d = trajs[2], trajs[3]
    c.completion_ids, c.tool_mask = list(trajs[0].completion_ids), list(trajs[0].tool_mask)  # A's tokens exactly
    d.completion_ids, d.tool_mask = list(c.completion_ids), list(c.tool_mask)
    prompts = prompts[:2] + [other, other]
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.3])
    (tree,) = build_trees(trajs, prompts, [1.0, 0.0, 0.7, 0.2], advantages)
    assert tree.prompts == [prompts[0], other] and tree.prompt_ids == prompts[0]
    assert [leaf.prompt for leaf in tree.leaves] == [0, 0, 1, 1]
    first = [n for n in tree.nodes if n.depth == 1]
    assert [(n.ids, n.prompt, n.rows) for n in first] == [(a1, 0, [0, 1]), (a1, 1, [2, 3])]
    # A's first segment: rows 0 and 1 share it (mean of 1 and −1), rows 2 and 3 theirs (mean of 0.5 and 0.3); A's
    # last segment is row 0's alone, its twin under the other prompt rows 2 and 3's
    assert first[0].hard_range == (0.0, 0.0) and first[1].hard_range == pytest.approx((0.4, 0.4))
    assert tree.leaves[0].hard_last == pytest.approx(1.0) and tree.leaves[2].hard_last == pytest.approx(0.4)
    page = tree_html([tree], tokenizer)
    assert page.count('<g class="prompt"') == 2 and "Observation: 9." in page
    assert "prompt 2/2 (" in page and 'id="g0prompt1"' in page
