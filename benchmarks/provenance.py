"""What measured a result: the command, the commit and the host, for every result file."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any


def commit() -> str:
    """Return HEAD's hash, with ``+dirty`` when tracked files differ from it."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    head = git("rev-parse", "HEAD") or "unknown"
    return f"{head}+dirty" if git("status", "--porcelain", "--untracked-files=no") else head


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Read when a benchmark imports this module, as its run starts: a result names the code
# that ran, not the commit HEAD had moved to by the time a long run wrote its file.
_STARTED = (commit(), _now())


def provenance(command: str) -> dict[str, Any]:
    """Say what measured a section: command, commit, host, cores, torch threads, times.

    ``commit`` is HEAD when the run started; ``commit_at_finish`` is added when HEAD or
    the tracked files changed while it ran.
    """
    import torch  # only the model benchmarks pay for it

    started_commit, started = _STARTED
    finished_commit = commit()
    return {
        "command": command,
        "commit": started_commit,
        **({"commit_at_finish": finished_commit} if finished_commit != started_commit else {}),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "started_utc": started,
        "finished_utc": _now(),
    }
