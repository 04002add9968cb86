"""Data-parallel recovery through accelerate.

GPUs: ``accelerate launch --multi_gpu --num_processes N -m amp_prune finetune ...`` (FSDP through
``accelerate launch --config_file`` with an FSDP config). CPU: ``torchrun --nproc_per_node N -m
amp_prune finetune ... --device cpu`` (accelerate's own launcher starts one process on CPU).

Nothing here is a launcher or a process group of ours: accelerate's ``PartialState`` reads what
``accelerate launch`` (or ``torchrun``) set up, DDP comes from ``Accelerator.prepare_model`` (NCCL
on GPUs, gloo on CPU), and FSDP from accelerate's config file. A plain ``amp-prune finetune`` is
one process, and then nothing is wrapped: the single-process run is unchanged, bit for bit.

The global batch stays what the flags say: every process takes the same micro-batch of
``--batch-size`` sequences and keeps the rows ``rank, rank + W, ...`` of it (``W`` processes), so
``--batch-size`` must be a multiple of ``W``. Each process's loss (a mean over its ``k_r``
labelled tokens) is scaled by ``W k_r / k`` (``k`` the micro-batch's labelled tokens), so the mean
that DDP takes over the processes, ``sum_r (k_r / k) loss_r``, is the single-process loss of the
whole micro-batch, and so are its gradients (up to rounding).
Only the main process evaluates, writes checkpoints and exports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amp_prune.errors import AmpPruneError
from amp_prune.recover.data import TrainBatch
from amp_prune.recover.distill import label_mask


@dataclass
class Parallel:
    """Where this process stands among the launched ones."""

    world: int = 1
    rank: int = 0
    device: torch.device | None = None  # the launcher's device for this process (None: single process)
    _acc: object | None = None

    @classmethod
    def detect(cls, cpu: bool) -> Parallel:
        """Several processes when a launcher set ``WORLD_SIZE`` > 1; ``cpu`` selects gloo over NCCL."""
        import os
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import Accelerator
        acc = Accelerator(cpu=cpu)
        return cls(world=acc.num_processes, rank=acc.process_index, device=acc.device, _acc=acc)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise AmpPruneError(f"--batch-size {batch_size} must be a multiple of the {self.world} launched processes "
                                "(each takes an equal share of every micro-batch)")

    def shard(self, b: TrainBatch) -> tuple[TrainBatch, float]:
        """This process's rows of the micro-batch ``b``, and the weight ``W k_r / k`` of its loss."""
        if self.world == 1:
            return b, 1.0
        rows = slice(self.rank, None, self.world)
        part = TrainBatch(b.input_ids[rows], b.attention_mask[rows], b.labels[rows])
        k, k_r = int(label_mask(b.labels).sum()), int(label_mask(part.labels).sum())
        return part, (self.world * k_r / k if k else 0.0)

    def wrap(self, model):
        """The model under DDP (or FSDP, by accelerate's config) when launched on several processes."""
        return model if self._acc is None else self._acc.prepare_model(model)

    def unwrap(self, model):
        return model if self._acc is None else self._acc.unwrap_model(model)

    def mean(self, value: float) -> float:
        """``value`` averaged over the processes (the logged loss of the global batch)."""
        if self._acc is None:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        return float(self._acc.reduce(t, reduction="mean").item())

    def barrier(self) -> None:
        if self._acc is not None:
            self._acc.wait_for_everyone()
