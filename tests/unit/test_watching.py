"""The pure parts of ``phenocascade watch``: settling, marker files, content ids, the ledger."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from phenocascade.consumers.watching import (
    DEFAULT_PATTERNS,
    Ledger,
    SettleTracker,
    content_id,
    matches,
    read_digest,
    signature,
    zarr_folder,
)
from phenocascade.errors import ConfigError, ConflictError


def _write(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_file_is_complete_only_after_its_size_and_mtime_stay_put_for_the_settle_time(
    tmp_path: Path,
) -> None:
    f = tmp_path / "a.tif"
    tracker = SettleTracker(settle_s=2.0)
    _write(f, b"", 1)
    tracker.touch(f, now=0.0)
    assert tracker.ready(0.0) == []
    assert tracker.ready(5.0) == [], "an empty file is never complete"
    _write(f, b"half", 2)
    assert tracker.ready(5.5) == []
    assert tracker.ready(7.0) == [], "1.5 s unchanged is not enough"
    _write(f, b"half+rest", 3)
    assert tracker.ready(7.4) == [], "a new chunk restarts the clock"
    assert tracker.ready(9.4) == [(f, (9, 3))]
    # Same size, new mtime (rewritten in place): not complete until it settles again.
    _write(f, b"HALF+REST", 4)
    assert tracker.ready(9.5) == []
    assert tracker.ready(11.5) == [(f, (9, 4))]


def test_a_taken_file_is_followed_again_only_after_a_new_event(tmp_path: Path) -> None:
    f = tmp_path / "a.png"
    _write(f, b"data", 1)
    tracker = SettleTracker(settle_s=1.0)
    tracker.touch(f, 0.0)
    tracker.ready(0.0)
    [(path, _)] = tracker.ready(1.0)
    tracker.done(path)
    assert tracker.ready(2.0) == [] and len(tracker) == 0
    _write(f, b"new data", 2)
    tracker.touch(f, 3.0)
    tracker.ready(3.0)
    assert tracker.ready(4.0) == [(f, (8, 2))]


def test_with_a_marker_only_the_marker_completes_a_file(tmp_path: Path) -> None:
    tracker = SettleTracker(settle_s=1.0, marker=".done")
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    for f in (a, b):
        _write(f, b"pixels", 1)
        tracker.touch(f, 0.0)
    assert tracker.ready(100.0) == [], "settling does not count when markers are used"
    (tmp_path / "a.tif.done").touch()
    (tmp_path / "b.done").touch()
    assert sorted(p for p, _ in tracker.ready(100.0)) == [a, b]


def test_a_vanished_file_is_dropped(tmp_path: Path) -> None:
    f = tmp_path / "a.tif"
    _write(f, b"x", 1)
    tracker = SettleTracker(settle_s=1.0)
    tracker.touch(f, 0.0)
    f.unlink()
    assert tracker.ready(5.0) == [] and len(tracker) == 0


def _age_folders(top: Path) -> None:
    """Set the mtime of ``top`` and its subfolders to 5 ns, older than any file's here."""
    for folder in (top, *top.rglob("*")):
        if folder.is_dir():
            os.utime(folder, ns=(5, 5))


