"""The deployments' pull step (deploy/prefect.yaml): a flow run goes to the gptpipe checkout whose
flows it runs, before Prefect loads the deployment's entrypoint (``flows/nightly.py`` ...) from
the working directory.

The step runs in the flow run's process, which a process worker starts in a temporary folder, so
the checkout must be named or known: ``$GPTPIPE_HOME`` of the flow run's environment (the worker
image sets it), else the checkout this gptpipe is imported from (``pip install -e .``: the
checkout itself), the one whose code the flow run imports anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage.errors import GptpipeError

# the checkout (or site-packages) the `flows` package is imported from
INSTALLED = Path(__file__).resolve().parents[1]


def set_working_directory(directory: str = "") -> dict[str, str]:
    """Go to ``directory`` ($GPTPIPE_HOME; Prefect makes an unset one ""), else to the checkout
    gptpipe is imported from; returns ``{"directory": ...}`` as Prefect's own step does.

    A directory that is not a gptpipe checkout is a one-line error saying what to set, where
    Prefect's step would go there and the run would fail later, loading the flow's file, with a
    bare FileNotFoundError."""
    if not directory.strip():
        home = INSTALLED  # holds flows/: this module is imported from it
    else:
        home = Path(directory).expanduser().resolve()
        if not (home / "flows" / "__init__.py").is_file():
            raise GptpipeError(
                f"GPTPIPE_HOME={directory} is not a gptpipe checkout (no flows/ in {home}): set "
                "GPTPIPE_HOME in the worker's environment to the checkout's path (from the project "
                "root: `GPTPIPE_HOME=$PWD prefect worker start --pool local`), or leave it unset "
                f"to run the checkout gptpipe is installed from, {INSTALLED}"
            )
    os.chdir(home)
    return {"directory": str(home)}
