"""The supervisor of `phenocascade run`: a dead process is restarted with backoff, the
others keep running."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from phenocascade.cli.supervise import Supervisor

SCRIPTS = {
    "crasher": "import sys; sys.exit(3)",
    "steady": "import time; time.sleep(60)",
}


def _launch(name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SCRIPTS[name]])


def _wait_exit(proc: subprocess.Popen[bytes]) -> None:
    proc.wait(30)


def test_a_dead_process_is_restarted_with_doubling_backoff_and_the_others_keep_running() -> None:
    supervisor = Supervisor(
        {"crasher": [], "steady": []}, _launch, min_backoff_s=1, max_backoff_s=4, stable_s=10
    )
    supervisor.start(0.0)
    steady = supervisor.processes["steady"]
    try:
        _wait_exit(supervisor.processes["crasher"])
        assert supervisor.poll(0.5) == []  # exit seen: restart due at 1.5
        assert "crasher" not in supervisor.processes
        assert supervisor.poll(1.4) == []
        assert supervisor.poll(1.5) == ["crasher"]
        _wait_exit(supervisor.processes["crasher"])
        supervisor.poll(2.0)  # a quick second failure: 2 s now
        assert supervisor.poll(3.9) == []
        assert supervisor.poll(4.0) == ["crasher"]
        _wait_exit(supervisor.processes["crasher"])
        supervisor.poll(4.5)  # capped at 4 s
        assert supervisor.poll(8.4) == []
        assert supervisor.poll(8.5) == ["crasher"]
        assert supervisor.restarts == {"crasher": 3}
        assert supervisor.processes["steady"] is steady and steady.poll() is None
    finally:
        for proc in supervisor.processes.values():
            proc.kill()
            proc.wait()


def test_a_process_that_ran_long_enough_restarts_after_the_minimum_again() -> None:
    supervisor = Supervisor({"crasher": []}, _launch, min_backoff_s=1, max_backoff_s=8, stable_s=5)
    supervisor.start(0.0)
    # Two quick failures: restarts at 1.1 (1 s) and 3.2 (2 s); the next wait would be 4 s.
    for exited, restart in ((0.1, 1.1), (1.2, 3.2)):
        _wait_exit(supervisor.processes["crasher"])
        supervisor.poll(exited)
        assert supervisor.poll(restart) == ["crasher"]
    _wait_exit(supervisor.processes["crasher"])
    # It exits 100 s after its last start: it was stable, so the wait is back to 1 s.
    assert supervisor.poll(103.2) == []
    assert supervisor.poll(104.2) == ["crasher"]
    supervisor.processes["crasher"].wait(30)
