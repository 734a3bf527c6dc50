"""Errors the backend reports to users: a one-line message, an optional hint, an exit status."""


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

    code = "cancelled"
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
