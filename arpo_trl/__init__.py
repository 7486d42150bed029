"""arpo_trl: ARPO (Agentic Reinforced Policy Optimization, Dong et al., arXiv 2507.19849) for TRL."""

__version__ = "0.1.0"

import os as _os

# torch's OpenMP runtime (libgomp) reads its wait policy once, when torch loads. Its default spins at the end of every
# parallel region; on a machine whose cores other processes also want, a spinning thread holds the core its sibling
# needs to reach the barrier, and a rollout took 15x longer (bench/RESULTS.md, "Where a rollout's time goes").
# Passive waiting sleeps instead. It applies where arpo_trl is imported before torch (arpo-train, the demo, scripts
# that import it first) and to the processes they spawn; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import AEPOConfig, ARPOConfig  # noqa: E402
from .trainer import AEPOTrainer, ARPOTrainer  # noqa: E402

__all__ = ["AEPOConfig", "AEPOTrainer", "ARPOConfig", "ARPOTrainer", "__version__"]
