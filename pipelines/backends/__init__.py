"""Loader backends: base.py owns order, sharding, batches, targets and the per-batch step; each
backend (device, torch, dali, ffcv) supplies only the pixels of a batch of sample indices."""
