"""Checks that two independent paths agree, on a bounded number of logit positions.

* :func:`stock_logit_diff`: two models' own ``model(input_ids, attention_mask)`` forwards (the export
  check: the in-memory pruned model against the reloaded checkpoint, each through its own stock class).
* :func:`runner_logit_diff`: the block runner (:mod:`amp_prune.calib.blockwise`) and its head
  (:func:`final_logits`) against the model's stock forward (once per run, on the dense model: every
  statistic the tool computes goes through the runner).

Both compare ``max |z_a - z_b|`` over the first ``CHECK_ROWS`` sequences of each batch, at
``CHECK_POSITIONS / CHECK_ROWS`` positions spread evenly over the batch's length (the last one
included), wherever the token is real. The stock forward forms logits at those positions only
(``logits_to_keep``), so the check holds at most ``CHECK_POSITIONS x V`` logits (134 MB in fp32 for a
262k vocabulary) whatever the sequence length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import capture_inputs, final_logits, run_blocks
from amp_prune.calib.data import Batch

CHECK_POSITIONS = 128
CHECK_ROWS = 2


def tolerance(dtype: torch.dtype) -> float:
    """The largest logit difference two paths may show in ``dtype``."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def check_rows(batches: list[Batch]) -> list[Batch]:
    """The first ``CHECK_ROWS`` sequences of every batch."""
    return [Batch(b.input_ids[:CHECK_ROWS], b.attention_mask[:CHECK_ROWS]) for b in batches]


def check_positions(batch: Batch, positions: int = CHECK_POSITIONS) -> torch.Tensor:
    """``[P]``: up to ``ceil(positions / B)`` positions, evenly spaced over the batch's length, the last one included."""
    rows, length = batch.input_ids.shape
    per_row = min(length, max(1, math.ceil(positions / rows)))
    return torch.linspace(0, length - 1, per_row).round().long().unique()


@torch.no_grad()
def stock_logits(model: nn.Module, batch: Batch, at: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model``'s own forward on ``batch``: fp32 logits ``[B, P, V]`` at positions ``at`` ``[P]`` of every row.

    ``logits_to_keep`` as a 1-D tensor of positions (every transformers 5 release reads it so).
    """
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                logits_to_keep=at.to(device), use_cache=False)
    return out.logits.float()


@torch.no_grad()
def stock_logit_diff(model_a: nn.Module, model_b: nn.Module, batches: list[Batch], device: torch.device) -> float:
    """``max |logits_a - logits_b|`` of the two models' stock forwards, at real tokens (see the module docstring)."""
    worst = 0.0
    for b in check_rows(batches):
        at = check_positions(b)
        real = b.attention_mask[:, at].bool().to(device)
        if real.any():
            diff = stock_logits(model_a, b, at, device) - stock_logits(model_b, b, at, device).to(device)
            worst = max(worst, diff[real].abs().max().item())
    return worst


@torch.no_grad()
def runner_logit_diff(model: nn.Module, spec: ArchSpec, batches: list[Batch], device: torch.device) -> float:
    """``max |runner logits - stock logits|`` of one model on ``batches``, at real tokens (see the module docstring)."""
    batches = check_rows(batches)
    states = run_blocks(model, spec, capture_inputs(model, spec, batches, device), device, progress=False)
    worst = 0.0
    for s, b in zip(states, batches):
        at = check_positions(b)
        real = b.attention_mask[:, at].bool()
        if real.any():
            ours = final_logits(model, spec, s.hidden[:, at.to(s.hidden.device)], device)
            diff = ours - stock_logits(model, b, at, device).to(ours.device)
            worst = max(worst, diff[real.to(diff.device)].abs().max().item())
    return worst
