"""`python -m fastmem.report`: see fastmem/report/render.py."""

from fastmem.report.render import cli

if __name__ == "__main__":
    cli()
