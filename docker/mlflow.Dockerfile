# MLflow tracking server for docker/compose.yaml: PostgreSQL backend store (psycopg2) and an
# S3-compatible artifact store (boto3), both baked in so that nothing is pip-installed when the
# container starts. Build context: docker/ (compose does this; by hand:
#   docker build -f docker/mlflow.Dockerfile -t vaeflow-mlflow:3.17.2 docker/).
# mlflow==3.17.2 matches the client pin in pyproject.toml. Full mlflow, not mlflow-skinny: the
# server needs SQLAlchemy/alembic for the database store.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true

RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8

RUN useradd --create-home --uid 1000 --user-group mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# The server's flags (backend store, artifact destination, host) are in compose.yaml.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
