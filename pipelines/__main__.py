"""`python -m pipelines` runs the vaeflow CLI."""

from pipelines.cli import main

main()
