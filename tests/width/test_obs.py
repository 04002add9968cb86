"""The OBS criterion: its greedy steps equal a brute-force search over the refit's objective."""

from __future__ import annotations

import logging

import torch
from conftest import random_batches
from tiny import tiny_model

from amp_prune import PruneConfig, prune
from amp_prune.arch import get_spec
from amp_prune.width.criteria import ScoreContext, obs_scores
from amp_prune.width.criteria.obs import DAMP, elimination_order
from amp_prune.width.refit import refit_columns

SMALL = dict(num_samples=4, seq_len=32, eval_samples=2, batch_size=2, progress=False)


def _problem(seed=0, out=6, d=12, n=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(out, d, generator=g, dtype=torch.float64), x


def objective(w, x, keep, damp=DAMP):
    """The refit's objective at its optimum: ||W X - W_S' X_S||^2 + lam ||W_S' - W_S||^2 (brute force)."""
    gram = x.T @ x
    ws = refit_columns(w, gram, torch.tensor(keep), damp)
    lam = damp * gram.diagonal().mean()
    return float(((x @ w.T - x[:, keep] @ ws.T) ** 2).sum() + lam * ((ws - w[:, keep]) ** 2).sum())


def _best_removal(w, x, removed, groups):
    best, arg = float("inf"), None
    for u in range(len(groups)):
        if u in removed:
            continue
        gone = {c for r in (*removed, u) for c in groups[r]}
        val = objective(w, x, [c for c in range(w.shape[1]) if c not in gone])
        best, arg = (val, u) if val < best else (best, arg)
    return arg


def test_channel_steps_equal_brute_force():
    w, x = _problem()
    groups = [[j] for j in range(w.shape[1])]
    order = elimination_order(w, x.T @ x, groups, per_step=1)
    assert sorted(order.tolist()) == list(range(w.shape[1]))  # a permutation: every unit has a position
    ranked = torch.argsort(order).tolist()
    removed: list[int] = []
    for step in range(4):  # each greedy step removes the unit whose removal the refit repairs best
        assert ranked[step] == _best_removal(w, x, removed, groups)
        removed.append(ranked[step])


def test_head_steps_equal_brute_force():
    w, x = _problem(seed=1, d=12)
    groups = [list(range(h * 3, (h + 1) * 3)) for h in range(4)]  # 4 "heads" of 3 columns
    ranked = torch.argsort(elimination_order(w, x.T @ x, groups, per_step=1)).tolist()
    removed: list[int] = []
    for step in range(3):
        assert ranked[step] == _best_removal(w, x, removed, groups)
        removed.append(ranked[step])


def test_redundant_channel_goes_first():
    """A column that duplicates another input costs (almost) nothing once the refit moves its weight over.

    With a tiny ridge: the refit's ridge pulls toward the old weights, so at the default damping
    moving a large weight has a price.
    """
    w, x = _problem(seed=2)
    x[:, 7] = x[:, 3]
    w[:, 7] *= 50  # large weights: a norm- or activation-based score would keep it
    order = elimination_order(w, x.T @ x, [[j] for j in range(w.shape[1])], per_step=1, damp=1e-9)
    assert int(order.argmin()) in (3, 7)


def test_without_statistics_falls_back_to_norms(caplog):
    w = torch.tensor([[3.0, 1.0, 2.0]])
    with caplog.at_level(logging.WARNING):
        order = elimination_order(w, torch.zeros(3, 3), [[0], [1], [2]], per_step=1)
    assert order.tolist() == [2.0, 0.0, 1.0] and "weight norm" in caplog.text


def test_chunked_steps_give_a_permutation():
    w, x = _problem(seed=3, d=30)
    order = elimination_order(w, x.T @ x, [[j] for j in range(30)], per_step=7)
    assert sorted(order.tolist()) == list(range(30)) and torch.isfinite(order).all()


def test_obs_scores_on_a_tiny_model_and_a_run(tiny_dir, tmp_path):
    model = tiny_model("llama_gqa")
    spec = get_spec("llama")
    scores = obs_scores(model, spec, random_batches(), ScoreContext(torch.device("cpu"), progress=False))
    d = spec.dims(model.config)
    assert len(scores) == d["n_layers"]
    for s in scores:
        assert sorted(s.heads.tolist()) == list(range(d["n_heads"]))
        assert sorted(s.channels.tolist()) == list(range(d["intermediate"]))
    res = prune(PruneConfig.from_flat(model=str(tiny_dir()), ratio=0.3, criterion="obs", out=str(tmp_path / "o"),
                                      **SMALL))
    assert res.plan.criterion == "obs" and res.summary["export_max_abs_diff"] <= 1e-4


def test_the_onepass_refit_reads_the_scorers_grams(monkeypatch):
    """With ``--refit onepass`` the sweep takes obs's own Gram matrices: half the accumulations, the same plan
    and the same refit weights as when it accumulates its own."""
    from amp_prune.width import refit as refit_mod
    from amp_prune.width.criteria.obs import ObsScorer
    from amp_prune.width.planner import plan_width

    model, spec = tiny_model("llama_gqa"), get_spec("llama")
    ctx = ScoreContext(torch.device("cpu"), progress=False)
    calls = []
    add = refit_mod.Gram.add

    def counted(self, x):
        calls.append(1)
        add(self, x)
    monkeypatch.setattr(refit_mod.Gram, "add", counted)

    def run():
        calls.clear()
        plan = plan_width(model, spec, random_batches(), ratio=0.3, mode="group", criterion="obs", ctx=ctx,
                          attn_units="uniform", refit="onepass")
        return plan, len(calls)

    shared, n_shared = run()
    monkeypatch.delattr(ObsScorer, "take_grams")
    own, n_own = run()
    assert n_own == 2 * n_shared > 0
    assert [lp.channels for lp in shared.layers] == [lp.channels for lp in own.layers]
    assert [lp.heads for lp in shared.layers] == [lp.heads for lp in own.layers]
    assert shared.weights.keys() == own.weights.keys() and shared.weights
    for i, w in own.weights.items():
        assert w.keys() == shared.weights[i].keys()
        for name in w:
            assert torch.equal(w[name], shared.weights[i][name])
