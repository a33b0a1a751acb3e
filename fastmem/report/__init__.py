"""The report stage: metrics of finished runs → markdown tables and PNG figures.

render.py: `python -m fastmem.report SWEEP_DIR` (one experiment's report); figures.py: its figures;
demo_plots.py: the main job's figure. Reads runs only through fastmem.run.metrics.
"""

from fastmem.report.render import cli, main

__all__ = ["cli", "main"]
