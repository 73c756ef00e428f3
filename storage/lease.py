"""Leases in the store: one worker at a time on a piece of work named by a key.

Two runs that need the same content-keyed result (the same tokenization, split or training) must
not both compute it, and a team's runs may sit on different machines that share nothing but the
store. So the lock lives in the store, and is built from the one atomic primitive both backends
have, create-if-absent (`storage.create_new`: a hard link locally, ``If-None-Match: *`` on S3):

* A lease is a folder of numbered *generations*, ``LEASE/0000000001.json`` and up. The highest
  generation is the lease's state: held by the process it names, or released.
* Acquiring creates generation N+1 where N is the highest; of several racing processes exactly one
  succeeds, the others look again. Numbers only grow, so a late writer can never bring an old
  generation back to the top.
* The holder rewrites its generation every `heartbeat_s` (a counter goes up) from a thread. A
  waiter judges the heartbeat by *its own* clock - the generation's content has not changed for
  `stale_s` - so clocks that differ between machines do not matter. On the holder's own machine
  (same boot, same PID namespace) a holder whose process is gone is dead at once.
* A dead holder is taken over the same way: by creating the next generation. The new holder
  learns whose work it continues (`took_over`), so a training can resume from its checkpoint.
* Releasing rewrites the holder's generation as released; a holder that finds a higher
  generation than its own has lost the lease (it was not heard from for `stale_s`) and must not
  publish its result (`check`).

Waiting is bounded (`wait_s`) and says for whom it waits (`on_wait`, every 30 s).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import storage
from storage.errors import GptpipeError

# The defaults, each overridable from the environment (tests shorten them; a slow shared store
# may want longer ones). A waiter takes over after STALE_S without a heartbeat.
HEARTBEAT_S = float(os.environ.get("GPTPIPE_LEASE_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("GPTPIPE_LEASE_STALE_S", "60"))
WAIT_S = float(os.environ.get("GPTPIPE_LEASE_WAIT_S", str(6 * 3600)))  # the deployments' limit
PROGRESS_EVERY_S = 30.0


@cache
def _host_id() -> str:
    """What makes a pid meaningful: this boot of this machine and this PID namespace (two
    containers may share a host name, never a PID namespace inode with the same boot id)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""  # nothing to tell processes apart by: judge holders by their heartbeat only
    return "|".join(parts)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (field 22 of /proc/PID/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    """Whether the process that wrote a lease on this machine still runs (not a reused pid)."""
    if os.path.isdir("/proc/self"):
        now = _process_start(pid)
        return now is not None and (started is None or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """One generation of a lease: who holds (or held) it."""

    owner: str
    host: str
    pid: int
    generation: int
    host_id: str = ""
    pid_start: str | None = None
    beats: int = 0
    released: bool = False
    nonce: str = ""

    def describe(self) -> str:
        return f"{self.owner} (host {self.host}, pid {self.pid})"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, generation: int) -> Holder:
        try:
            fields = json.loads(data)
            return cls(**{**fields, "generation": generation})
        except (ValueError, TypeError):  # not ours: a holder nobody hears from, stale in time
            return cls(owner="an unreadable lease", host="?", pid=0, generation=generation)


class Lease:
    """``with Lease(uri, owner="run X", what="train-KEY"):`` the block runs while no other
    process holds the lease at ``uri`` (a store folder of its own).

    After entering: ``waited_for`` is the holder this process waited for (None if it waited for
    nobody), ``took_over`` the dead holder whose work it continues (None if none).
    """

    def __init__(
        self,
        uri: str,
        *,
        owner: str,
        what: str,
        wait_s: float | None = None,
        stale_s: float | None = None,
        heartbeat_s: float | None = None,
        on_wait: Callable[[str], None] = print,
    ):
        self.uri = uri
        self.what = what
        self.wait_s = WAIT_S if wait_s is None else wait_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.on_wait = on_wait
        self.mine = Holder(
            owner=owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            generation=0,
            host_id=_host_id(),
            pid_start=_process_start(os.getpid()),
            nonce=secrets.token_hex(8),
        )
        self.waited_for: Holder | None = None
        self.took_over: Holder | None = None
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._write = threading.Lock()

    # --------------------------------------------------------------------------- names

    def _name(self, generation: int) -> str:
        return storage.join(self.uri, f"{generation:010d}.json")

    def _generations(self) -> list[int]:
        names = (u.rsplit("/", 1)[-1] for u in storage.list_uris(self.uri))
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _top(self) -> Holder | None:
        """The highest generation, or None if there is none (read again if it just vanished)."""
        for _ in range(5):
            generations = self._generations()
            if not generations:
                return None
            try:
                return Holder.from_bytes(
                    storage.get_bytes(self._name(generations[-1])), generations[-1]
                )
            except GptpipeError:
                if storage.exists(self._name(generations[-1])):
                    raise
        raise GptpipeError(f"the lease {self.uri} keeps changing under this process: try again")

    # --------------------------------------------------------------------------- acquiring

    def _dead(self, holder: Holder, unchanged_s: float) -> str | None:
        """Why ``holder`` no longer holds the lease, or None while it may still."""
        same_machine = bool(holder.host_id) and holder.host_id == self.mine.host_id
        if same_machine and not _alive(holder.pid, holder.pid_start):
            return "its process is gone"
        if unchanged_s >= self.stale_s:
            return f"no heartbeat for {unchanged_s:.0f} s"
        return None

    def _create(self, generation: int) -> bool:
        mine = replace(self.mine, generation=generation)
        if not storage.create_new(self._name(generation), mine.to_bytes()):
            return False
        self.mine = mine
        for old in self._generations():  # the history below the previous one is of no use
            if old < generation - 1:
                storage.delete(self._name(old))
        self._beat_thread = threading.Thread(
            target=self._beat, name=f"lease {self.what}", daemon=True
        )
        self._beat_thread.start()
        return True

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        seen: dict[int, tuple[Holder, float]] = {}  # generation -> (content, when it last changed)
        said = -PROGRESS_EVERY_S
        while True:
            top = self._top()
            if top is None or top.released:
                if self._create(top.generation + 1 if top else 1):
                    return self
                continue
            now = time.monotonic()
            if top.generation not in seen or seen[top.generation][0] != top:
                seen[top.generation] = (top, now)
            why = self._dead(top, now - seen[top.generation][1])
            if why is not None:
                if self._create(top.generation + 1):
                    self.took_over = top
                    self.on_wait(f"{self.what}: took over from {top.describe()}: {why}")
                    return self
                continue
            self.waited_for = top
            if now >= deadline:
                raise GptpipeError(
                    f"{self.what} is still held by {top.describe()} after waiting "
                    f"{self.wait_s:.0f} s: wait for it to finish, or stop it (its lease is "
                    f"taken over {self.stale_s:.0f} s after it stops)"
                )
            if now - said >= PROGRESS_EVERY_S:
                said = now
                self.on_wait(
                    f"{self.what}: waiting for {top.describe()}, which is computing it "
                    f"(up to {deadline - now:.0f} s more; its result will be re-used)"
                )
            time.sleep(min(2.0, self.heartbeat_s, max(deadline - now, 0.05)))

    # --------------------------------------------------------------------------- holding

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                top = self._generations()[-1:]
                if top and top[0] > self.mine.generation:
                    self.lost_to = self._top()
                    return
                with self._write:
                    if self._stop.is_set():
                        return
                    self.mine = replace(self.mine, beats=self.mine.beats + 1)
                    storage.put_bytes(self._name(self.mine.generation), self.mine.to_bytes())
            except GptpipeError:
                continue  # the store hiccuped: the next beat tries again (others wait stale_s)

    def check(self) -> None:
        """Raise if another process took the lease over (this one was not heard from for
        stale_s): its result, not this one's, is the one to keep."""
        if self.lost_to is None:
            top = self._generations()[-1:]
            if top and top[0] > self.mine.generation:
                self.lost_to = self._top()
        if self.lost_to is not None:
            raise GptpipeError(
                f"{self.what}: {self.lost_to.describe()} took over this process's lease (no "
                f"heartbeat from here for {self.stale_s:.0f} s); its result is the one kept: "
                "run again to re-use it"
            )

    def release(self) -> None:
        """Stop beating and mark the lease released (unless it was lost: then it is not ours)."""
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()
        with self._write:
            top = self._generations()[-1:]
            if top and top[0] == self.mine.generation:
                self.mine = replace(self.mine, released=True)
                storage.put_bytes(self._name(self.mine.generation), self.mine.to_bytes())

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
