"""Leases in the store (storage.lease) on a local folder and on a real S3 server (moto over HTTP):
create-if-absent has one winner, a live holder makes others wait (with a bound), a dead one is
taken over, a holder that was taken over knows it lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import storage
from storage.errors import GptpipeError
from storage.lease import Holder, Lease
from tests.conftest import REPO


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    """A store of each kind: a local folder, and a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "store")
    s3_env = request.getfixturevalue("s3_env")
    return storage.join(s3_env.uri, "store")


def test_create_new_has_exactly_one_winner(store):
    uri = storage.join(store, "leases", "x", "0000000001.json")
    barrier = threading.Barrier(8)
    won: list[bytes] = []

    def race(i: int) -> None:
        data = f"writer {i}".encode()
        barrier.wait()
        if storage.create_new(uri, data):
            won.append(data)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert storage.get_bytes(uri) == won[0]  # the winner's bytes, whole
    assert not storage.create_new(uri, b"late")
    assert storage.get_bytes(uri) == won[0]
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is not there is fine
    assert storage.create_new(uri, b"again")


def test_an_uncontended_lease_is_taken_and_released(store):
    uri = storage.join(store, "leases", "train-abc")
    with Lease(uri, owner="run one", what="train-abc") as lease:
        assert lease.waited_for is None and lease.took_over is None
        held = json.loads(storage.get_bytes(storage.join(uri, "0000000001.json")))
        assert held["owner"] == "run one" and held["pid"] == os.getpid()
        assert not held["released"]
    assert json.loads(storage.get_bytes(storage.join(uri, "0000000001.json")))["released"]
    with Lease(uri, owner="run two", what="train-abc"):  # the next generation, at once
        assert storage.exists(storage.join(uri, "0000000002.json"))


def test_a_waiter_waits_for_a_live_holder_then_gets_the_lease(store):
    uri = storage.join(store, "leases", "split-k")
    said: list[str] = []
    order: list[str] = []
    holder = Lease(uri, owner="run first", what="split-k", heartbeat_s=0.2).acquire()

    def second() -> None:
        with Lease(uri, owner="run second", what="split-k", stale_s=30, on_wait=said.append) as l2:
            order.append("second")
            assert l2.waited_for is not None and l2.waited_for.owner == "run first"
            assert l2.took_over is None

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(1.5)  # several heartbeats: the holder is alive, the waiter keeps waiting
    assert order == []
    order.append("first done")
    holder.release()
    waiter.join(10)
    assert order == ["first done", "second"]
    assert said and "waiting for run first" in said[0] and "split-k" in said[0]


def test_waiting_is_bounded_with_one_line_saying_for_whom(store):
    uri = storage.join(store, "leases", "tokenize-k")
    holder = Lease(uri, owner="run busy", what="tokenize-k", heartbeat_s=0.2).acquire()
    try:
        start = time.monotonic()
        with pytest.raises(GptpipeError) as err:
            late = Lease(uri, owner="run late", what="tokenize-k", wait_s=1.0, on_wait=print)
            late.acquire()
        assert time.monotonic() - start < 5
        message = str(err.value)
        assert "\n" not in message
        assert "tokenize-k is still held by run busy" in message and "1 s" in message
    finally:
        holder.release()


def test_a_holder_without_heartbeat_is_taken_over_and_knows_it_lost(store):
    """A holder whose heartbeats stop (a frozen machine) is taken over after stale_s by the
    waiter's own clock; the old holder then refuses to publish."""
    uri = storage.join(store, "leases", "train-frozen")
    frozen = Lease(uri, owner="run frozen", what="train-frozen", heartbeat_s=3600).acquire()
    start = time.monotonic()
    said: list[str] = []
    taker = Lease(uri, owner="run taker", what="train-frozen", stale_s=1.0, on_wait=said.append)
    taker.acquire()
    assert 1.0 <= time.monotonic() - start < 8
    assert taker.took_over is not None and taker.took_over.owner == "run frozen"
    assert any("took over from run frozen" in line and "no heartbeat" in line for line in said)
    with pytest.raises(GptpipeError, match="run taker .* took over this process's lease"):
        frozen.check()
    taker.check()  # the new holder still holds it
    frozen.release()  # does not release what is no longer its own
    top = json.loads(storage.get_bytes(storage.join(uri, "0000000002.json")))
    assert top["owner"] == "run taker" and not top["released"]
    taker.release()


def test_a_foreign_unreadable_lease_is_stale_in_time(store):
    uri = storage.join(store, "leases", "odd")
    storage.put_bytes(storage.join(uri, "0000000007.json"), b"not json")
    lease = Lease(uri, owner="run", what="odd", stale_s=0.5, on_wait=lambda _: None).acquire()
    assert lease.took_over == Holder.from_bytes(b"not json", 7)
    assert lease.mine.generation == 8
    lease.release()


HOLDER_SCRIPT = """
import sys, time
from storage.lease import Lease
Lease(sys.argv[1], owner="run killed", what="train-k", heartbeat_s=0.2).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(store, tmp_path):
    """SIGKILL leaves the lease held, but its process is gone: on the same machine a waiter
    sees that at once instead of waiting for the heartbeat to go stale."""
    uri = storage.join(store, "leases", "train-k")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, uri], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        start = time.monotonic()
        lease = Lease(uri, owner="run next", what="train-k", stale_s=600, on_wait=lambda _: None)
        lease.acquire()
        assert time.monotonic() - start < 5  # not stale_s
        assert lease.took_over is not None and lease.took_over.pid == proc.pid
        lease.release()
    finally:
        if proc.poll() is None:
            proc.kill()
