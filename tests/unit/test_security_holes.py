"""Regression tests of holes found in review (issue 12): open redirect after login."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources

import pytest

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
