"""Evaluation: perplexity (held-out chunks, WikiText-2), lm-eval zero-shot (harness), offline task configs."""
