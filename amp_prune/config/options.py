"""The choice lists and the field helper every config uses (the ground floor: imports nothing of amp_prune's
but the error type)."""

from __future__ import annotations

from dataclasses import MISSING, field

from amp_prune.errors import AmpPruneError

METHODS = ("width", "cka", "hybrid")
CRITERIA = ("amp", "magnitude", "obs", "random", "wanda_sp")
GQA_MODES = ("group", "heads")
LAYER_CRITERIA = ("cka", "angular", "bi", "kl", "consensus")
REPRESENTATIONS = ("token", "pooled")
RESCORES = ("bounded", "all")
DEPTH_CACHES = ("auto", "device", "cpu", "disk", "recompute")
DEPTH_DTYPES = ("auto", "model", "bfloat16")
OFFLOADS = ("none", "cpu", "disk")
PPL_DATASETS = ("wikitext2",)
REFITS = ("none", "onepass", "sequential")
LOSSES = ("kd", "lm", "kd+lm")
STANDIN_FORMS = ("down", "map")
RATIO_SCOPES = ("all", "blocks")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_SOURCE = "builtin:c4"
MIN_CHUNK_TOKENS = 16


def opt(default, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
        metavar: str | None = None, negatable: bool = False, factory=None, const=None):
    """A config field with its CLI help; ``flag`` overrides the flag name derived from the field name.

    ``negatable`` booleans get both ``--name`` and ``--no-name``; a ``const`` makes the value optional
    (``--name`` alone means ``const``).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "negatable": negatable,
            "const": const}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _int_at_least(value, low: int, flag: str, optional: bool = False, what: str | None = None) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        need = f"a positive number of {what}" if what else f"an integer >= {low}"
        raise AmpPruneError(f"{flag} must be {need} (got {value})")


def _choice(value, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise AmpPruneError(f"unknown {flag} '{value}': choose one of {', '.join(choices)}")


def field_default(f):
    """The default of a dataclass field (``None`` for required ones)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None
