"""Regression tests of holes found in review (issue 12).

The open redirect after login, the UI secret race and server paths in error messages.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
import threading
from importlib import resources
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from phenocascade.config import Settings
from phenocascade.errors import ArtifactError, ConfigError, PathNotAllowedError
from phenocascade.imaging import read_image
from phenocascade.ui import security
from phenocascade.ui.errors import install_error_handlers, public_message
from phenocascade.ui.routers.session import local_target

# Targets a browser would follow to another site: it drops tabs and line breaks anywhere in a
# URL, strips leading control characters and spaces, and reads "\" as "/".
FOREIGN_TARGETS = [
    "/\t/evil.example",  # /login?next=/%09/evil.example, as URLSearchParams decodes it
    "/\n/evil.example",
    "/\r\n/evil.example",
    "\t//evil.example",
    " /evil.example",
    "/\\evil.example",
    "\\/evil.example",
    "//evil.example/x",
    "/\x00/evil.example",
    "https://evil.example/",
    "javascript:alert(1)",
    "evil.example",
    "",
]
LOCAL_TARGETS = ["/", "/queue", "/tasks/quality/img?tier=quality", "/review#top", "/a/b//c"]


@pytest.mark.parametrize("target", FOREIGN_TARGETS)
def test_a_login_target_that_leaves_the_site_becomes_the_queue(target: str) -> None:
    assert local_target(target) == "/queue"


@pytest.mark.parametrize("target", LOCAL_TARGETS)
def test_a_path_on_this_site_is_kept(target: str) -> None:
    assert local_target(target) == target


def _run_login_js(replies: list[str]) -> list[str]:
    """Submit login.js's form once per reply of a fake server; return where the page went."""
    script = resources.files("phenocascade.ui").joinpath("static/login.js").read_text()
    driver = """
const vm = require("vm");
const [script, replies] = [process.argv[1], JSON.parse(process.argv[2])];
(async () => {
  const hrefs = [];
  for (const reply of replies) {
    let submit;
    const location = { search: "", origin: "https://app.example", href: "" };
    const sandbox = {
      URL, URLSearchParams, location,
      document: {
        getElementById: () => ({ value: "x", addEventListener: (_, f) => { submit = f; } }),
      },
      PC: { status: () => {}, api: async () => ({ next: reply }) },
    };
    vm.runInNewContext(script, sandbox);
    await submit({ preventDefault: () => {} });
    hrefs.push(location.href);
  }
  console.log(JSON.stringify(hrefs));
})();
"""
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, "-e", driver, script, json.dumps(replies)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    hrefs: list[str] = json.loads(done.stdout)
    return hrefs


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run login.js")
def test_login_js_never_leaves_the_site_whatever_the_server_answers() -> None:
    assert _run_login_js(FOREIGN_TARGETS) == ["/queue"] * len(FOREIGN_TARGETS)
    assert _run_login_js(LOCAL_TARGETS) == LOCAL_TARGETS


# The UI secret: processes starting together must share one complete secret.


def _settings(home: Path) -> Settings:
    return Settings(home=home, ui_secret=None)


def test_a_process_starting_while_another_writes_the_secret_gets_the_same_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_by_other: list[str] = []
    real_token = security.secrets.token_urlsafe

    def token_while_another_process_starts(nbytes: int) -> str:
        # The other process starts while this one is making its secret; the placeholder
        # keeps the other's own call from starting a third.
        if not seen_by_other:
            seen_by_other.append("")
            seen_by_other[0] = security.load_secret(_settings(tmp_path))
        return real_token(nbytes)

    monkeypatch.setattr(security.secrets, "token_urlsafe", token_while_another_process_starts)
    mine = security.load_secret(_settings(tmp_path))
    assert len(mine) >= 32
    assert seen_by_other == [mine]
    assert (tmp_path / "ui_secret").read_text() == mine
    assert stat.S_IMODE((tmp_path / "ui_secret").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ui_secret"]  # no temporary file left


def test_threads_starting_together_share_one_secret(tmp_path: Path) -> None:
    start = threading.Barrier(8)
    got: list[str] = []

    def load() -> None:
        start.wait()
        got.append(security.load_secret(_settings(tmp_path)))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and got[0]
    assert security.load_secret(_settings(tmp_path)) == got[0]  # kept across a restart


def test_an_empty_secret_file_is_refused_not_used(tmp_path: Path) -> None:
    (tmp_path / "ui_secret").write_text("")
    with pytest.raises(ConfigError, match=r"ui_secret is empty.*delete it"):
        security.load_secret(_settings(tmp_path))


# Error messages: the browser gets no absolute path of the server.


@pytest.mark.parametrize(
    ("message", "public"),
    [
        ("/data/scans/a.tif is missing", "a.tif is missing"),
        ("cannot read file:///data/scans/b%20c.tif", "cannot read b%20c.tif"),
        ("roots ['/data/scans', '/srv/x/datasets/']", "roots ['scans', 'datasets']"),
        ("PosixPath('/var/lib/pc/home/ui_secret')", "PosixPath('ui_secret')"),
        ("log in at /login", "log in at /login"),
        ("under var/artifacts/quality", "under var/artifacts/quality"),
        ("Kafka at http://kafka:9092/a/b", "Kafka at http://kafka:9092/a/b"),
    ],
)
def test_public_messages_keep_only_base_names(message: str, public: str) -> None:
    assert public_message(message) == public


def _error_app(exc: Exception) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    def fail() -> None:
        raise exc

    app.add_api_route("/api/fail", fail)
    app.add_api_route("/page", fail)
    return app


def _get(app: FastAPI, path: str) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            return await c.get(path)

    return asyncio.run(get())


def test_a_refused_image_path_reaches_the_browser_without_the_servers_folders(
    tmp_path: Path,
) -> None:
    root = tmp_path / "allowed-root"
    root.mkdir()
    with pytest.raises(PathNotAllowedError) as refused:
        read_image(str(tmp_path / "elsewhere" / "scan.tif"), roots=[root], max_pixels=100)
    assert str(tmp_path) in str(refused.value)  # the operator's log keeps the full paths
    app = _error_app(refused.value)
    api, page = _get(app, "/api/fail"), _get(app, "/page")
    assert api.status_code == page.status_code == 422
    for text in (api.json()["detail"], page.text):
        assert str(tmp_path) not in text and "scan.tif" in text and "allowed-root" in text


def test_a_server_error_hides_the_artifact_folder() -> None:
    api = _get(
        _error_app(ArtifactError("/srv/pc/var/artifacts/quality/v1 is missing")), "/api/fail"
    )
    assert api.status_code == 500
    assert api.json() == {"error": "artifact", "detail": "v1 is missing"}
