"""vaeflow pipelines: the CLI and (later) the Prefect flows."""
