"""Shared settings and helpers of the fuzz tests (``test_fuzz_*.py``).

Every fuzz test is deterministic (``derandomize``: the same examples on every run, no
example database) and bounded: a fixed number of examples, each under a deadline, so
that a hang or a slow path fails the test instead of stalling CI.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, settings

T = TypeVar("T")

# Decoding or importing one tiny input takes milliseconds; two seconds on a loaded
# two-core runner still catches a hang or an unbounded loop.
DEADLINE = timedelta(seconds=2)


def fuzz(max_examples: int) -> settings:
    """Return the settings of one fuzz test: ``max_examples`` examples, deterministic."""
    return settings(
        max_examples=max_examples,
        deadline=DEADLINE,
        derandomize=True,
        database=None,
        # Examples write files into a fresh folder under tmp_path (see example_dir).
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


_counter = itertools.count()


@contextlib.contextmanager
def example_dir(tmp_path: Path) -> Iterator[Path]:
    """Yield an empty folder under ``tmp_path`` for one example; it is removed afterwards."""
    with tempfile.TemporaryDirectory(dir=tmp_path, prefix=f"ex{next(_counter)}-") as name:
        yield Path(name)


def outcome(call: Callable[[], T], allowed: tuple[type[BaseException], ...]) -> T | BaseException:
    """Return what ``call`` returns, or the exception it raised if its type is ``allowed``.

    Any other exception propagates, so the property test fails on it and shows it.
    """
    try:
        return call()
    except allowed as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return exc


def png_header(width: int, height: int, bit_depth: int = 8, colour: int = 0) -> bytes:
    """Return a PNG that declares ``width`` x ``height`` but holds a few pixels: a bomb.

    Its IHDR has a valid CRC and a tiny IDAT follows, so decoders accept the header.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