def test_a_zarr_folder_is_one_image_complete_once_all_it_holds_settles(tmp_path: Path) -> None:
    top = tmp_path / "scanner"
    slide = top / "run7" / "S-01.ome.zarr"
    chunk = slide / "0" / "c" / "0" / "0"
    assert zarr_folder(chunk, top) == slide
    assert zarr_folder(slide / "zarr.json", top) == slide
    assert zarr_folder(top / "run7" / "A01.tif", top) is None
    assert zarr_folder(tmp_path / "elsewhere.zarr" / "zarr.json", top) is None
    tracker = SettleTracker(settle_s=2.0)
    chunk.parent.mkdir(parents=True)
    tracker.touch(slide, 0.0)
    assert tracker.ready(5.0) == [], "a folder without bytes is never complete"
    _write(slide / "zarr.json", b"{}", 10)
    _write(chunk, b"chunk", 20)
    _age_folders(slide)
    assert tracker.ready(5.0) == []
    assert tracker.ready(7.0) == [(slide, (7, 20))]
    # A chunk more, deep in the folder: the folder is not complete until it settles again.
    _write(slide / "0" / "c" / "0" / "1", b"more", 30)
    _age_folders(slide)
    assert tracker.ready(7.5) == []
    assert tracker.ready(9.5) == [(slide, (11, 30))]
    # A file rewritten with the same size and an older mtime: its folder's mtime moved.
    (slide / "0" / "c" / "0" / "1").unlink()
    _write(slide / "0" / "c" / "0" / "1", b"MORE", 1)
    moved = signature(slide)
    assert moved is not None and moved[0] == 11 and moved[1] > 30
    assert tracker.ready(9.6) == [], "it changed: not complete"
    # With a marker beside the folder, only the marker completes it.
    marked = SettleTracker(settle_s=1.0, marker=".done")
    marked.touch(slide, 0.0)
    assert marked.ready(100.0) == []
    (slide.parent / "S-01.ome.zarr.done").touch()
    assert [p for p, _ in marked.ready(100.0)] == [slide]


def test_content_ids_depend_on_the_bytes_only(tmp_path: Path) -> None:
    data = b"\x89PNG fake"
    (tmp_path / "one.png").write_bytes(data)
    (tmp_path / "two.png").write_bytes(data)
    kept, digest = read_digest(tmp_path / "one.png", keep=True)
    streamed, same = read_digest(tmp_path / "two.png", keep=False)
    assert kept == data and streamed is None
    assert digest == same == hashlib.sha256(data).hexdigest()
    assert content_id(digest, "lab-") == "lab-" + digest[:16]
    assert content_id(hashlib.sha256(data + b"!").hexdigest()) != content_id(digest)


def test_patterns_match_case_insensitively() -> None:
    assert matches("SCAN_01.TIF", ("*.tif",))
    assert not matches("scan_01.tif.part", ("*.tif",))
    assert matches("S-01.OME.ZARR", DEFAULT_PATTERNS)


def test_the_ledger_resolves_pending_ids_from_what_the_topic_holds(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "w", "images.submitted")
    ledger.add_pending([("a", "sa", "/a"), ("b", "sb", "/b")], now=1.0)
    ledger.mark_published(["a"], {0: 5, 1: 3})
    ledger.add_pending([("c", "sc", "/c"), ("d", "sd", "/d")], now=2.0)
    ledger.close()  # a crash: c and d were in a transaction of unknown outcome

    ledger = Ledger(tmp_path / "w", "images.submitted")
    assert ledger.pending() == {"b", "c", "d"}
    assert ledger.offsets() == {0: 5, 1: 3}
    landed, lost = ledger.resolve({"c", "x"})
    assert (landed, lost) == ({"c"}, {"b", "d"})
    assert ledger.is_published("a") and ledger.is_published("c")
    assert not ledger.is_published("b") and ledger.pending() == set()
    assert ledger.published_count() == 2
    ledger.mark_published([], {0: 4, 2: 7})
    assert ledger.offsets() == {0: 5, 1: 3, 2: 7}, "offsets never move back"
    ledger.close()


def test_the_ledger_knows_files_taken_unchanged_whose_content_is_published(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "w", "t")
    ledger.add_pending([("a", "sa", "/x/a.png"), ("b", "sb", "/x/b.png")], now=1.0)
    ledger.mark_published(["a"], {})
    ledger.remember_files([(Path("/x/a.png"), (10, 5), "a"), (Path("/x/b.png"), (7, 5), "b")])
    assert ledger.knows_file(Path("/x/a.png"), (10, 5))
    assert not ledger.knows_file(Path("/x/a.png"), (10, 6)), "touched since: read it again"
    assert not ledger.knows_file(Path("/x/b.png"), (7, 5)), "b is not published"
    ledger.close()


def test_one_state_serves_one_watcher_and_one_topic(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "w", "t1")
    with pytest.raises(ConflictError, match="another watcher"):
        Ledger(tmp_path / "w", "t1")
    ledger.close()
    with pytest.raises(ConfigError, match="belongs to topic 't1'"):
        Ledger(tmp_path / "w", "t2")
