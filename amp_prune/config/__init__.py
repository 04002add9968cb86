"""The configuration of every operation, shared by the Python API and the CLI (the ground floor).

:mod:`~amp_prune.config.options` holds the choice lists and the field helper, :mod:`~amp_prune.config.prune`
the pruning run with its sections, :mod:`~amp_prune.config.finetune` the recovery run.
"""

from amp_prune.config.finetune import FinetuneConfig
from amp_prune.config.options import (CRITERIA, DEFAULT_SOURCE, DEPTH_CACHES, DEPTH_DTYPES, GGUF_TYPES, GQA_MODES,
                                      LAYER_CRITERIA, LOSSES, METHODS, MIN_CHUNK_TOKENS, OFFLOADS, PPL_DATASETS,
                                      RATIO_SCOPES, REFITS, REPRESENTATIONS, RESCORES, STANDIN_FORMS, field_default,
                                      opt)
from amp_prune.config.prune import (SECTIONS, BiasConfig, CalibConfig, DepthConfig, EvalConfig, PruneConfig,
                                    RuntimeConfig, WidthConfig)

__all__ = ["BiasConfig", "CRITERIA", "CalibConfig", "DEFAULT_SOURCE", "DEPTH_CACHES", "DEPTH_DTYPES", "DepthConfig",
           "EvalConfig", "FinetuneConfig", "GGUF_TYPES", "GQA_MODES", "LAYER_CRITERIA", "LOSSES", "METHODS",
           "MIN_CHUNK_TOKENS", "OFFLOADS", "PPL_DATASETS", "PruneConfig", "RATIO_SCOPES", "REFITS", "REPRESENTATIONS",
           "RESCORES",
           "RuntimeConfig", "SECTIONS", "STANDIN_FORMS", "WidthConfig", "field_default", "opt"]
