"""Hangs that name the rank: heartbeats through the rendezvous store and a watchdog thread per rank.

BLOOM-176B lost days to hangs that NCCL did not time out, and a gloo or NCCL timeout, when it
comes, says only that *this* rank waited: not which rank stopped, where, or why. Here every rank
runs a :class:`Watchdog` thread that, every few seconds,

* publishes a heartbeat in the job's key-value store (torchrun's rendezvous store, or rank 0's
  under other launchers): global rank, host, pid, TP/PP/DP coordinates, the iteration and phase
  the main thread last reported through :class:`Progress`, and where the main thread is right
  now, read from its Python stack: inside a collective (``all_reduce``, ``broadcast`` ...) or
  elsewhere (computing, reading data, sleeping);
* checks its own main thread: when it has made no progress for
  ``parallel.distributed_timeout_minutes``, it reads every rank's heartbeat, names the stuck
  rank(s) (:func:`diagnose`) and ends the process with :data:`EXIT_HANG`. A main thread blocked
  in a collective ignores SIGTERM, so the exit is ``os._exit`` from this thread.

Start-up (building the datasets, the model and the engine, loading or converting a checkpoint) is
published but not timed: one rank may compile DeepSpeed's ops on first use, or convert a
checkpoint, for longer than the timeout while the others wait; their collectives still end with
the process groups' timeout. From the first validation batch read on, every phase is timed.

A rank is named stuck when its heartbeat stopped (the process is stopped, dead, or its host is
unreachable) or when it is alive but outside any collective while the others wait for it.
Clocks of the hosts are assumed synchronised to within a few seconds (NTP), as on any cluster.

Tests inject a hang with :data:`FAULT_ENV` (see :class:`HangFault`); nothing else reads it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

# The exit status of a rank the watchdog stopped: timeout(1)'s, so scripts read it as "timed out".
EXIT_HANG = 124

# Test-only fault injection: "RANK:PHASE:ITERATION:ACTION", ACTION "sleep" or "stop" (SIGSTOP).
FAULT_ENV = "MEGATRON_TEST_HANG"

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Frames in these files mean the main thread is inside a collective (DeepSpeed's wrappers call torch's).
_COLLECTIVE_FILES = (os.path.join("torch", "distributed", "distributed_c10d.py"), os.path.join("deepspeed", "comm", ""))


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a twelfth of the timeout, between 0.5 s and 30 s."""
    return min(max(timeout_s / 12.0, 0.5), 30.0)


def stale_after(timeout_s: float) -> float:
    """A heartbeat older than this means its rank's process is not running (three missed beats)."""
    return 3 * heartbeat_interval(timeout_s) + 2.0


@dataclass
class Heartbeat:
    """One rank's last published state (JSON in the store)."""

    rank: int
    host: str
    pid: int
    tp: int
    pp: int
    dp: int
    iteration: int
    phase: str
    since: float  # wall time the main thread entered this phase (or last made progress in it)
    beat: float  # wall time this heartbeat was written
    collective: Optional[str]  # the collective the main thread is inside, if any
    where: str  # the innermost frame of the project's code on the main thread's stack

    def place(self) -> str:
        """``rank 3 on host-b (TP 1, PP 0, DP 1), pid 4242``."""
        return f"rank {self.rank} on {self.host} (TP {self.tp}, PP {self.pp}, DP {self.dp}), pid {self.pid}"

    def activity(self) -> str:
        """What the main thread is doing, as the heartbeat saw it."""
        doing = f"waiting in {self.collective}" if self.collective else "not in a collective"
        return f"iteration {self.iteration}, phase '{self.phase}', {doing}, at {self.where}"


