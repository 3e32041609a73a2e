"""Who is looking at the dashboard, with the API's own key check.

A browser signs in once: the key is kept in a cookie (`HttpOnly`: no script reads it;
`SameSite=Strict`: no other site's page sends it) and checked like a Bearer key on every
request, so a page shows exactly what the API would show that key. Scripts send
`Authorization: Bearer KEY` instead. Buttons that change something (cancel, sign out) carry a
CSRF token bound to the key; a request authenticated by its header needs none (another site
cannot make a browser send one).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request

from ._errors import APIError
from ._state import server_state

__all__ = ["COOKIE", "LoginNeeded", "Viewer", "check_csrf", "csrf_token", "viewer"]

#: The cookie holding the key a browser signed in with.
COOKIE = "llmbatch_key"


@dataclass(frozen=True, slots=True)
class Viewer:
    """The caller: its owner tag (what the store records), the key it signed in with (None on
    an open server or with a Bearer header) and whether a browser's cookie (or nothing, on an
    open server) identified it: those requests need a CSRF token to change anything."""

    owner: str
    key: str | None
    needs_csrf: bool


class LoginNeeded(Exception):
    """The server has keys and the request brought none (or a cookie whose key is no longer accepted)."""

    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = why


def viewer(request: Request) -> Viewer:
    """The caller of a dashboard request; raises LoginNeeded or (a wrong Bearer key) APIError 401."""
    srv = server_state(request)
    auth = request.headers.get("authorization")
    if auth:
        return Viewer(srv.owner_of(auth), None, needs_csrf=False)
    if not srv.has_keys:
        return Viewer("", None, needs_csrf=True)  # open: any page may post to us, so forms need the token
    key = request.cookies.get(COOKIE)
    if not key:
        raise LoginNeeded()
    try:
        return Viewer(srv.owner_of(f"Bearer {key}"), key, needs_csrf=True)
    except APIError:
        raise LoginNeeded("That key is no longer accepted; sign in again.") from None


def _secret(request: Request) -> bytes:
    # One per server process: a restart makes open pages' buttons ask for a reload, nothing worse.
    state = request.app.state
    if not hasattr(state, "csrf_secret"):
        state.csrf_secret = secrets.token_bytes(32)
    secret: bytes = state.csrf_secret
    return secret


def csrf_token(request: Request, who: Viewer) -> str:
    """The token a form of this viewer's page carries: bound to its key, so another key's page's
    token is refused."""
    return hmac.new(_secret(request), f"{who.owner}:{who.key or ''}".encode(), hashlib.sha256).hexdigest()


def check_csrf(request: Request, who: Viewer, token: str | None) -> None:
    """APIError 403 unless the request may change something: a header-authenticated request, or a
    form with this viewer's token from a page of this server."""
    if not who.needs_csrf:
        return
    origin = request.headers.get("origin")
    if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
        raise APIError(403, f"Refused: the form was sent from another site ({origin}).", code="csrf_failed")
    if not token or not hmac.compare_digest(token, csrf_token(request, who)):
        raise APIError(403, "Refused: the form's CSRF token is missing or stale; reload the page.", code="csrf_failed")
