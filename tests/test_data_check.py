"""Bad nights caught before training (issue 26, item 4): corpus profiles (model.corpus_check) of
real files, what `compare` lets through and what it stops (with the line it says), the limits'
validation, and the check-data stage on Prefect's engine over a local folder store and moto's S3
server, with the champion's corpus found through a real MLflow registry (sqlite)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import random
import threading
from contextlib import contextmanager

import pytest

from model.corpus_check import (
    ACCEPT_HINT,
    CorpusProfile,
    DataChangeLimits,
    compare,
    load_profile,
    profile_corpus,
    profile_uri,
    save_profile,
)
from storage.errors import GptpipeError
from tasks.common import retry_unless_user_error
from tests.quiet_http import QuietHTTPServer

LIMITS = DataChangeLimits()
SECRET = "night-pass-5Jq2"
GREEK = "Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν, καὶ θεὸς ἦν ὁ λόγος.\n"


@pytest.fixture(scope="module")
def shakespeare(corpus_path) -> str:
    return corpus_path.read_text(encoding="utf-8")


def write(path, data: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def profile_of(tmp_path, data: str | bytes, name: str = "corpus.txt") -> CorpusProfile:
    return profile_corpus(str(write(tmp_path / name, data)))


# ---------------------------------------------------------------------------------------------
# Profiles


def test_profile_of_tiny_shakespeare(corpus_path, shakespeare):
    raw = corpus_path.read_bytes()
    profile = profile_corpus(str(corpus_path))
    assert profile.sha256 == hashlib.sha256(raw).hexdigest()
    assert (profile.bytes, profile.chars, profile.files) == (len(raw), len(shakespeare), 1)
    assert profile.charset == frozenset(shakespeare) and profile.distinct_chars == 65
    assert dict(profile.char_counts)["e"] == shakespeare.count("e")
    assert profile.is_text and profile.control_chars == 0


def test_small_chunks_and_a_folder_give_the_profile_of_the_whole(tmp_path, shakespeare):
    text = shakespeare[:5000] + GREEK * 3 + "emoji 😀 at the end\n"
    whole = profile_of(tmp_path, text)
    # 7-byte chunks cut multi-byte characters (2, 3 and 4 bytes) everywhere
    assert profile_corpus(str(tmp_path / "corpus.txt"), chunk_bytes=7) == whole
    folder = tmp_path / "nights"
    raw = text.encode("utf-8")
    write(folder / "a.txt", raw[:3000])
    write(folder / "b" / "c.txt", raw[3000:])
    write(folder / ".hidden", b"\x00not corpus")  # skipped, as model.corpus reads a folder
    parts = profile_corpus(str(folder), chunk_bytes=64)
    assert parts.files == 2
    assert (parts.sha256, parts.chars, parts.char_counts) == (
        whole.sha256,
        whole.chars,
        whole.char_counts,
    )


def test_profile_json_round_trip_and_its_place_in_the_store(tmp_path, shakespeare):
    profile = profile_of(tmp_path, shakespeare[:2000] + GREEK)
    store = str(tmp_path / "store")
    uri = save_profile(store, profile)
    assert uri == profile_uri(store, profile.sha256)
    assert uri.endswith(f"/corpus-profiles/{profile.sha256}.json")
    assert load_profile(uri) == profile
    assert save_profile(store, profile) == uri  # content-addressed: kept once
    broken = write(tmp_path / "store" / "corpus-profiles" / "x.json", "{}")
    with pytest.raises(GptpipeError, match="not a readable corpus profile"):
        load_profile(str(broken))
    with pytest.raises(GptpipeError, match="not found"):
        load_profile(profile_uri(store, "0" * 64))


# ---------------------------------------------------------------------------------------------
# What passes and what stops


def test_a_grown_corpus_with_a_few_new_characters_passes(tmp_path, shakespeare):
    previous = profile_of(tmp_path, shakespeare[: len(shakespeare) // 2], "night1.txt")
    tonight = profile_of(tmp_path, shakespeare + "Zoë’s café\n", "night2.txt")
    assert tonight.charset - previous.charset  # it has new characters
    assert compare(previous, tonight, LIMITS) == []
    assert compare(None, tonight, LIMITS) == []
    assert compare(tonight, tonight, DataChangeLimits(0, 0)) == []  # unchanged


def test_a_sharply_shrunk_corpus_stops_with_the_numbers_and_how_to_accept_it(tmp_path, shakespeare):
    previous = profile_of(tmp_path, shakespeare, "night1.txt")
    tonight = profile_of(tmp_path, shakespeare[:300_000], "night2.txt")  # 73.1% smaller
    [line] = compare(previous, tonight, LIMITS)
    assert "shrank by 73.1% (1,115,394 -> 300,000 bytes)" in line
    assert "max_corpus_shrink 0.5" in line
    assert ACCEPT_HINT in line and "--accept-data-change" in line
    assert "accept_data_change: true" in line
    assert "set max_corpus_shrink to 0.74 or more" in line
    assert "\n" not in line
    # the setting it names lets it pass; a bit less does not
    assert compare(previous, tonight, DataChangeLimits(max_corpus_shrink=0.74)) == []
    assert compare(previous, tonight, DataChangeLimits(max_corpus_shrink=0.73)) != []
    # shrinking within the limit passes
    half = profile_of(tmp_path, shakespeare[:600_000], "night3.txt")
    assert compare(previous, half, LIMITS) == []


def test_an_empty_corpus_always_stops(tmp_path, shakespeare):
    empty = profile_of(tmp_path, b"")
    assert (empty.bytes, empty.chars, empty.files) == (0, 0, 0)
    previous = profile_of(tmp_path, shakespeare[:1000], "before.txt")
    for before in (None, previous):
        [line] = compare(before, empty, DataChangeLimits(1, 1))
        assert "empty (0 bytes)" in line
    write(tmp_path / "folder" / "a.txt", b"")
    write(tmp_path / "folder" / "b.txt", b"")
    assert compare(None, profile_corpus(str(tmp_path / "folder")), LIMITS) != []


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("random", "is not UTF-8 text: invalid byte 0x"),
        ("gzip", "is not UTF-8 text: invalid byte 0x8b at offset 1;"),
        ("nul", "looks binary (NUL byte at offset 1000)"),
        ("controls", "are control characters (at most 1% may be)"),
        ("late", "is not UTF-8 text: invalid byte 0xff at offset 20000;"),
    ],
)
def test_a_corpus_that_is_not_text_always_stops(tmp_path, shakespeare, kind, expected):
    text = shakespeare[:20_000].encode("utf-8")
    data = {
        "random": random.Random(7).randbytes(50_000),
        "gzip": gzip.compress(text),
        "nul": text[:1000] + b"\x00" + text[1000:],
        "controls": text[:5000] + b"\x1b[0m" * 200,  # ESC: 200 of 5800 characters
        "late": text + b"\xff" + text,  # past the first chunks
    }[kind]
    tonight = profile_corpus(str(write(tmp_path / "night.bin", data)), chunk_bytes=4096)
    assert not tonight.is_text and expected in tonight.not_text
    assert tonight.sha256 == hashlib.sha256(data).hexdigest() and tonight.bytes == len(data)
    previous = profile_of(tmp_path, shakespeare[:20_000], "before.txt")
    for before in (None, previous):
        [line] = compare(before, tonight, DataChangeLimits(1, 1))
        assert line.startswith("tonight's corpus is not text: ") and expected in line


def test_a_few_control_characters_are_still_text(tmp_path, shakespeare):
    tonight = profile_of(tmp_path, shakespeare[:20_000] + "\x0c\x1b\t\r\n")
    assert tonight.is_text and tonight.control_chars == 1  # \x0c \t \r \n are whitespace


def test_a_corpus_of_mostly_new_characters_stops(tmp_path, shakespeare):
    previous = profile_of(tmp_path, shakespeare, "night1.txt")
    tonight = profile_of(tmp_path, shakespeare[:2000] + GREEK * 200, "night2.txt")
    any_size = DataChangeLimits(max_corpus_shrink=1)  # it is much smaller, too
    [line] = compare(previous, tonight, any_size)
    new = sorted(tonight.charset - previous.charset)
    new_count = sum(n for c, n in tonight.char_counts if c in set(new))
    share = new_count / tonight.chars
    assert f"{share:.1%} of tonight's characters ({new_count:,} of {tonight.chars:,})" in line
    assert f"{len(new)} character(s) the champion's corpus never had" in line
    assert repr("".join(new[:12])) in line and f"and {len(new) - 12} more" in line
    assert "max_new_char_share 0.1" in line and ACCEPT_HINT in line
    suggested = line.rsplit("set max_new_char_share to ", 1)[1].split()[0]
    passing = DataChangeLimits(max_corpus_shrink=1, max_new_char_share=float(suggested))
    assert compare(previous, tonight, passing) == []
    # both at once: two lines
    both = profile_of(tmp_path, GREEK * 200, "night3.txt")
    assert len(compare(previous, both, LIMITS)) == 2


@pytest.mark.parametrize(
    "setting, value",
    [
        ("max_corpus_shrink", 1.5),
        ("max_corpus_shrink", -0.1),
        ("max_new_char_share", float("nan")),
        ("max_new_char_share", True),
        ("max_corpus_shrink", "0.5"),
        ("max_new_char_share", None),
    ],
)
def test_bad_limits_are_one_line_naming_the_setting(setting, value):
    with pytest.raises(GptpipeError) as raised:
        DataChangeLimits(**{setting: value})
    message = str(raised.value)
    assert message.startswith(f"{setting} must be a fraction between 0 and 1")
    assert repr(value) in message and "\n" not in message


def test_the_ends_of_the_limits_are_allowed():
    assert DataChangeLimits(0, 1) == DataChangeLimits(max_corpus_shrink=0, max_new_char_share=1)
    assert DataChangeLimits(1.0, 0.0).max_corpus_shrink == 1.0


# ---------------------------------------------------------------------------------------------
# The stage on Prefect's engine


@pytest.fixture()
def on_server(prefect_server):
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield
        # send the queued logs and events while the server answers (after the session's server
        # stopped, they would retry for a minute at exit; as in tests/test_alerts.py)
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


def run_checks(store: str, nights: list[tuple[str, dict]]) -> list[tuple]:
    """check_data of each (source, options) in turn, in one flow on the engine: for each, (its
    result or None, its error message or None)."""
    from prefect import flow

    from tasks.data_check import check_data
    from tasks.results import Workspace

    @flow(name="data-check-test")
    def week():
        outcomes = []
        for source, options in nights:
            state = check_data(source, Workspace(store), return_state=True, **options)
            if state.is_completed():
                outcomes.append((state.result(), None))
                continue
            assert state.is_failed()
            assert not retry_unless_user_error(None, None, state)  # a user error: not retried
            with pytest.raises(GptpipeError) as raised:
                state.result()
            outcomes.append((None, str(raised.value)))
        return outcomes

    return week()


def failure(outcome) -> str:
    result, message = outcome
    assert result is None and message is not None
    assert "\n" not in message
    return message


@contextmanager
def served(folder):
    """The files of ``folder`` over http on loopback; the server's base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_stage_on_a_local_store(on_server, tmp_path, shakespeare):
    store = str(tmp_path / "store")
    nights = tmp_path / "in"
    night1 = write(nights / "night1.txt", shakespeare[:400_000])
    grown = write(nights / "night2.txt", shakespeare)
    shrunk = write(nights / "night3.txt", shakespeare[:100_000])
    empty = write(nights / "night4.txt", b"")
    binary = write(nights / "night5.gz", gzip.compress(shakespeare[:1000].encode()))
    champion = profile_uri(store, sha256_of(night1))
    lost = profile_uri(store, "f" * 64)
    with served(nights) as host:
        # an http(s) corpus is staged into the store first; its user:password@ is never shown
        url = f"http://night:{SECRET}@{host}/night3.txt"
        outcomes = run_checks(
            store,
            [
                (str(night1), {"champion_profile": None}),
                (str(grown), {"champion_profile": champion}),
                (str(shrunk), {"champion_profile": champion}),
                (str(shrunk), {"champion_profile": champion, "accept": True}),
                (str(shrunk), {"champion_profile": champion, "limits": DataChangeLimits(0.8)}),
                (str(empty), {"champion_profile": champion, "accept": True}),
                (str(binary), {"champion_profile": None, "accept": True}),
                (str(shrunk), {"champion_profile": lost}),
                (url, {"champion_profile": champion}),
            ],
        )
    first, second = outcomes[0][0], outcomes[1][0]
    assert first.passed and not first.accepted and first.champion_profile is None
    assert first.corpus_sha256 == sha256_of(night1)
    assert first.profile == champion
    assert load_profile(first.profile).bytes == first.bytes == 400_000
    assert json.loads(json.dumps(first.to_dict()))["problems"] == []
    assert second.passed and second.champion_profile == champion  # it grew

    message = failure(outcomes[2])
    assert message.startswith(f"data check of {shrunk} failed: tonight's corpus shrank by 75.0%")
    assert "--accept-data-change" in message
    assert load_profile(profile_uri(store, sha256_of(shrunk))).bytes == 100_000  # kept anyway
    accepted = outcomes[3][0]
    assert accepted.accepted and not accepted.passed and "shrank" in accepted.problems[0]
    assert outcomes[4][0].passed  # a higher limit
    # an empty or non-text night cannot be accepted
    assert "empty (0 bytes)" in failure(outcomes[5])
    assert "is not text: input " in failure(outcomes[6])
    assert "is not UTF-8 text: invalid byte 0x8b at offset 1;" in failure(outcomes[6])
    # a champion's profile that the store does not hold: a warning, and only the text checks
    assert outcomes[7][0].passed and outcomes[7][0].champion_profile is None
    message = failure(outcomes[8])
    assert message.startswith(f"data check of http://{host}/night3.txt failed: ")
    assert SECRET not in message and "shrank by 75.0%" in message
    assert load_profile(profile_uri(store, sha256_of(shrunk))).sha256 == sha256_of(shrunk)


