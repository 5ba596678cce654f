"""The error every host adapter raises for bad input the user can fix: its message is shown as is.

Over the WebUIs' API (A1111's and the Forge family's ``modules/api/api.py``) an exception from a job answers
with the exception's own ``status_code`` (500 without one) and prints a traceback unless it is FastAPI's
``HTTPException``. A user's mistake is no server fault: ``OmgUserError`` is such an exception where FastAPI is
installed (in every WebUI), so the API answers 422 with the message and the console stays quiet; in the UI
``str(e)`` is the message alone, as before. Without FastAPI (the plain test environment) it is a ``ValueError``.
"""
from __future__ import annotations

try:
    from fastapi.exceptions import HTTPException
except ImportError:  # not in a WebUI
    HTTPException = None

USER_ERROR_STATUS = 422
"""Unprocessable: the request was understood, a value in it cannot be used (FastAPI's own status for bad values)."""

_BASES = (ValueError,) if HTTPException is None else (ValueError, HTTPException)


class OmgUserError(*_BASES):
    """Bad input the user can fix; shown as is (UI), answered as ``USER_ERROR_STATUS`` with it (API)."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.message = message
        self.status_code = USER_ERROR_STATUS
        self.detail = message

    def __str__(self) -> str:
        return self.message
