"""Prefect flows (the pipeline) and the `gptpipe` command line."""
