"""The HTML pages; each needs a login (without one the browser is sent to ``/login``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

from phenocascade.errors import AuthError
from phenocascade.ui.deps import AdminUser, BrowserSession, Ctx, CurrentUser, ReviewerUser
from phenocascade.ui.routers.tasks import load_task
from phenocascade.ui.security import SessionData
from phenocascade.ui.templates import render_page

router = APIRouter(tags=["pages"], include_in_schema=False)


def _logged_in(browser: SessionData | None) -> SessionData:
    if browser is None:
        raise AuthError("not logged in; log in at /login")
    return browser


@router.get("/")
def home(_user: CurrentUser) -> RedirectResponse:
    """Send a logged-in user to the queue."""
    return RedirectResponse("/queue", status_code=303)


@router.get("/queue", response_class=HTMLResponse)
def queue_page(user: CurrentUser, browser: BrowserSession) -> HTMLResponse:
    """Show the annotation queue, with filters by tier, study and minimum priority."""
    return render_page("queue", browser=_logged_in(browser), user=user)


@router.get("/tasks/{tier}/{image_id}", response_class=HTMLResponse)
def viewer_page(
    tier: str, image_id: str, ctx: Ctx, user: CurrentUser, browser: BrowserSession
) -> HTMLResponse:
    """Show the image viewer and annotation tools of one task.

    404, as for a task that does not exist, when the task is of a study the user may not
    access.
    """
    load_task(ctx, tier, image_id, user)
    return render_page(
        "viewer", browser=_logged_in(browser), user=user, tier=tier, image_id=image_id
    )


@router.get("/review", response_class=HTMLResponse)
def review_page(user: ReviewerUser, browser: BrowserSession) -> HTMLResponse:
    """Show recent annotations of a tier (reviewers and admins)."""
    return render_page("review", browser=_logged_in(browser), user=user)


@router.get("/admin/users", response_class=HTMLResponse)
def users_page(user: AdminUser, browser: BrowserSession) -> HTMLResponse:
    """Show user management (admins)."""
    return render_page("users", browser=_logged_in(browser), user=user)
