"""Names the pipeline gives things in MLflow: the experiment, registered models."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_EXPERIMENT = "gptpipe"


def model_name_for(source: str, tokenizer: str) -> str:
    """A registered-model name per dataset: gptpipe-<corpus file stem>-<tokenizer kind>."""
    stem = Path(urlsplit(source).path).stem or "corpus"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-").lower() or "corpus"
    return f"gptpipe-{stem}-{tokenizer}"
