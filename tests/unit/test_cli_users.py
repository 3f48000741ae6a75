"""``phenocascade users add`` without a terminal: one line saying how, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_piped_password_without_password_stdin_is_one_line_naming_the_option() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PHENOCASCADE_")}
    done = subprocess.run(
        [sys.executable, "-m", "phenocascade", "users", "add", "alice", "--studies", "em"],
        env=env,
        input="s3cret-enough\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "no terminal to ask alice's password on" in done.stderr
    assert "--password-stdin" in done.stderr
