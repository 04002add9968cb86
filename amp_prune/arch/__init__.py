"""Per-family module and config names: the only place that knows them."""

from amp_prune.arch.specs import SUPPORTED_MODEL_TYPES, ArchSpec, get_spec

__all__ = ["ArchSpec", "SUPPORTED_MODEL_TYPES", "get_spec"]
