"""Calibration: texts -> padded token batches (data.py), and the block-by-block runner (blockwise.py)."""
