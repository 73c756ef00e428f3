from __future__ import annotations

from prefect import get_run_logger, task

import storage
from model.sample import load_model, sample_text
from tasks.common import IO_RETRIES, stage_run
from tasks.results import Artifact, SampleResult, SamplingSettings, Workspace


@task(name="sample", **IO_RETRIES)
def sample(
    checkpoint: Artifact,
    run_uri: str,
    *,
    workspace: Workspace,
    settings: SamplingSettings,
) -> SampleResult:
    """Generate text from the trained model and store it as samples.txt in the run's folder."""
    with stage_run(workspace.tracking, "sample") as run:
        text, notes = sample_text(
            load_model(checkpoint.uri),
            settings.prompt,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            seed=settings.seed,
        )
        uri = storage.put_bytes(storage.join(run_uri, "samples.txt"), text.encode("utf-8"))
        samples = Artifact.of(uri)
        run.log_params(settings.to_dict())
        run.log_text(text, "samples.txt")
        run.record_io({"checkpoint": checkpoint.to_dict()}, {"samples": samples.to_dict()})
    for note in notes:
        get_run_logger().warning(note)
    return SampleResult(
        text=text,
        notes=tuple(notes),
        settings=settings,
        samples=samples,
        mlflow_run_id=run.run_id,
    )
