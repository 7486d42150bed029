"""arpo_trl: ARPO (Agentic Reinforced Policy Optimization, Dong et al., arXiv 2507.19849) for TRL."""

__version__ = "0.1.0"

from .config import ARPOConfig  # noqa: E402
from .trainer import ARPOTrainer  # noqa: E402

__all__ = ["ARPOConfig", "ARPOTrainer", "__version__"]
