from __future__ import annotations

from prefect import get_run_logger, task

import storage
from model.sample import load_model, sample_text
from tasks.common import describe, timed


@task(name="sample")
def sample(
    checkpoint_uri: str,
    run_uri: str,
    prompt: str = "",
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 1337,
) -> dict:
    """Generate text from the trained model and store it as samples.txt."""
    with timed({}) as record:
        text, notes = sample_text(
            load_model(checkpoint_uri), prompt, max_new_tokens, temperature, top_k, seed
        )
        uri = storage.put_bytes(storage.join(run_uri, "samples.txt"), text.encode("utf-8"))
        record.update(
            text=text,
            notes=notes,
            settings={
                "prompt": prompt,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "seed": seed,
            },
            outputs={"samples": describe(uri)},
        )
    for note in notes:
        get_run_logger().warning(note)
    return record
