"""Experiments A–K of shared/PROTOCOL.md: declarative specs, the sweep runner, and their CLI."""

from fastmem.experiments.specs import EXPERIMENTS, SCALE_BASE, SCALES, Experiment, Variant
from fastmem.experiments.sweep import PlannedRun, plan_experiment, run_plan

__all__ = ["EXPERIMENTS", "SCALES", "SCALE_BASE", "Experiment", "PlannedRun", "Variant", "plan_experiment", "run_plan"]
