"""vaeflow pipelines: the Prefect flows, the MLflow tracking and registry code, and the `vaeflow` CLI.

Prefect reads its settings when it is first imported, so the defaults below are set here, before any
pipeline module imports it; a value the user exported wins.
"""

import os

for _var, _value in (("DO_NOT_TRACK", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                     ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                     # the temporary server migrates its database on first start: 20 s is too little on a loaded 2-core machine
                     ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")):
    os.environ.setdefault(_var, _value)
