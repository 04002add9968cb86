"""amp-prune: structured pruning of causal LMs (AMP width, CKA depth, hybrid) with HF-native export.

The public API. The stages live in one package each: ``arch`` (layout facts), ``io`` (load,
export, card), ``calib`` (batches, block runner), ``width`` and ``depth`` (planners),
``surgery`` (the only code that mutates a model), ``eval``, ``recover`` and ``report``.
"""

from amp_prune.config import (BiasConfig, CalibConfig, DepthConfig, EvalConfig, FinetuneConfig, PruneConfig,
                              RuntimeConfig, WidthConfig)
from amp_prune.errors import AmpPruneError
from amp_prune.io.load import load_model
from amp_prune.pipeline import PLANNERS, PruneResult, prune
from amp_prune.plan import DepthStep, HybridStep, LayerPlan, PrunePlan
from amp_prune.surgery import apply_plan

__all__ = ["AmpPruneError", "BiasConfig", "CalibConfig", "DepthConfig", "DepthStep", "EvalConfig", "FinetuneConfig",
           "HybridStep", "LayerPlan", "PLANNERS", "PruneConfig", "PrunePlan", "PruneResult", "RuntimeConfig", "WidthConfig",
           "apply_plan", "load_model", "prune"]
__version__ = "0.1.0"
