"""Pictures of what ARPO does: rollout trees per step, and entropy around tool results.

- `render_tree`: a batch's rollout trees (segments, tool calls, H_t, ΔH, branching decisions, rewards, soft and
  hard advantages) as one self-contained HTML file.
- `log_rollout_trees`: the trainer hook (writes under ``output_dir/rollout_trees``, logs to wandb).
- `build_trees`: the tree data behind the picture.
- ``arpo-analyze entropy`` (`arpo_trl.viz.analyze`): roll a model out with tools and plot per-token entropy by
  position relative to tool results.

See docs/viz.md.
"""

from .hook import log_rollout_trees
from .html import render_tree, tree_html
from .trees import GroupTree, Leaf, TreeNode, build_trees, mask_spans

__all__ = [
    "GroupTree",
    "Leaf",
    "TreeNode",
    "build_trees",
    "log_rollout_trees",
    "render_tree",
    "mask_spans",
    "tree_html",
]
