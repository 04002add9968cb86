"""The configuration of one recovery run (``amp-prune finetune``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amp_prune.config.options import LOSSES, _choice, _int_at_least, opt
from amp_prune.errors import AmpPruneError


@dataclass
class FinetuneConfig:
    """One recovery run (``amp-prune finetune``); ``validate()`` raises one-line errors without touching a file."""

    model: str
    data: str = opt(None, "Alpaca-style .json/.jsonl (loss on responses) or text (.txt/.jsonl/.json/datasets name: "
                          "causal LM loss)")
    out: str | None = opt(None, "output directory (default: ./<model>-lora, or ./<model>-full with --full)")
    loss: str = opt("lm", "lm: next-token cross-entropy on the data; kd: distil the teacher's next-token "
                          "distribution (tau^2 KL); kd+lm: both. Default %(default)s: at 100 CPU steps it beat kd "
                          "on WikiText-2 (docs/results.md)", choices=LOSSES)
    teacher: str | None = opt(None, "teacher for --loss kd / kd+lm: a HF dir, hub id, .gguf or built-in name "
                                    "(default: the source model recorded in MODEL's run.json)",
                              metavar="DIR_OR_ID")
    temperature: float = opt(1.0, "distillation temperature tau (default %(default)s)")
    lm_weight: float = opt(1.0, "weight of the LM loss in --loss kd+lm (default %(default)s)")
    full: bool = opt(False, "fine-tune every weight (AdamW) instead of LoRA adapters")
    steps: int | None = opt(None, "optimizer steps (default: one epoch)")
    epochs: float | None = opt(None, "epochs, when --steps is not given (default 1)")
    lr: float | None = opt(None, "learning rate (default 3e-4 with LoRA, 5e-5 with --full)")
    lora_r: int = opt(8, "LoRA rank (default %(default)s)")
    lora_alpha: int = opt(16, "LoRA alpha (default %(default)s)")
    lora_dropout: float = opt(0.05, "LoRA dropout (default %(default)s)")
    seq_len: int = opt(256, "tokens per training sequence (default %(default)s)")
    batch_size: int = opt(4, "sequences per micro-batch (default %(default)s)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (default %(default)s)")
    warmup_ratio: float = opt(0.05, "share of the steps with a linear warmup (default %(default)s)")
    eval_samples: int = opt(16, "held-out examples for perplexity before/after (default %(default)s)")
    save_every: int = opt(50, "checkpoint interval in steps (default %(default)s)")
    seed: int = opt(0, "seed (default %(default)s)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N (default %(default)s)")
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)")
    overwrite: bool = opt(False, "replace an existing output directory")
    progress: bool = opt(True, "hide progress bars", flag="--no-progress")
    data_field: str = opt("text", "text field of .jsonl/.json/datasets text data (default %(default)s)")

    def validate(self) -> FinetuneConfig:
        if not self.data:
            raise AmpPruneError("--data is required: a text or instruction file (or a datasets name) to train on")
        if self.steps is not None and self.epochs is not None:
            raise AmpPruneError("give --steps or --epochs, not both")
        for name, low in (("steps", 1), ("lora_r", 1), ("seq_len", 16), ("batch_size", 1), ("grad_accum", 1),
                          ("eval_samples", 0), ("save_every", 1)):
            _int_at_least(getattr(self, name), low, "--" + name.replace("_", "-"), optional=name == "steps")
        if self.epochs is not None and not self.epochs > 0:
            raise AmpPruneError(f"--epochs must be > 0 (got {self.epochs})")
        if (self.lr is not None and not self.lr > 0) or not 0 <= self.lora_dropout < 1:
            raise AmpPruneError("--lr must be > 0 and --lora-dropout in [0, 1)")
        _choice(self.loss, LOSSES, "--loss")
        if not 0 < self.temperature <= 100:
            raise AmpPruneError(f"--temperature must be in (0, 100] (got {self.temperature}); e.g. --temperature 1")
        if not self.lm_weight >= 0:
            raise AmpPruneError(f"--lm-weight must be >= 0 (got {self.lm_weight})")
        if self.teacher and self.loss == "lm":
            raise AmpPruneError("--teacher is only used with --loss kd or kd+lm; drop it or change --loss")
        return self

    @property
    def learning_rate(self) -> float:
        """``--lr``, or the default of the mode: 3e-4 for LoRA, 5e-5 for full fine-tuning."""
        return self.lr if self.lr is not None else (5e-5 if self.full else 3e-4)

    def default_out(self) -> str:
        return f"{Path(self.model.rstrip('/')).name}-{'full' if self.full else 'lora'}"
