from __future__ import annotations

from prefect import get_run_logger, task

import storage
from model.sample import load_model, sample_text
from tasks.common import IO_RETRIES, describe, stage_run


@task(name="sample", **IO_RETRIES)
def sample(
    checkpoint_uri: str,
    run_uri: str,
    prompt: str = "",
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 1337,
    tracking: dict | None = None,
) -> dict:
    """Generate text from the trained model and store it as samples.txt."""
    settings = {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
    }
    with stage_run(tracking, "sample") as run:
        text, notes = sample_text(
            load_model(checkpoint_uri), prompt, max_new_tokens, temperature, top_k, seed
        )
        uri = storage.put_bytes(storage.join(run_uri, "samples.txt"), text.encode("utf-8"))
        outputs = {"samples": describe(uri)}
        run.log_params(settings)
        run.log_text(text, "samples.txt")
        run.record_io({"checkpoint": describe(checkpoint_uri)}, outputs)
    for note in notes:
        get_run_logger().warning(note)
    return {"text": text, "notes": notes, "settings": settings, "outputs": outputs,
            "mlflow_run_id": run.run_id}  # fmt: skip
