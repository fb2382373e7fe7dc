-- One PostgreSQL server, two databases: `prefect` (Prefect server) and `mlflow` (MLflow backend
-- and model registry store). Mounted by docker/compose.yaml into /docker-entrypoint-initdb.d/; the
-- postgres image runs it once, as POSTGRES_USER, when the data volume is empty, so both databases
-- are owned by that user. On an existing volume it does not run again (create them by hand, or
-- `docker compose -f docker/compose.yaml down -v` to start over).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
