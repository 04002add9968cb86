"""Input and output: model loading (hub, dir, GGUF), atomic export with a reload check, the model card."""
