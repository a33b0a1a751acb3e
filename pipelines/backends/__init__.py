"""Loader backends: base.py owns order, sharding, batches, targets and the per-batch step; each backend
(device, torch, ffcv) supplies only the pixels of a batch of sample indices, and dali its own graph
fed the base's indices, view ids and parameters. pipelines/registry.py declares what each executes."""
