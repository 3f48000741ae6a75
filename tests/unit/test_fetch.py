import hashlib
import json

import pytest

from phenocascade.data import fetch
from phenocascade.errors import ConfigError, DownloadError


@pytest.fixture
def payload(tmp_path):
    src = tmp_path / "remote" / "archive.zip"
    src.parent.mkdir()
    src.write_bytes(b"microscopy " * 1000)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_right_checksum_is_accepted(tmp_path, payload):
    src, digest = payload
    remote = fetch.RemoteFile(src.as_uri(), "archive.zip", digest)
    got = fetch.download(remote, tmp_path / "dest")
    assert got.read_bytes() == src.read_bytes()
    assert not (tmp_path / "dest" / "archive.zip.part").exists()


def test_wrong_checksum_is_rejected_and_deleted(tmp_path, payload):
    src, _ = payload
    remote = fetch.RemoteFile(src.as_uri(), "archive.zip", "0" * 64)
    with pytest.raises(DownloadError, match="does not match the pinned"):
        fetch.download(remote, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_unpinned_checksum_is_refused_unless_allowed(tmp_path, payload):
    src, _ = payload
    remote = fetch.RemoteFile(src.as_uri(), "archive.zip", None)
    with pytest.raises(DownloadError, match="--allow-unverified"):
        fetch.download(remote, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()  # refused before downloading anything
    got = fetch.download(remote, tmp_path / "dest", allow_unverified=True)
    assert got.read_bytes() == src.read_bytes()


def test_missing_source_is_a_download_error(tmp_path):
    remote = fetch.RemoteFile((tmp_path / "nope.zip").as_uri(), "nope.zip", "0" * 64)
    with pytest.raises(DownloadError, match="download failed"):
        fetch.download(remote, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_fetch_by_name_from_a_manifest(tmp_path, payload):
    src, digest = payload
    manifest = tmp_path / "manifest.json"
    entry = {"url": src.as_uri(), "filename": "archive.zip", "sha256": digest}
    manifest.write_text(json.dumps({"toy": {"files": [entry]}}))
    sources = fetch.load_manifest(manifest)
    assert fetch.fetch("toy", tmp_path / "dest", manifest=sources) == [
        tmp_path / "dest" / "archive.zip"
    ]
    with pytest.raises(ConfigError, match="unknown dataset 'bccd'"):
        fetch.fetch("bccd", tmp_path / "dest", manifest=sources)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"url": "ftp://x/y.zip", "filename": "y.zip", "sha256": None}, "not an https/http/file"),
        ({"url": "https://x/y.zip", "filename": "../y.zip", "sha256": None}, "plain file name"),
        ({"url": "https://x/y.zip", "filename": "y.zip", "sha256": "abc"}, "64 lower-case hex"),
    ],
)
def test_malformed_manifest_entries_are_refused(tmp_path, entry, message):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"toy": {"files": [entry]}}))
    with pytest.raises(ConfigError, match=message):
        fetch.load_manifest(manifest)


def test_packaged_manifest_pins_the_public_originals():
    sources = fetch.load_manifest()
    assert set(sources) == {"dsb2018", "bccd", "bbbc006"}
    for source in sources.values():
        assert all(f.url.startswith("https://") for f in source.files)
