"""A new sqlite tracking database made from the cached template of MLflow's empty schema is the
database MLflow makes itself (storage.tracking.new_database)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from mlflow.tracking import MlflowClient

from storage.tracking import Tracker
from storage.tracking.new_database import create_from_template


def _canonical(statement: str) -> str:
    """A CREATE TABLE with its column and constraint clauses in sorted order: MLflow's batch
    migrations recreate tables with their CHECK constraints in an order that varies from one
    process to the next (Python's string hashing), so two databases MLflow made itself can list
    them differently."""
    if not statement.startswith("CREATE TABLE"):
        return statement
    head, *clauses = statement.split("\n\t")
    return "\n\t".join([head, *sorted(c.removesuffix("\n);").rstrip(", ") for c in clauses)])


def _dump(path: Path) -> list[str]:
    """The database's schema and rows, sorted, without the folder it lies in; the experiments
    without their times; each table's clauses in sorted order (`_canonical`)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        lines = [line for line in db.iterdump() if not line.startswith('INSERT INTO "experiments"')]
        lines += [
            repr(row)
            for row in db.execute(
                "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments"
            )
        ]
    return sorted(_canonical(line).replace(str(path.parent), "FOLDER") for line in lines)


def test_a_database_from_the_template_is_the_one_mlflow_makes(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTPIPE_CACHE_DIR", str(tmp_path / "cache"))
    trackers = {}
    for name in ("built", "copied", "mlflow"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)  # MLflow's artifacts go to ./mlruns
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"  # MLflow keeps a store per URI
        if name == "mlflow":  # MLflow's own migrations
            MlflowClient(uri, registry_uri=uri).create_experiment("gptpipe")
        else:  # the first builds the template, both copy it
            trackers[name] = Tracker(uri, "gptpipe")
            trackers[name].check()
    assert len(list((tmp_path / "cache" / "mlflow-schema").glob("mlflow-*.db"))) == 1
    mlflow_made = _dump(tmp_path / "mlflow" / "mlflow.db")
    for name, tracker in trackers.items():
        assert _dump(tmp_path / name / "mlflow.db") == mlflow_made, name
        assert tracker.client.get_run(tracker.start_run("one")).info.run_name == "one"


def test_without_a_usable_cache_mlflow_makes_the_database(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("GPTPIPE_CACHE_DIR", str(blocked))
    assert not create_from_template(tmp_path / "mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "gptpipe")
    tracker.check()  # MLflow's own migrations, as before
    assert tracker.client.get_experiment_by_name("gptpipe") is not None


def test_a_stale_template_is_built_again(tmp_path):
    templates = tmp_path / "templates"
    assert create_from_template(tmp_path / "first.db", templates)
    (template,) = templates.glob("mlflow-*.db")
    template.write_bytes(b"not a database")
    assert create_from_template(tmp_path / "second.db", templates)
    with contextlib.closing(sqlite3.connect(tmp_path / "second.db")) as db:
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
