"""Kill-and-compare: run a command, SIGKILL it at random moments, start it again until it
finishes, and say in which phase each kill landed.

Nothing here knows the training code: a run is a command line, its phase is read from the
files it leaves (a :class:`PhaseProbe` per kind of run), and its result is compared afterwards
by the caller. The random choices of a trial come from one seed, logged with every kill, so a
failing trial replays with ``run_trials.py --seeds SEED``; only the moments the operating
system schedules differ between a trial and its replay.

How a kill moment is chosen (:func:`kill_plan`): for each start, either a uniformly random time
within the reference run's duration (whatever the run is doing then), or, to reach short phases
such as a checkpoint save, the first moment the probe sees a given phase: the first kill of a
trial aims at the phase its kind of run is there to test, later ones at a phase drawn at random. The phase is read again just before the signal is sent and that reading is the
one reported.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

POLL_SECONDS = 0.002
PhaseProbe = Callable[[], str]  # the phase a run is in now, read from its files


@dataclass
class Kill:
    """One SIGKILL: when, in which phase, and how far the run had come."""

    attempt: int
    seconds: float  # after the start of this attempt
    aimed_at: str  # "random time" or the phase waited for
    phase: str  # what the probe read just before the signal
    progress: Optional[int] = None  # the run's own progress measure at the kill (steps logged)
    resumed_from: Optional[int] = None  # where the next attempt started again (filled in later)


@dataclass
class Outcome:
    """A run driven to completion through kills."""

    seed: int
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0
    returncode: int = 0
    seconds: float = 0.0
    logs: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready form for the trials report."""
        return {"seed": self.seed, "attempts": self.attempts, "returncode": self.returncode,
                "seconds": round(self.seconds, 2), "kills": [asdict(k) for k in self.kills],
                "logs": [str(p) for p in self.logs]}


def run_once(command: list[str], env: dict[str, str], log: Path, timeout: float) -> int:
    """Run ``command`` to the end (output to ``log``); its exit status."""
    with open(log, "wb") as out:
        return subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              start_new_session=True).returncode


RANDOM_TIME = "random time"


def kill_plan(rng: random.Random, kills: int, phases: list[str], random_times: bool = True) -> list[str]:
    """What each of ``kills`` kills aims at: the first at ``phases[0]`` (the phase a kind of run
    exists to test, so that a short one such as a save is hit in every trial), the others at a
    random phase of ``phases`` or (``random_times``) a random time."""
    choices = [RANDOM_TIME, RANDOM_TIME, *phases] if random_times else phases
    return [phases[0]] + [rng.choice(choices) for _ in range(kills - 1)]


def run_with_kills(command: list[str], env: dict[str, str], logs: Path, probe: PhaseProbe, aims: list[str],
                   rng: random.Random, duration: float, *, victim: Callable[[subprocess.Popen], Optional[int]] =
                   lambda p: p.pid, progress: Callable[[], Optional[int]] = lambda: None,
                   restart: bool = True, timeout: float = 600.0, seed: int = 0,
                   on_start: Callable[[], None] = lambda: None) -> Outcome:
    """Start ``command`` and SIGKILL it once per entry of ``aims`` (:func:`kill_plan`), restarting it each time
    (``restart`` False: the command restarts itself, e.g. torchrun --max-restarts, and is only
    waited for); then let it finish. ``victim(popen)`` is the pid to kill (a worker of a
    launcher, say; None while there is none yet); ``progress()`` reads how far the run got,
    recorded with each kill; ``on_start()`` is called at every start (a probe resets there).

    ``duration``: an uninterrupted run's wall time, the range of the random kill times.
    """
    logs.mkdir(parents=True, exist_ok=True)
    outcome, start = Outcome(seed), time.monotonic()
    process = None
    try:
        kills = len(aims)
        for attempt in range(kills + 1):
            log = logs / f"attempt{attempt}.log"
            outcome.logs.append(log)
            if process is None or restart:
                out = open(log, "wb")
                process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
                out.close()
            outcome.attempts += 1
            on_start()
            began = time.monotonic()
            if attempt == kills:
                break
            aimed = aims[attempt]
            deadline = began + (rng.uniform(0.0, duration) if aimed == RANDOM_TIME else timeout)
            pid = None
            while process.poll() is None and time.monotonic() < began + timeout:
                ready = probe() == aimed if aimed != RANDOM_TIME else time.monotonic() >= deadline
                pid = victim(process) if ready else None
                if pid is not None:
                    break
                time.sleep(POLL_SECONDS)
            if process.poll() is not None:  # finished before the moment came: no kill
                if process.returncode != 0:
                    raise RuntimeError(f"the run failed with exit status {process.returncode} (see {log})")
                break
            if pid is None:
                raise RuntimeError(f"the run did not reach {aimed!r} within {timeout:.0f} s (see {log})")
            phase = probe()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it ended on its own between the reading and the signal
            outcome.kills.append(Kill(attempt, round(time.monotonic() - began, 3), aimed, phase, progress()))
            if restart:
                process.wait(timeout)
        process.wait(timeout)
        outcome.returncode = process.returncode
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    outcome.seconds = time.monotonic() - start
    return outcome


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), e.g. the workers of a torchrun agent."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)
