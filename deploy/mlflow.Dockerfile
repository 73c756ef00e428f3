# The MLflow tracking server of deploy/compose.yaml: MLflow with the postgres driver and boto3
# (artifacts proxied to S3/MinIO). Build from the project root:
#   docker build -f deploy/mlflow.Dockerfile -t gptpipe-mlflow:3.17.2 .
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
# [auth]: the basic-auth app (deploy/compose.auth.yaml)
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" psycopg2-binary boto3
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
