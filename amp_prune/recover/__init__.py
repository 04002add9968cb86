"""Recovery: LoRA fine-tuning merged into a plain checkpoint (finetune.py) and its training data (data.py)."""
