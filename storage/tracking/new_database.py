"""A new sqlite tracking database as a copy of a template of MLflow's empty schema.

MLflow makes the tables of a new sqlite database by running all its schema migrations (alembic:
about 70 of them, each DDL statement a transaction of its own, about a thousand fsyncs): about
0.9 s of CPU on our 2-core machines, and from 0.2 s to several seconds more waiting on the disk,
in every fresh working folder, before a first run can start. For one MLflow version that empty
schema is always the same, so it is built once into a template in the user's cache folder
(`storage.local.cache_dir`: mlflow-schema/, named by MLflow's version and latest schema revision;
built with sqlite's syncs off, then synced once) and a new database is a copy of it. MLflow opens
the copy as a database it made itself: every table there, at its latest revision; it adds the
Default experiment (with this folder's artifact location) as it does to any new database.

This leans on two of MLflow's internals (`mlflow.store.db.utils._initialize_tables`, which its
store calls on a new database, and `_get_latest_schema_revision`). Anything that goes wrong here
(an MLflow without them, a cache folder that cannot be written) leaves the database uncreated,
and MLflow creates it as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from storage.local import atomic_write, cache_dir

_log = logging.getLogger(__name__)


def create_from_template(path: Path, templates: Path | None = None) -> bool:
    """Create the sqlite database ``path``, which does not exist yet, as a copy of the template
    (built first if there is none in ``templates``, by default the cache folder's); True if it
    did, False if it left the database to MLflow. The caller holds the database's lock."""
    try:
        template = _template(templates or cache_dir() / "mlflow-schema")
        with template.open("rb") as source, atomic_write(path) as target:
            shutil.copyfileobj(source, target)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure: MLflow creates the database itself
        _log.debug("no template for the new tracking database %s: %s", path, exc)
        return False


def _template(folder: Path) -> Path:
    """The template for this MLflow, built now if it is missing or not at the latest revision."""
    import mlflow
    from mlflow.store.db.utils import _get_latest_schema_revision

    revision = _get_latest_schema_revision()
    template = folder / f"mlflow-{mlflow.__version__}-{revision}.db"
    if _revision(template) != revision:
        _build(template)
        if _revision(template) != revision:
            raise RuntimeError(f"the template {template} is not at revision {revision}")
    return template


def _revision(path: Path) -> str | None:
    """The schema revision of the sqlite database at ``path``; None if it cannot be read."""
    if not path.is_file():
        return None
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _build(template: Path) -> None:
    """MLflow's empty schema, made as its store makes it, into ``template`` (all or nothing:
    built in a folder of its own, synced once, then renamed into place)."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent, prefix=".building-") as tmp:
        built = Path(tmp) / template.name
        engine = sqlalchemy.create_engine(f"sqlite:///{built}")

        @sqlalchemy.event.listens_for(engine, "connect")
        def _no_syncs(connection, _record) -> None:  # a half-built template is thrown away
            connection.execute("PRAGMA synchronous = OFF")

        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        fd = os.open(built, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(built, template)
