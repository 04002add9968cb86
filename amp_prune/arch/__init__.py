"""Family specs and every layout fact: module and config names, fused/unfused projections, per-block
bookkeeping, how a block adds its branches, and which stock HF class can express a pruned shape."""

from amp_prune.arch.families import SUPPORTED_MODEL_TYPES, get_spec
from amp_prune.arch.native import config_is_valid, native_config
from amp_prune.arch.specs import ArchSpec

__all__ = ["ArchSpec", "SUPPORTED_MODEL_TYPES", "config_is_valid", "get_spec", "native_config"]