def _in_project(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>: no file of ours
        return False
    path = os.path.abspath(filename)
    return path.startswith(str(_PROJECT_ROOT) + os.sep) and os.sep + "site-packages" + os.sep not in path


def describe_stack(frame) -> tuple[Optional[str], str]:
    """(the collective a thread is inside or None, its innermost frame of the project's code).

    The collective is the outermost frame in torch.distributed's or DeepSpeed's communication
    modules: the call the project made (``broadcast_object_list``), not what that call uses."""
    # Outermost frame first; source lines are not read (file I/O on every heartbeat otherwise).
    stack = traceback.StackSummary.extract(traceback.walk_stack(frame), lookup_lines=False)
    stack.reverse()
    # Decorators (DeepSpeed's log_wrapper, torch's exception-logging wrapper) and private helpers
    # are not what the caller called.
    collective = next((f.name for f in stack if any(part in f.filename for part in _COLLECTIVE_FILES)
                       and not f.name.startswith("_") and "wrapper" not in f.name), None)
    ours = next((f for f in reversed(stack) if _in_project(f.filename)), None)
    where = f"{os.path.relpath(ours.filename, _PROJECT_ROOT)}:{ours.lineno} in {ours.name}" if ours else "?"
    return collective, where


@dataclass(frozen=True)
class HangFault:
    """A test's injected hang: on ``rank``, on entering ``phase`` at ``iteration``, sleep forever
    (``sleep``: the process stays alive, its watchdog keeps beating) or stop itself with SIGSTOP
    (``stop``: as a debugger, a swapped-out or frozen process would)."""

    rank: int
    phase: str
    iteration: int
    action: str

    @classmethod
    def from_env(cls, rank: int, environ=os.environ) -> Optional["HangFault"]:
        """The fault :data:`FAULT_ENV` asks of this rank, or None."""
        value = environ.get(FAULT_ENV)
        if not value:
            return None
        try:
            fault_rank, phase, iteration, action = value.split(":")
            fault = cls(int(fault_rank), phase, int(iteration), action)
        except ValueError as exc:
            raise ValueError(f"{FAULT_ENV}={value!r}: expected RANK:PHASE:ITERATION:sleep|stop") from exc
        if fault.action not in ("sleep", "stop"):
            raise ValueError(f"{FAULT_ENV}={value!r}: the action must be sleep or stop")
        return fault if fault.rank == rank else None

    def trigger(self) -> None:
        """Hang here, announcing it (with the wall time) on stderr first."""
        print(f"fault injection: rank {self.rank} hangs ({self.action}) in iteration {self.iteration}, phase "
              f"'{self.phase}' at {time.time():.3f}", file=sys.stderr, flush=True)
        if self.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        while True:
            time.sleep(3600)


class Progress:
    """What the main thread is doing; it reports each phase and step, the watchdog reads it.

    Cheap enough to call per micro-batch: one tuple assignment (atomic under the GIL).
    """

    def __init__(self, rank: int = 0, clock: Callable[[], float] = time.time, fault: Optional[HangFault] = None):
        self.clock = clock
        self.fault = fault if fault is not None else HangFault.from_env(rank)
        # (phase, iteration, since, watched): only watched phases may not outlast the timeout.
        self.state: tuple[str, int, float, bool] = ("start-up", 0, clock(), False)
        self.changed = threading.Event()  # wakes the watchdog, which publishes the new state

    def mark(self, phase: str, iteration: Optional[int] = None, watched: bool = True) -> None:
        """The main thread enters ``phase`` (or makes progress in it) in ``iteration``
        (None: the iteration last reported). An unwatched phase is published but may last longer
        than the timeout: start-up, where one rank may compile DeepSpeed's ops on first use or
        convert a checkpoint while the others wait (their collectives still time out)."""
        if iteration is None:
            iteration = self.state[1]
        self.state = (phase, iteration, self.clock(), watched)
        self.changed.set()
        fault = self.fault
        if fault is not None and fault.phase == phase and fault.iteration == iteration:
            fault.trigger()

    def batches(self, iterable: Iterable[Any], phase_after: str = "train step") -> Iterator[Any]:
        """``iterable``'s items, reporting 'data loading' while each is read and ``phase_after``
        once it has arrived: a DataLoader that stops delivering is named as such.

        ``iter(iterable)`` is called now, not at the first item: a DataLoader draws its workers'
        seed from torch's generator then, and a resumed run restores that generator afterwards."""
        iterator = iter(iterable)

        def items() -> Iterator[Any]:
            while True:
                self.mark("data loading")
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                self.mark(phase_after)
                yield item

        return items()


@dataclass(frozen=True)
class Identity:
    """Where a rank sits: what a report needs to name it."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    host: str
    pid: int

    @classmethod
    def of_this_process(cls, rank: int, world_size: int, tp: int, pp: int, dp: int) -> "Identity":
        """This process's identity at the given grid coordinates."""
        return cls(rank, world_size, tp, pp, dp, socket.gethostname(), os.getpid())


def diagnose(beats: dict[int, Optional[Heartbeat]], world_size: int, now: float, stale_s: float,
             ) -> list[tuple[int, str]]:
    """The ranks that hold the job up, each with the reason, from every rank's last heartbeat.

    A rank is stuck when it never published a heartbeat, when its heartbeat is older than
    ``stale_s`` (its process no longer runs: stopped, dead, or on a host that cannot be
    reached), or when it is alive but outside any collective while at least one rank waits in
    one (it computes, reads data or sleeps while the others wait for it). Ranks waiting in
    collectives are not stuck themselves. An empty list: no rank stands out.
    """
    stuck = []
    waiting = any(b is not None and b.collective and now - b.beat <= stale_s for b in beats.values())
    for rank in range(world_size):
        b = beats.get(rank)
        if b is None:
            stuck.append((rank, f"rank {rank}: no heartbeat at all (it never got past setting up the process groups, "
                                "or cannot reach the store)"))
        elif now - b.beat > stale_s:
            stuck.append((rank, f"{b.place()}: no heartbeat for {now - b.beat:.0f} s (the process is stopped, dead, "
                                f"or its host unreachable); last seen in {b.activity()}"))
        elif waiting and not b.collective:
            stuck.append((rank, f"{b.place()}: alive but busy outside any collective for {now - b.since:.0f} s while "
                                f"other ranks wait; {b.activity()}"))
    return stuck


class Watchdog:
    """The per-rank thread: publishes heartbeats, and stops the process when its main thread has
    made no progress for ``timeout_s``, naming the stuck rank(s). Use as a context manager."""

    def __init__(self, progress: Progress, identity: Identity, timeout_s: float,
                 store_address: Optional[tuple[str, int]] = None, prefix: Optional[str] = None,
                 exit_fn: Callable[[int], None] = os._exit):
        self.progress, self.identity, self.timeout_s = progress, identity, timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.stale_s = stale_after(timeout_s)
        if store_address is None:
            store_address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "0")))
        self.store_address = store_address
        # torchrun keeps its store across restarts of the workers: heartbeats are per attempt.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = prefix if prefix is not None else f"megatron/heartbeat/{attempt}/"
        self.exit_fn = exit_fn
        self._store = None
        self._stop = threading.Event()
        self._main = threading.main_thread()
        self._thread = threading.Thread(target=self._run, name="megatron-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    # -- the store --------------------------------------------------------------------------------

    def _connect(self):
        if self._store is None:
            from torch.distributed import TCPStore

            host, port = self.store_address
            # Its own client connection: the main thread's may be blocked inside a collective.
            self._store = TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=timedelta(seconds=max(5.0, 2 * self.interval)))
        return self._store

    def heartbeat(self) -> Heartbeat:
        """This rank's heartbeat now."""
        phase, iteration, since, _ = self.progress.state
        frame = sys._current_frames().get(self._main.ident)
        collective, where = describe_stack(frame) if frame is not None else (None, "?")
        i = self.identity
        return Heartbeat(i.rank, i.host, i.pid, i.tp, i.pp, i.dp, iteration, phase, since, time.time(),
                         collective, where)

    def publish(self, beat: Optional[Heartbeat] = None) -> Heartbeat:
        """Write this rank's heartbeat (by default, the current one) to the store; return it."""
        beat = beat if beat is not None else self.heartbeat()
        self._connect().set(f"{self.prefix}{beat.rank}", json.dumps(asdict(beat)))
        return beat

    def read_all(self) -> dict[int, Optional[Heartbeat]]:
        """Every rank's last heartbeat (None where a rank never wrote one)."""
        store, beats = self._connect(), {}
        for rank in range(self.identity.world_size):
            key = f"{self.prefix}{rank}"
            beats[rank] = Heartbeat(**json.loads(store.get(key))) if store.check([key]) else None
        return beats

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        # Publish when the main thread moves on (so that a rank that stops without warning was last
        # seen close to where it stopped; at most 20 times a second) and once per interval (to show
        # that it lives); check its progress every second.
        published, published_at = None, 0.0
        while not self._stop.is_set():
            self.progress.changed.wait(min(self.interval, 1.0))
            self.progress.changed.clear()
            if self._stop.is_set():
                return
            mine = self.heartbeat()
            state = (mine.phase, mine.iteration, mine.since)
            if state != published or mine.beat - published_at >= self.interval:
                try:
                    self.publish(mine)
                    published, published_at = state, mine.beat
                except Exception:  # the store may be down (its host stopped): keep checking our own progress
                    pass
            if self.progress.state[3] and mine.beat - mine.since >= self.timeout_s:
                self._report(mine)
                self.exit_fn(EXIT_HANG)
                return
            self._stop.wait(0.05)

    def _report(self, mine: Heartbeat) -> None:
        limit = f"parallel.distributed_timeout_minutes={self.timeout_s / 60:g}"
        head = (f"hang: {mine.place()} made no progress for {time.time() - mine.since:.0f} s ({limit}) in "
                f"{mine.activity()}; stopping the job")
        try:
            beats = self.read_all()
            first = self._connect().add(f"{self.prefix}reported", 1) == 1
        except Exception as exc:  # the report must come out, heartbeats or not
            print(f"{head}. The heartbeats could not be read from the store at {self.store_address[0]}:"
                  f"{self.store_address[1]} ({type(exc).__name__}: {exc}): the process hosting it (torchrun's agent, "
                  "or rank 0 under other launchers) may be the one stuck", file=sys.stderr, flush=True)
            return
        now = time.time()
        stuck = diagnose(beats, self.identity.world_size, now, self.stale_s)
        lines = [head + "."]
        lines += [f"stuck: {reason}" for _, reason in stuck] or [
            "stuck: no rank stands out (every rank is alive, and either all wait in collectives, which means that "
            "ranks called different collectives, or none does); the ranks' states follow"]
        if first or not stuck:  # the first rank to report lists every rank; the others name the stuck one only
            for rank in range(self.identity.world_size):
                b = beats[rank]
                state = "no heartbeat" if b is None else f"{b.place()}: {b.activity()} (beat {now - b.beat:.0f} s ago)"
                lines.append(f"  rank {rank}: {state}")
        print("\n".join(lines), file=sys.stderr, flush=True)
