"""`python -m vaeflow.pipelines` runs the vaeflow CLI."""

from vaeflow.pipelines.cli import main

main()
