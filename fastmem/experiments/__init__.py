"""Experiments A–K of shared/PROTOCOL.md and the main job: declarative specs, the sweep runner, and their CLI."""

from fastmem.experiments.specs import EXPERIMENTS, MAIN_JOB, SCALE_BASE, SCALES, SPECS, Experiment, Variant
from fastmem.experiments.sweep import PlannedRun, plan_experiment, run_plan, validate_plan

__all__ = ["EXPERIMENTS", "MAIN_JOB", "SCALES", "SCALE_BASE", "SPECS", "Experiment", "PlannedRun", "Variant",
           "plan_experiment", "run_plan", "validate_plan"]
