"""The image store: content addressing, manifests, retention, on local and fsspec stores."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from phenocascade.domain import ImageMeta
from phenocascade.errors import ConfigError, NotFoundError, ValidationError
from phenocascade.store.images import ImageStore, configured_store, content_digest
from phenocascade.streams import events

DAY_MS = 86_400_000


def _record(image_id: str, *, uri: str | None, at: int, study: str = "s1") -> dict[str, Any]:
    if uri is None:
        record = events.image_submitted(image_id, inline=b"-", fmt="PNG", meta=ImageMeta(study))
    else:
        record = events.image_submitted(image_id, uri=uri, fmt="PNG", meta=ImageMeta(study))
    return {**record, "submitted_at": at}


@pytest.fixture(params=["folder", "file-url", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ImageStore:
    """The same store as a plain folder, a file:// URL and a non-local fsspec filesystem."""
    if request.param == "folder":
        return ImageStore(str(tmp_path / "images"))
    if request.param == "file-url":
        return ImageStore(f"file://{tmp_path}/images")
    return ImageStore(f"memory://phenocascade-{uuid.uuid4().hex}")


def test_a_stored_image_reads_back_with_its_manifest(store: ImageStore) -> None:
    stored = store.put(_record("a", uri="/scans/a.png", at=1000), b"pixels of a")
    assert stored is not None
    got = store.get("a")
    assert got == stored
    assert got.sha256 == hashlib.sha256(b"pixels of a").hexdigest()
    assert (got.uri, got.size, got.format, got.study) == ("/scans/a.png", 11, "PNG", "s1")
    assert store.read(got) == b"pixels of a"
    assert store.get("never-stored") is None


def test_a_file_is_copied_in_chunks_and_refused_if_it_changed(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("phenocascade.store.images._CHUNK_BYTES", 7)
    scan = tmp_path / "scan.png"
    scan.write_bytes(b"pixels written by a scanner")
    digest = hashlib.sha256(scan.read_bytes()).hexdigest()
    stored = store.put_file(_record("f", uri=str(scan), at=1), scan, sha256=digest)
    assert stored is not None and stored.size == 27 and store.get("f") == stored
    assert store.read(stored) == b"pixels written by a scanner"

    scan.write_bytes(b"pixels written by a scanner, and more")
    with pytest.raises(ValidationError, match="changed while it was copied"):
        store.put_file(_record("g", uri=str(scan), at=2), scan, sha256="0" * 64)
    # Nothing is kept of it: no manifest, no blob, no temporary file.
    assert store.get("g") is None
    assert store.prune(10, dry_run=True).blobs == 0
    local = store.local_path(stored)
    if local is not None:
        assert [p.name for p in local.parents[1].rglob("*") if p.is_file()] == [local.name]


def test_ids_with_any_characters_are_kept_apart(store: ImageStore) -> None:
    ids = ["../../etc/passwd", "plate 1/A01", "a" * 400, "..", "ümlaut"]
    for n, image_id in enumerate(ids):
        store.put(_record(image_id, uri=None, at=n), f"bytes {n}".encode())
    for n, image_id in enumerate(ids):
        got = store.get(image_id)
        assert got is not None and store.read(got) == f"bytes {n}".encode()
    assert sorted(i.image_id for i in store.images()) == sorted(ids)


def test_the_same_bytes_under_two_ids_are_kept_once(tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path / "images"))
    store.put(_record("a", uri="/scans/a.png", at=1), b"same")
    store.put(_record("b", uri=None, at=2), b"same")
    assert len([p for p in (tmp_path / "images" / "blobs").rglob("*") if p.is_file()]) == 1
    a, b = store.get("a"), store.get("b")
    assert a is not None and b is not None and a.sha256 == b.sha256


def test_a_resubmitted_id_points_at_its_new_bytes(store: ImageStore) -> None:
    store.put(_record("a", uri="/scans/a.png", at=1), b"old")
    store.put(_record("a", uri="/scans/a.png", at=2), b"new")
    got = store.get("a")
    assert got is not None and store.read(got) == b"new" and got.submitted_at == 2
    assert [i.image_id for i in store.images()] == ["a"]


def test_damaged_or_missing_bytes_are_refused(tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path / "images"))
    image = store.put(_record("a", uri="/scans/a.png", at=1), b"pixels")
    assert image is not None
    blob = store.local_path(image)
    assert blob is not None and blob.read_bytes() == b"pixels"
    blob.write_bytes(b"pixelz")
    with pytest.raises(NotFoundError, match="no longer holds"):
        store.read(image)
    blob.unlink()
    with pytest.raises(NotFoundError, match="missing"):
        store.read(image)


def test_prune_drops_expired_inline_images_and_unused_bytes_only(store: ImageStore) -> None:
    now = 100 * DAY_MS
    store.put(_record("old-inline", uri=None, at=now - 31 * DAY_MS), b"old inline")
    store.put(_record("old-path", uri="/scans/p.png", at=now - 400 * DAY_MS), b"old path")
    store.put(_record("new-inline", uri=None, at=now - DAY_MS), b"new inline")
    # Shares its bytes with a kept image: the bytes stay.
    store.put(_record("old-shared", uri=None, at=now - 90 * DAY_MS), b"new inline")
    store.put(_record("rewritten", uri="/scans/r.png", at=1), b"first content")
    store.put(_record("rewritten", uri="/scans/r.png", at=2), b"second content")

    dry = store.prune(now, dry_run=True)
    assert dry.expired_images == ["old-inline", "old-shared"] and dry.blobs == 2
    assert store.get("old-inline") is not None

    report = store.prune(now)
    assert report.expired_images == ["old-inline", "old-shared"]
    assert (report.blobs, report.bytes) == (2, len(b"old inline") + len(b"first content"))
    kept = {i.image_id: store.read(i) for i in store.images()}
    assert kept == {
        "old-path": b"old path",
        "new-inline": b"new inline",
        "rewritten": b"second content",
    }
    assert store.prune(now).blobs == 0


