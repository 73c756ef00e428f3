"""The data check stage: tonight's corpus against the one the champion was trained on, before
tokenizing (issue 26, item 4).

`check_data` profiles tonight's corpus in one streaming pass (`model.corpus_check`), keeps the
profile in the store at ``STORE/corpus-profiles/<sha256>.json`` (content-addressed, written whole),
compares it with the champion's corpus profile and, when something changed beyond the limits
(`DataChangeLimits`) and the night is not told to accept it, fails with one GptpipeError line
(a user error: not retried; the flow's failure sends the alert, and the champion stays).

Which corpus the champion was trained on (`champion_profile_uri`): its registered version's
``gptpipe.corpus_sha256`` tag (``CORPUS_TAG``: the ``corpus_sha256`` of the night's
`DataCheckResult`, set when registering); else the version's ``gptpipe.run_id`` tag leads to that
pipeline run's ``STORE/runs/<run_id>/summary.json``, whose ``stages.data_check.corpus_sha256`` names
it. A champion registered before the check has neither: tonight is then only checked for being
non-empty text (a warning says so), until a checked night's model becomes champion.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from prefect import get_run_logger, task
from pydantic import SecretStr

import storage
from model.corpus import stage_download
from model.corpus_check import (
    CorpusProfile,
    DataChangeLimits,
    compare,
    load_profile,
    profile_corpus,
    profile_uri,
    save_profile,
)
from storage.errors import GptpipeError
from storage.tracking import redact
from tasks.common import IO_RETRIES, stage_run, tracker_for
from tasks.registry import version_by_alias
from tasks.results import Workspace

# the registered version's tag naming the sha256 of the corpus its model was trained on
CORPUS_TAG = "gptpipe.corpus_sha256"
RUN_TAG = "gptpipe.run_id"  # set by tasks.register: the pipeline run that registered the version


@dataclass(frozen=True)
class DataCheckResult:
    """Tonight's corpus as checked: its profile (stored at ``profile``), what it was compared with
    (``champion_profile``; None: nothing), the problems found, and whether they were accepted."""

    source: str
    corpus_sha256: str
    bytes: int
    chars: int
    distinct_chars: int
    profile: str
    champion_profile: str | None
    problems: tuple[str, ...] = ()
    accepted: bool = False  # there were problems, and the night was told to go on anyway

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def unchanged_since_champion(self) -> bool:
        """Tonight's corpus is byte for byte the one the champion was trained on."""
        return self.champion_profile is not None and self.champion_profile == self.profile

    def to_dict(self) -> dict:
        return {**asdict(self), "problems": list(self.problems)}


def _reveal(source: str | SecretStr) -> str:
    return source.get_secret_value() if isinstance(source, SecretStr) else source


@task(name="check-data", **IO_RETRIES)
def check_data(
    source_url: str | SecretStr,
    workspace: Workspace,
    *,
    champion_profile: str | None,
    limits: DataChangeLimits = DataChangeLimits(),  # noqa: B008 - frozen, so one is safe to share
    accept: bool = False,
) -> DataCheckResult:
    """Profile tonight's corpus, keep its profile, compare it with the champion's (the profile at
    ``champion_profile``, from `champion_profile_uri`; None: there is no champion) and stop the
    night on a change beyond ``limits`` unless ``accept``. An empty or non-text corpus always
    stops it."""
    logger = get_run_logger()
    url = _reveal(source_url)
    shown = redact(url)
    with stage_run(workspace.tracking, "data_check") as run:
        local = (
            stage_download(url, workspace.store) if url.startswith(("http://", "https://")) else url
        )
        tonight = profile_corpus(local)
        uri = save_profile(workspace.store, tonight)
        previous = _champion_profile(champion_profile, logger)
        problems = compare(previous, tonight, limits)
        accepted = bool(problems) and accept and tonight.bytes > 0 and tonight.is_text
        result = DataCheckResult(
            source=shown,
            corpus_sha256=tonight.sha256,
            bytes=tonight.bytes,
            chars=tonight.chars,
            distinct_chars=tonight.distinct_chars,
            profile=uri,
            champion_profile=champion_profile if previous is not None else None,
            problems=tuple(problems),
            accepted=accepted,
        )
        run.log_params(
            {
                "source": shown,
                "corpus_sha256": tonight.sha256,
                "bytes": tonight.bytes,
                "chars": tonight.chars,
                "distinct_chars": tonight.distinct_chars,
                "champion_profile": result.champion_profile or "",
                "max_corpus_shrink": limits.max_corpus_shrink,
                "max_new_char_share": limits.max_new_char_share,
                "accepted": accepted,
            }
        )
        run.log_dict(result.to_dict(), "data_check.json")
        for line in problems:
            logger.warning("data check: %s", line)
        if problems and not accepted:
            raise GptpipeError(f"data check of {shown} failed: " + "; ".join(problems))
    if accepted:
        logger.warning("data check: going on anyway (the data change is accepted)")
    logger.info(
        "data check of %s: %s bytes, %s characters (%d distinct), sha256 %s; %s",
        shown,
        f"{tonight.bytes:,}",
        f"{tonight.chars:,}",
        tonight.distinct_chars,
        tonight.sha256[:12],
        f"compared with {result.champion_profile}"
        if previous
        else "no champion's corpus to compare with",
    )
    return result


def _champion_profile(uri: str | None, logger) -> CorpusProfile | None:
    """The champion's corpus profile; None (with a warning) when the store does not hold it."""
    if uri is None:
        return None
    if not storage.exists(uri):
        logger.warning(
            "data check: the champion's corpus profile %s is not in the store: tonight's corpus "
            "is only checked for being non-empty text",
            uri,
        )
        return None
    return load_profile(uri)


@task(name="champion-corpus", **IO_RETRIES)
def champion_profile_uri(workspace: Workspace, model_name: str) -> str | None:
    """The URI of the profile of the corpus the champion of ``model_name`` was trained on (see the
    module docstring); None when there is no champion (a warning when it does not say which
    corpus it was trained on)."""
    tracker = tracker_for(workspace.tracking)
    if tracker is None:
        return None
    champion = version_by_alias(tracker, model_name)
    if champion is None:
        return None
    sha256 = champion.tags.get(CORPUS_TAG) or _sha256_from_run(workspace.store, champion.tags)
    if not sha256:
        get_run_logger().warning(
            "data check: champion %s v%s does not say which corpus it was trained on (no %s tag, "
            "no data check in its run's summary): tonight's corpus is only checked for being "
            "non-empty text",
            model_name,
            champion.version,
            CORPUS_TAG,
        )
        return None
    return profile_uri(workspace.store, sha256)


def _sha256_from_run(store: str, tags: dict) -> str | None:
    """``stages.data_check.corpus_sha256`` of the summary of the run that registered a version."""
    try:
        return run_summary(store, tags)["stages"]["data_check"]["corpus_sha256"]
    except (KeyError, TypeError):  # no summary, or a run from before the data check
        return None


def run_summary(store: str, tags: dict) -> dict | None:
    """The summary.json of the pipeline run that registered a version (its ``gptpipe.run_id``
    tag), or None: a version a sweep registered, or a run whose summary is not in this store."""
    run_id = tags.get(RUN_TAG)
    uri = storage.join(store, "runs", run_id, "summary.json") if run_id else None
    if uri is None or not storage.exists(uri):
        return None
    try:
        summary = json.loads(storage.get_bytes(uri))
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None
