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


def provenance(command: str) -> dict[str, Any]:
    """Say what measured a section: command, commit, host, cores, torch threads, finish time."""
    import torch  # only the model benchmarks pay for it

    return {
        "command": command,
        "commit": commit(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
