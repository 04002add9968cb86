"""amp-prune: structured pruning of causal LMs (AMP width pruning) with HF-native export."""

from amp_prune.api import PruneResult, prune
from amp_prune.config import PruneConfig
from amp_prune.errors import AmpPruneError
from amp_prune.modelio import load_model
from amp_prune.plan import LayerPlan, PrunePlan
from amp_prune.surgery import apply_plan

__all__ = ["AmpPruneError", "LayerPlan", "PruneConfig", "PrunePlan", "PruneResult", "apply_plan", "load_model", "prune"]
__version__ = "0.1.0"
