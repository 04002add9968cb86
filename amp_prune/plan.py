"""The plan: the only hand-off from a search to surgery, as JSON that replays on a fresh model.

Every method (width, cka, hybrid, a replayed file) produces a :class:`PrunePlan`;
:func:`amp_prune.surgery.apply_plan` is the only code that turns one into a smaller model.
Units are listed in the *original* indexing of the model the plan was made for. The search
log is a list of typed steps (:class:`DepthStep`, :class:`HybridStep`), serialized with a
``type`` tag; version-1 files written before the tag existed still load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from amp_prune.errors import AmpPruneError
from amp_prune.io.files import write_json

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """Units removed from one block, in the original indexing of that block."""

    layer: int
    heads: list[int] = field(default_factory=list)  # query heads removed
    kv_heads: list[int] = field(default_factory=list)  # KV heads removed (group mode)
    channels: list[int] = field(default_factory=list)  # MLP channels removed


@dataclass
class DepthStep:
    """One depth-search step: every remaining candidate's metrics (current order) and the blocks removed."""

    step: int
    candidates: list[int]  # original indices of the remaining blocks
    metrics: dict[str, list[float]]
    removed: list[int]  # original indices removed at this step
    score_name: str = "cka"
    rescored: list[int] | None = None  # bounded rescoring: the candidates scored afresh (the rest carry old scores)
    drift: float | None = None  # arccos(CKA) between the model's representation before and after this removal
    type: str = "depth"


@dataclass
class HybridStep:
    """One hybrid step: the CKA to the parent of the depth and width candidates, and the choice."""

    step: int
    params: int  # parameters before the step
    choice: str = ""  # "depth" | "width"
    removed_params: int = 0
    final: bool = False  # the last, exact width step (no depth candidate)
    cka_depth: float | None = None
    cka_width: float | None = None
    depth_block: int | None = None  # original index of the best depth candidate
    removed_block: int | None = None  # original index, when depth was chosen
    candidates: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    type: str = "hybrid"


Step = DepthStep | HybridStep
_STEP_TYPES: dict[str, type] = {"depth": DepthStep, "hybrid": HybridStep}


def step_to_dict(step: Step) -> dict:
    """JSON form of a step; unset optional fields are left out (as version-1 files did)."""
    return {k: v for k, v in asdict(step).items() if v is not None}


def step_from_dict(d: dict) -> Step:
    """A typed step from its JSON form; untagged version-1 hybrid steps are the ones with a ``choice``."""
    kind = d.get("type") or ("hybrid" if "choice" in d else "depth")
    if kind not in _STEP_TYPES:
        raise AmpPruneError(f"unknown plan step type '{kind}': expected one of {', '.join(_STEP_TYPES)}")
    cls = _STEP_TYPES[kind]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and k != "type"})