def test_retention_zero_keeps_no_inline_image_and_none_keeps_all(tmp_path: Path) -> None:
    none = ImageStore(str(tmp_path / "zero"), inline_days=0)
    assert none.put(_record("i", uri=None, at=1), b"x") is None
    assert none.put(_record("p", uri="/scans/p.png", at=1), b"y") is not None
    assert [i.image_id for i in none.images()] == ["p"]
    forever = ImageStore(str(tmp_path / "forever"), inline_days=None)
    forever.put(_record("i", uri=None, at=0), b"x")
    assert forever.prune(10**15).expired_images == []


def test_the_environment_picks_the_store_and_its_retention(tmp_path: Path) -> None:
    default = configured_store(tmp_path, {})
    assert default is not None and default.url == str((tmp_path / "images").resolve())
    assert default.inline_days == 30.0
    assert configured_store(tmp_path, {"PHENOCASCADE_IMAGE_STORE": "off"}) is None
    chosen = configured_store(
        tmp_path,
        {
            "PHENOCASCADE_IMAGE_STORE": f"file://{tmp_path}/elsewhere",
            "PHENOCASCADE_IMAGE_STORE_INLINE_DAYS": "forever",
        },
    )
    assert chosen is not None and chosen.inline_days is None
    assert chosen.url == f"file://{tmp_path}/elsewhere"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PHENOCASCADE_IMAGE_STORE_INLINE_DAYS": "a week"}, "expected a number of days"),
        ({"PHENOCASCADE_IMAGE_STORE_INLINE_DAYS": "-1"}, "expected a number of days"),
        ({"PHENOCASCADE_IMAGE_STORE_INLINE_DAYS": "nan"}, "expected a number of days"),
        ({"PHENOCASCADE_IMAGE_STORE": "nosuchprotocol://x"}, "fsspec cannot open it"),
    ],
)
def test_invalid_store_settings_say_which_and_why(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        configured_store(tmp_path, env)


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


ZARR_FILES = {"zarr.json": b"{}", "0/zarr.json": b"{}", "0/c/0/0": b"chunk 00", "0/c/0/1": b"01"}


def test_a_folder_digest_is_that_of_its_sorted_sha256sum_listing(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "s.ome.zarr", ZARR_FILES)
    listing = "".join(
        f"{hashlib.sha256(ZARR_FILES[rel]).hexdigest()}  {rel}\n" for rel in sorted(ZARR_FILES)
    )
    assert content_digest(folder) == hashlib.sha256(listing.encode()).hexdigest()
    assert content_digest(folder / "0/c/0/0") == hashlib.sha256(b"chunk 00").hexdigest()
    # Where it lies does not count; a file's content, a file's name, an empty file do.
    moved = _folder(tmp_path / "elsewhere" / "t", ZARR_FILES)
    assert content_digest(moved) == content_digest(folder)
    digests = {content_digest(folder)}
    for change in ("rewrite", "rename", "add"):
        copy = _folder(tmp_path / change, ZARR_FILES)
        if change == "rewrite":
            (copy / "0/c/0/1").write_bytes(b"10")
        elif change == "rename":
            (copy / "0/c/0/1").rename(copy / "0/c/0/2")
        else:
            (copy / "0/c/9").write_bytes(b"")
        digests.add(content_digest(copy))
    assert len(digests) == 4
    (folder / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValidationError, match="holds a symbolic link"):
        content_digest(folder)
    with pytest.raises(FileNotFoundError):
        content_digest(tmp_path / "gone")


def test_a_folder_is_copied_file_by_file_under_its_digest_and_pruned_whole(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("phenocascade.store.images._CHUNK_BYTES", 3)
    folder = _folder(tmp_path / "s.ome.zarr", ZARR_FILES)
    digest = content_digest(folder)
    record = _record("slide", uri=str(folder), at=1)
    stored = store.put_file(record, folder, sha256=digest, tiling={"size": 256})
    assert stored is not None and store.get("slide") == stored
    assert stored.sha256 == digest and stored.size == sum(map(len, ZARR_FILES.values()))
    local = store.local_path(stored)
    if local is not None:  # the copy is a folder of the same content, read where it lies
        assert local.is_dir() and content_digest(local) == digest
        assert (local / "0/c/0/0").read_bytes() == b"chunk 00"

    (folder / "0/c/0/1").write_bytes(b"written since")
    with pytest.raises(ValidationError, match="changed while it was copied"):
        store.put_file(_record("changed", uri=str(folder), at=2), folder, sha256="0" * 64)
    assert store.get("changed") is None
    # The slide is kept (one blob, its files together); resubmitted with new content, its old
    # copy is removed whole.
    assert store.prune(10, dry_run=True).blobs == 0
    store.put_file(_record("slide", uri=str(folder), at=3), folder, sha256=content_digest(folder))
    report = store.prune(10)
    assert (report.blobs, report.bytes) == (1, sum(map(len, ZARR_FILES.values())))
    if local is not None:
        assert not local.exists()
    kept = store.get("slide")
    assert kept is not None and store.prune(10).blobs == 0
    if (copy := store.local_path(kept)) is not None:
        assert content_digest(copy) == kept.sha256
