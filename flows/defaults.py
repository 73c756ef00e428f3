"""Defaults the CLI needs before it imports anything heavy (Prefect, MLflow, torch)."""

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DEFAULT_STORE = "./gptpipe-store"
