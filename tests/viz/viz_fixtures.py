"""Hand-made trajectories with known trees (shared by the tree and page tests)."""

from arpo_trl.rollout.trajectory import BRANCH, DUPLICATE, FRESH, ROOT, BranchEvent, ToolEvent, Trajectory


def pieces(tok, *parts):
    """(ids, mask) of text pieces (text, sampled) tokenized one by one, as the rollout appends them."""
    ids, mask = [], []
    for text, sampled in parts:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [int(sampled)] * len(piece)
    return ids, mask


def hand_group(tok, g=0, result_text="3"):
    """Slot 0 root A: two calc calls then an answer; slot 1 branch B of A after A's first result; slot 2 a fresh
    rollout C without a call; slot 3 a duplicate of C (the official padding)."""
    base = 4 * g
    a1, m1 = pieces(tok, ("<calc>1+2</calc>", True), (f"<result>\n{result_text}\n</result>", False))
    a2, m2 = pieces(tok, ("<calc>3+4</calc>", True), ("<result>\n7\n</result>", False))
    a3, m3 = pieces(tok, (" The answer is \\boxed{7}.", True))
    b2, mb = pieces(tok, ("Therefore \\boxed{3}.", True))
    c1, mc = pieces(tok, ("I think \\boxed{5}.", True))
    eos = [tok.eos_token_id]  # sampled: it ends the last segment
    a3, b2, c1 = a3 + eos, b2 + eos, c1 + eos
    m3, mb, mc = m3 + [1], mb + [1], mc + [1]
    a = Trajectory(slot=base, group=g, kind=ROOT, completion_ids=a1 + a2 + a3, tool_mask=m1 + m2 + m3,
                   h_initial=0.5, finish_reason="eos")  # fmt: skip
    a.tool_events = [
        ToolEvent(m1.index(0), "calc", False, False),
        ToolEvent(len(a1) + m2.index(0), "calc", True, False),
    ]
    a.branch_events = [BranchEvent(len(a1), 0.3, 0.8, [base + 1]), BranchEvent(len(a1) + len(a2), -0.2, 0.3, [])]
    b = Trajectory(slot=base + 1, group=g, kind=BRANCH, completion_ids=a1 + b2, tool_mask=m1 + mb,
                   parent=base, fork_position=len(a1), h_initial=0.5, finish_reason="eos")  # fmt: skip
    b.tool_events = [ToolEvent(m1.index(0), "calc", False, False, inherited=True)]
    c = Trajectory(slot=base + 2, group=g, kind=FRESH, completion_ids=c1, tool_mask=mc, h_initial=0.9,
                   finish_reason="eos", can_branch=False)  # fmt: skip
    d = c.duplicate(base + 3)
    assert d.kind == DUPLICATE
    prompt = tok.encode("Add 1, 2 and 4.", add_special_tokens=False)
    return [a, b, c, d], [prompt] * 4, (a1, a2, a3, b2, c1)
