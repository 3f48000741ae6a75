"""``replay`` and ``diff`` refuse bad input in one line, and replay sends each image as it can."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from ome_zarr_images import write_ome_zarr

import phenocascade.cli.replay as replay_cli
from phenocascade.cli import main
from phenocascade.config import Settings
from phenocascade.consumers import resubmit
from phenocascade.consumers.watching import read_digest
from phenocascade.domain import ImageMeta
from phenocascade.store.images import ImageStore
from phenocascade.store.slides import read_tile
from phenocascade.streams import events

T0 = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    scans = tmp_path / "scans"
    scans.mkdir()
    local = Settings(home=tmp_path / "home", allowed_roots=[scans], max_inline_bytes=64)
    monkeypatch.setattr(replay_cli, "get_settings", lambda: local)
    monkeypatch.delenv("PHENOCASCADE_IMAGE_STORE", raising=False)
    return local


def _submit(store: ImageStore, image_id: str, data: bytes, *, path: Path | None, at: int) -> None:
    if path is not None:
        path.write_bytes(data)
        record = events.image_submitted(
            image_id, uri=str(path), fmt="PNG", meta=ImageMeta("s1", stain="H&E")
        )
    else:
        record = events.image_submitted(image_id, inline=data, fmt="PNG", meta=ImageMeta("s1"))
    store.put({**record, "submitted_at": at}, data)


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("phenocascade: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "--since", "yesterday"], "--since 'yesterday' is not an ISO 8601"),
        (["replay", "--since", "2026-12-02", "--until", "2026-12-01"], "is not before"),
        (["replay", "--study", "s1", "--until", "2026-12-01"], "--until needs --since"),
        (["replay", "--study", " "], "--study is empty"),
        (["replay", "--study", "nothing-here"], "no image of study 'nothing-here'"),
        (["diff", "--from", "minority", "--to", "minority=v2"], "--from: 'minority' is not"),
        (["diff", "--from", "minority=v2", "--to", "minority=v2"], "the same versions"),
    ],
)
def test_bad_input_is_one_line(
    settings: Settings, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    _fails(argv, capsys, message)


def test_an_ids_file_is_checked_line_by_line_and_against_the_store(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ImageStore(str(settings.home / "images"))
    _submit(store, "known", b"k", path=None, at=1)
    ids = tmp_path / "ids.txt"
    _fails(["replay", "--images", str(ids)], capsys, "no such file")
    ids.write_bytes(b"\xff\xfe")
    _fails(["replay", "--images", str(ids)], capsys, "not UTF-8 text")
    ids.write_text("# nothing\n\n")
    _fails(["replay", "--images", str(ids)], capsys, "lists no image id")
    ids.write_text("known\nbad\x07id\n")
    _fails(["replay", "--images", str(ids)], capsys, "line 2: 'bad\\x07id' is not an image id")
    ids.write_text("known\nunknown-1\nunknown-2\n")
    _fails(["replay", "--images", str(ids)], capsys, "2 of 3 ids are not in the image store")
    ids.write_text("# the one we need\nknown\nknown\n")
    assert main(["replay", "--images", str(ids), "--dry-run"]) == 0
    assert "would replay 1 images listed in" in capsys.readouterr().out


def test_each_image_goes_as_it_came_while_its_file_is_unchanged(
    settings: Settings, tmp_path: Path
) -> None:
    scans = tmp_path / "scans"
    store = ImageStore(str(settings.home / "images"))
    _submit(store, "by-path", b"unchanged", path=scans / "a.png", at=1)
    _submit(store, "by-path-rewritten", b"first", path=scans / "b.png", at=2)
    (scans / "b.png").write_bytes(b"rewritten since")
    _submit(store, "inline", b"inline bytes", path=None, at=3)
    _submit(store, "large-rewritten", b"L" * 100, path=scans / "c.png", at=4)
    (scans / "c.png").unlink()

    images = sorted(store.images(), key=lambda i: i.submitted_at)
    plan = resubmit.plan_replay(settings, store, images)
    sent = {r["image_id"]: r for r in plan.records}
    assert sent["by-path"]["uri"] == str(scans / "a.png") and sent["by-path"]["inline"] is None
    assert sent["by-path"]["metadata"]["stain"] == "H&E"
    assert sent["by-path-rewritten"]["inline"] == b"first"
    assert sent["inline"]["inline"] == b"inline bytes"
    assert plan.carried == {"path": 1, "inline": 2}
    # Too large to go inline, and the store is not under the allowed roots.
    assert "exceed PHENOCASCADE_MAX_INLINE_BYTES" in plan.left_out["large-rewritten"]
    # Under them, the stored blob goes by its path.
    roomy = settings.model_copy(update={"allowed_roots": [scans, settings.home]})
    [record], how = resubmit.replay_records(roomy, store, images[-1])
    assert how == "store" and Path(record["uri"]).read_bytes() == b"L" * 100
    for record in plan.records:
        assert record["metadata"]["study"] == "s1"


def test_a_time_span_selects_by_submission_time(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ImageStore(str(settings.home / "images"))
    for hour in range(4):
        when = events.to_epoch_ms(T0 + timedelta(hours=hour))
        _submit(store, f"h{hour}", f"{hour}".encode(), path=None, at=when)
    argv = ["replay", "--since", "2026-12-01T01:00", "--until", "2026-12-01T03:00+00:00"]
    assert main([*argv, "--dry-run"]) == 0
    assert "would replay 2 images submitted from" in capsys.readouterr().out


def _out(versions: dict[str, str], minute: int) -> dict[str, Any]:
    return {"model_versions": versions, "produced_at": T0 + timedelta(minutes=minute)}


def test_only_images_an_old_model_scored_need_rescoring() -> None:
    champions = {"minority": "d2"}
    assert replay_cli.needs_rescoring([], champions) is None
    old = _out({"quality": "q1", "minority": "d1"}, 0)
    new = _out({"quality": "q1", "minority": "d2"}, 5)
    assert replay_cli.needs_rescoring([old], champions) is True
    assert replay_cli.needs_rescoring([new, old], champions) is False
    # Skipped by the gate: the detector never saw it, a new detector changes nothing.
    assert replay_cli.needs_rescoring([_out({"quality": "q1"}, 0)], champions) is False


def _stored_slide(store: ImageStore, path: Path) -> None:
    """Keep a 600 x 400 two-level slide at ``path``, tiled 256/32 at level 0, in ``store``.

    A TIFF, or an OME-Zarr folder when ``path`` ends with ``.zarr``.
    """
    grey = np.full((400, 600), 90, np.uint8)
    if path.suffix == ".zarr":
        write_ome_zarr(path, grey, "yx", version="0.5")  # 3 levels: 600, 300 and 150 wide
    else:
        with tifffile.TiffWriter(path, ome=True) as tif:
            tif.write(grey, tile=(128, 128), subifds=1)
            tif.write(grey[::2, ::2], tile=(128, 128), subfiletype=1)
    fmt = events.format_of(path.name)
    record = events.image_submitted("slide", uri=str(path), fmt=fmt, meta=ImageMeta("s1"))
    _, digest = read_digest(path, keep=False)
    tiling = {"size": 256, "overlap": 32, "level": 0}
    store.put_file(record, path, sha256=digest, tiling=tiling)


SLIDES = pytest.mark.parametrize("name", ["slide.ome.tif", "slide.ome.zarr"])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@SLIDES
def test_a_slide_goes_as_tiles_of_its_file_or_of_its_stored_copy(
    settings: Settings, tmp_path: Path, name: str
) -> None:
    scans = settings.allowed_roots[0]
    store = ImageStore(str(scans / "store"))
    _stored_slide(store, scans / name)
    [image] = store.images()
    records, how = resubmit.replay_records(settings, store, image)
    assert how == "path" and {r["uri"] for r in records} == {str(scans / name)}
    assert [r["tile"]["index"] for r in records] == list(range(6))  # 3 x 2 tiles of 256
    assert {r["image_id"].split("#")[0] for r in records} == {"slide"}
    assert all(r["metadata"]["study"] == "s1" and r["inline"] is None for r in records)
    _remove(scans / name)
    records, how = resubmit.replay_records(settings, store, image)
    copy = store.local_path(image)
    assert how == "store" and {r["uri"] for r in records} == {str(copy)}
    assert len(records) == 6
    # The workers read each tile from the stored copy, lazily, as from the slide.
    tile = records[5]["tile"]
    pixels = read_tile(str(copy), tile, settings=settings, what=records[5]["image_id"])
    assert pixels.shape == (tile["height"], tile["width"], 1) and (pixels == 90).all()
    # A damaged copy is left out with the reason, not sent.
    damaged = sorted(p for p in copy.rglob("*") if p.is_file())[-1] if copy.is_dir() else copy
    damaged.write_bytes(b"damaged")
    plan = resubmit.plan_replay(settings, store, [image])
    assert plan.records == [] and "is missing or damaged" in plan.left_out["slide"]


@SLIDES
def test_a_slide_whose_file_is_gone_is_refused_from_a_store_it_cannot_read_lazily(
    settings: Settings, tmp_path: Path, name: str
) -> None:
    scans = settings.allowed_roots[0]
    remote = ImageStore(f"memory://{tmp_path.name}/images")
    _stored_slide(remote, scans / name)
    _remove(scans / name)
    (scans / name).write_bytes(b"rewritten")
    plan = resubmit.plan_replay(settings, remote, list(remote.images()))
    assert plan.records == [] and plan.images == 0
    assert "cannot be read tile by tile" in plan.left_out["slide"]
    # A local store outside the allowed roots is refused alike.
    outside = ImageStore(str(tmp_path / "elsewhere"))
    _stored_slide(outside, scans / f"2{name}")
    _remove(scans / f"2{name}")
    plan = resubmit.plan_replay(settings, outside, list(outside.images()))
    assert "PHENOCASCADE_ALLOWED_ROOTS" in plan.left_out["slide"]
