"""What defines and records a run, read by the trainer, the probe and the sweeps alike.

Owns the run's config (`config.py`: TrainConfig, its CLI and which knobs are part of a run's identity),
its checkpoint file (`checkpoint.py`) and its metrics records (`metrics.py`: the one writer and the one
reader of metrics.jsonl). It imports nothing above it (no train, probe, experiments or report).
"""