@dataclass
class PrunePlan:
    """Everything :func:`amp_prune.surgery.apply_plan` needs, plus how it was chosen."""

    model_type: str
    dims: dict[str, int]  # hidden, n_heads, n_kv, head_dim, intermediate, n_layers before pruning
    gqa_mode: str
    criterion: str
    target_ratio: float
    layers: list[LayerPlan]
    removed_layers: list[int] = field(default_factory=list)  # whole blocks (depth pruning), original indexing
    method: str = "width"  # width | cka | hybrid
    steps: list[Step] = field(default_factory=list)  # the search log of depth/hybrid runs
    version: int = PLAN_VERSION
    attn_units: int | None = None  # attention units removed per block (KV groups, or heads per group)
    split: list[dict] = field(default_factory=list)  # every attention/MLP split considered, with its proxy scores
    refit: str = "none"  # none | onepass | sequential: least-squares refit of the kept o_proj/down_proj columns
    standin: bool = False  # dropped spans replaced by a least-squares fit folded into the previous down_proj
    damp: float = 0.0  # ridge damping of the width refit (and of the stand-in when standin_damp is None)
    standin_damp: float | str | None = None  # "auto" (cross-validated per span) or a number; None: use damp
    standin_fit: list[dict] = field(default_factory=list)  # per span: form, damping, held-out scores, check outcome
    standin_form: str = "down"  # down: refit the last kept down_proj; map: fold a map of its output (older plans)
    standin_check: bool = True  # keep a stand-in only where it lowers the calibration KL to dense (older plans: off)
    calibration: dict | None = None  # the calibration settings the refit used (a replay recomputes it from them)
    weights: dict | None = field(default=None, repr=False, compare=False)  # in memory only: block -> {o, down}

    @property
    def standin_ridge(self) -> float | str:
        """The stand-in's damping: ``standin_damp``, or ``damp`` for plans made before it existed."""
        return self.damp if self.standin_damp is None else self.standin_damp

    @property
    def needs_weights(self) -> bool:
        """Whether applying this plan needs refit or stand-in weights (computed from calibration data)."""
        return self.standin or (self.refit != "none" and any(lp.heads or lp.channels for lp in self.layers))

    @classmethod
    def blocks_only(cls, model_type: str, dims: dict[str, int], removed: list[int], **kw) -> PrunePlan:
        """A plan that removes whole blocks and no width units."""
        return cls(model_type=model_type, dims=dims, gqa_mode="-", layers=[LayerPlan(i) for i in range(dims["n_layers"])],
                   removed_layers=sorted(removed), **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("weights")
        d["steps"] = [step_to_dict(s) for s in self.steps]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        if d.get("version") != PLAN_VERSION:
            raise AmpPruneError(f"pruning plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        d = dict(d)
        d.setdefault("standin_form", "map")  # plans written before the form existed folded a map
        d.setdefault("standin_check", False)  # ... and kept every fitted stand-in
        d["layers"] = [LayerPlan(**lp) for lp in d["layers"]]
        d["steps"] = [step_from_dict(s) for s in d.get("steps", [])]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise AmpPruneError(f"cannot read pruning plan {path}: {e}") from None

    def check(self, model_type: str, dims: dict[str, int]) -> tuple[int, int, int]:
        """Refuse a plan made for another model; return the kept (query heads, KV heads, channels) per block.

        Pure: compares the plan with the model's family and dims only, so it runs before any forward pass.
        """
        if model_type != self.model_type:
            raise AmpPruneError(f"the plan was made for a {self.model_type} model, this model is {model_type}; "
                                "replay a plan on the model it was made for")
        if dims != self.dims:
            raise AmpPruneError(f"plan was made for a model with {self.dims}, this model has {dims}")
        if len(self.layers) != dims["n_layers"]:
            raise AmpPruneError(f"plan lists {len(self.layers)} blocks, the model has {dims['n_layers']}")
        dropped = set(self.removed_layers)
        if any(not 0 <= b < dims["n_layers"] for b in dropped) or len(dropped) >= dims["n_layers"]:
            raise AmpPruneError(f"plan removes blocks {sorted(dropped)}; the model has {dims['n_layers']}")
        shapes = {_kept_shape(lp, dims) for lp in self.layers if lp.layer not in dropped}
        if len(shapes) != 1:
            raise AmpPruneError(f"plan gives blocks different shapes {sorted(shapes)}; HF configs need uniform blocks")
        return shapes.pop()


def kept(n: int, removed: list[int]) -> list[int]:
    """``range(n)`` without ``removed``."""
    gone = set(removed)
    return [i for i in range(n) if i not in gone]


def _kept_shape(lp: LayerPlan, d: dict[str, int]) -> tuple[int, int, int]:
    g = d["n_heads"] // d["n_kv"]
    for name, idx, n in (("heads", lp.heads, d["n_heads"]), ("kv_heads", lp.kv_heads, d["n_kv"]),
                         ("channels", lp.channels, d["intermediate"])):
        if len(set(idx)) != len(idx) or any(not 0 <= i < n for i in idx):
            raise AmpPruneError(f"plan layer {lp.layer}: invalid {name} indices for a block with {n}")
    kept_heads = set(kept(d["n_heads"], lp.heads))
    kept_kv = kept(d["n_kv"], lp.kv_heads)
    per_group = {kv: sum(1 for h in kept_heads if h // g == kv) for kv in range(d["n_kv"])}
    if any(per_group[kv] for kv in lp.kv_heads):
        raise AmpPruneError(f"plan layer {lp.layer}: removes a KV head but keeps query heads that read it")
    counts = {per_group[kv] for kv in kept_kv}
    if len(counts) != 1 or 0 in counts:
        raise AmpPruneError(f"plan layer {lp.layer}: kept KV groups must keep the same number (>=1) of query heads")
    return len(kept_heads), len(kept_kv), d["intermediate"] - len(lp.channels)
