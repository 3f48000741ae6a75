"""Keep the processes of ``phenocascade run`` alive: restart the dead, leave the rest.

A process that exits (a crash, a kill -9, an out-of-memory kill) is started again after a
backoff that doubles with each quick failure (1 s, 2 s, 4 s ... at most 60 s) and falls back
to the minimum once the process has stayed up for a while. The other processes keep
running meanwhile: their work is in Kafka, and a restarted worker resumes from its
group's committed offsets. Every restart is logged and counted.
"""

from __future__ import annotations

import logging
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Counter as MetricCounter

log = logging.getLogger(__name__)

RESTARTS = MetricCounter(
    "phenocascade_process_restarts_total", "Processes restarted by the supervisor", ["process"]
)

Launcher = Callable[[str, Sequence[str]], "subprocess.Popen[bytes]"]


@dataclass
class _Child:
    args: list[str]
    proc: subprocess.Popen[bytes] | None
    started_at: float
    backoff_s: float
    restart_at: float | None = None


class Supervisor:
    """Start named processes and restart any that exits, with exponential backoff.

    Parameters
    ----------
    commands : Mapping of str to sequence of str
        ``{process name: arguments}``, as :func:`phenocascade.cli.cascade.cascade_commands`.
    launch : callable
        ``(name, args) -> Popen``: starts one process (its output goes to its log).
    min_backoff_s : float, default 1.0
        Wait before the first restart of a process.
    max_backoff_s : float, default 60.0
        Longest wait; the wait doubles with each exit of a process that ran less than
        ``stable_s``.
    stable_s : float, default 60.0
        A process that ran this long before it exited is restarted after ``min_backoff_s``.
    """

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        launch: Launcher,
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        stable_s: float = 60.0,
    ) -> None:
        self.commands = {name: list(args) for name, args in commands.items()}
        self.launch = launch
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.restarts: Counter[str] = Counter()
        self._children: dict[str, _Child] = {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The running process of each name (a name waiting for its restart is left out)."""
        return {n: c.proc for n, c in self._children.items() if c.proc is not None}

    def start(self, now: float) -> None:
        """Start every process."""
        for name, args in self.commands.items():
            proc = self.launch(name, args)
            self._children[name] = _Child(args, proc, now, self.min_backoff_s)

    def poll(self, now: float) -> list[str]:
        """Schedule the restart of every process that exited; restart those that are due.

        Returns the names restarted by this call.
        """
        restarted = []
        for name, child in self._children.items():
            if child.proc is not None and child.proc.poll() is not None:
                ran = now - child.started_at
                if ran >= self.stable_s:
                    child.backoff_s = self.min_backoff_s
                log.warning(
                    "process %s exited with status %s after %.0f s; restarting it in %.0f s",
                    name,
                    child.proc.returncode,
                    ran,
                    child.backoff_s,
                )
                child.proc = None
                child.restart_at = now + child.backoff_s
                child.backoff_s = min(self.max_backoff_s, child.backoff_s * 2)
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.proc = self.launch(name, child.args)
                child.started_at, child.restart_at = now, None
                self.restarts[name] += 1
                RESTARTS.labels(name).inc()
                log.warning("restarted %s (restart %d)", name, self.restarts[name])
                restarted.append(name)
        return restarted
