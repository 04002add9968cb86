"""bias_probe: counterfactual fairness checks for any HF causal LM (not implemented yet, see issue 5).

This package must never import ``amp_prune``.
"""
