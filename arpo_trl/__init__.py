"""arpo_trl: ARPO (Agentic Reinforced Policy Optimization, Dong et al., arXiv 2507.19849) for TRL."""

__version__ = "0.1.0"

from .config import AEPOConfig, ARPOConfig  # noqa: E402
from .trainer import AEPOTrainer, ARPOTrainer  # noqa: E402

__all__ = ["AEPOConfig", "AEPOTrainer", "ARPOConfig", "ARPOTrainer", "__version__"]
