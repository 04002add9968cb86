"""bias_probe: counterfactual fairness checks and test-time mitigation for any HF causal LM.

    from bias_probe import probe, write_outputs
    report, items = probe("path/to/model", "compas", "race", data_dir="shared/data", limit=200)

This package never imports ``amp_prune``: it works on any model transformers can load.
"""

from bias_probe.datasets import ATTRIBUTES, BUILTIN, Item, ProbeData, load
from bias_probe.errors import BiasProbeError
from bias_probe.probe import DEFAULT_DECISION, DEFAULT_MITIGATION, probe, run_probe
from bias_probe.report import format_report, write_outputs

__all__ = ["ATTRIBUTES", "BUILTIN", "DEFAULT_DECISION", "DEFAULT_MITIGATION", "BiasProbeError", "Item", "ProbeData", "format_report",
           "load", "probe", "run_probe", "write_outputs"]
