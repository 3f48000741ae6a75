"""Serve the app's HTML pages: package files with ``{{name}}`` placeholders, HTML-escaped.

The pages are static apart from the CSRF token and the user's name and role; the scripts
under ``static/`` fetch everything else from the JSON API.
"""

from __future__ import annotations

import functools
import html
from importlib import resources

from fastapi.responses import HTMLResponse

from phenocascade.ui.security import SessionData, User


@functools.cache
def _page(name: str) -> str:
    return resources.files("phenocascade.ui").joinpath("pages", f"{name}.html").read_text()


def render_page(
    name: str, *, browser: SessionData, user: User | None = None, **values: str
) -> HTMLResponse:
    """Return page ``pages/<name>.html`` with its placeholders filled in.

    Parameters
    ----------
    name : str
        Page file stem, e.g. ``"queue"``.
    browser : SessionData
        The session whose CSRF token the page's scripts will send back.
    user : User or None, default None
        The logged-in user (``None`` on the login page).
    **values : str
        Further placeholders.
    """
    fields = {
        "csrf_token": browser.csrf,
        "username": user.username if user else "",
        "role": user.role.value if user else "",
        **values,
    }
    text = _page(name)
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return HTMLResponse(text, headers={"Cache-Control": "no-store"})
