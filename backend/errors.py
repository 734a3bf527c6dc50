"""Errors the backend reports to users: a one-line message, an optional hint, an exit status."""

from __future__ import annotations

from .protocol import CANCELLED_CODE


class BackendError(Exception):
    """An error with a message meant for the user. ``code`` names it on the wire."""

    code = "internal"
    exit_status = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class InputError(BackendError):
    """The image or an option is unusable (exit status 2)."""

    code = "bad_input"
    exit_status = 2


class WeightsError(BackendError):
    """Model files are missing, unreadable or do not match the expected layout (exit status 3)."""

    code = "weights"
    exit_status = 3


class LicenceNotAccepted(BackendError):
    """The model's weights carry a licence the user has not accepted yet (exit status 4)."""

    code = "licence_not_accepted"
    exit_status = 4


class Cancelled(BackendError):
    """The job was cancelled by the user."""

    code = CANCELLED_CODE
    exit_status = 130

    def __init__(self, message: str = "Cancelled", hint: str = ""):
        super().__init__(message, hint)


class OutOfMemory(BackendError):
    """The device ran out of memory."""

    code = "out_of_memory"

    def __init__(self, message: str = "ran out of memory", hint: str = ""):
        super().__init__(message, hint or "Lower the resolution, close other GPU programs, or use the CPU.")


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def error_fields(exc: BaseException) -> dict:
    """A failure as an ``error`` event has it (code, message, hint): the worker's, a batch line's, the server's."""
    if isinstance(exc, BackendError):
        return exc.to_dict()
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError):
        return {"code": "missing_package", "message": f"The backend Python lacks the package {exc.name!r}",
                "hint": "Run Install Backend in the add-on preferences (or install torch and "
                        "backend/requirements.txt into that Python), or choose another Backend Python"}
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return {"code": "out_of_memory", "message": text,
                "hint": "Try a lower resolution, or the CPU device; Free Memory releases what the backend holds"}
    return {"code": "internal", "message": text, "hint": "The backend log (stderr) has the full traceback"}


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's text (its type where it has none), at most ``limit`` characters."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line[:limit] if limit else line
