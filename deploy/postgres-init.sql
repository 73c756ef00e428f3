-- The Prefect server's database, beside MLflow's (POSTGRES_DB); runs once, at the first start.
CREATE DATABASE prefect;