def test_the_stage_on_s3(on_server, s3_env, shakespeare):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env.endpoint)
    text = shakespeare[:200_000].encode("utf-8")
    for key, body in (("corpus/a.txt", text[:90_000]), ("corpus/b.txt", text[90_000:])):
        client.put_object(Bucket=s3_env.bucket, Key=key, Body=body)
    client.put_object(Bucket=s3_env.bucket, Key="tonight.txt", Body=text[:50_000])
    store = f"{s3_env.uri}/store"
    champion = f"{store}/corpus-profiles/{hashlib.sha256(text).hexdigest()}.json"
    outcomes = run_checks(
        store,
        [
            (f"{s3_env.uri}/corpus/", {"champion_profile": None}),
            (f"{s3_env.uri}/tonight.txt", {"champion_profile": champion}),
        ],
    )
    first = outcomes[0][0]
    assert first.passed and first.corpus_sha256 == hashlib.sha256(text).hexdigest()
    assert first.profile == champion
    assert load_profile(first.profile) == profile_corpus(f"{s3_env.uri}/corpus/")
    assert "shrank by 75.0% (200,000 -> 50,000 bytes)" in failure(outcomes[1])


# ---------------------------------------------------------------------------------------------
# Which corpus the champion was trained on


def test_the_champions_corpus_is_found_from_its_version(on_server, tmp_path, shakespeare):
    from prefect import flow

    from storage.tracking import Tracker
    from tasks.data_check import CORPUS_TAG, RUN_TAG, champion_profile_uri, check_data
    from tasks.registry import CHAMPION
    from tasks.results import Tracking, Workspace

    store = str(tmp_path / "store")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    workspace = Workspace(store, Tracking(tracking_uri))
    client = Tracker(tracking_uri).client
    name = "data-check-model"

    client.create_registered_model(name)

    def champion(tags: dict) -> None:
        version = client.create_model_version(name, source=str(tmp_path), tags=tags)
        client.set_registered_model_alias(name, CHAMPION, version.version)

    summary = {"stages": {"data_check": {"corpus_sha256": "b" * 64}}}
    write(tmp_path / "store" / "runs" / "night-2" / "summary.json", json.dumps(summary))
    write(tmp_path / "store" / "runs" / "night-0" / "summary.json", json.dumps({"stages": {}}))
    night1 = write(tmp_path / "in" / "night1.txt", shakespeare[:200_000])
    night2 = write(tmp_path / "in" / "night2.txt", shakespeare[:20_000])

    @flow(name="champion-corpus-test")
    def lookups():
        found = [champion_profile_uri(workspace, name)]  # no champion yet
        champion({CORPUS_TAG: "a" * 64, RUN_TAG: "night-1"})
        found.append(champion_profile_uri(workspace, name))
        champion({RUN_TAG: "night-2"})  # no tag: the run's summary says which corpus
        found.append(champion_profile_uri(workspace, name))
        champion({RUN_TAG: "night-0"})  # a champion from before the data check
        found.append(champion_profile_uri(workspace, name))
        # as the nights will be wired: check, register with the corpus tag, check the next night
        checked = check_data(str(night1), workspace, champion_profile=found[-1])
        champion({CORPUS_TAG: checked.corpus_sha256, RUN_TAG: "night-3"})
        found.append(champion_profile_uri(workspace, name))
        state = check_data(str(night2), workspace, champion_profile=found[-1], return_state=True)
        found.append(state.is_failed() and "shrank by 90.0%" in str(state.message))
        return found

    assert lookups() == [
        None,
        profile_uri(store, "a" * 64),
        profile_uri(store, "b" * 64),
        None,
        profile_uri(store, sha256_of(night1)),
        True,
    ]
    # each check is a stage run in MLflow: FINISHED, then FAILED
    runs = client.search_runs(
        [Tracker(tracking_uri).experiment_id], "attributes.run_name = 'data_check'"
    )
    assert sorted((r.data.params["bytes"], r.info.status) for r in runs) == [
        ("20000", "FAILED"),
        ("200000", "FINISHED"),
    ]
