"""What a run reports: W&B and console progress (tracking.py, progress.py), and the FLOP
formulas behind throughput and MFU (flops.py)."""
