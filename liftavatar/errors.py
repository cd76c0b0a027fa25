"""Errors for bad input.

A :class:`LiftAvatarError` carries one sentence that names the input and says what to do; the
CLI prints it and exits with code 2. Anything else that escapes is a bug and keeps its traceback.
"""


class LiftAvatarError(Exception):
    """Bad input: the message names the input and the fix."""


class CaptureError(LiftAvatarError):
    """A Capture directory is missing, malformed or inconsistent."""


class VideoError(LiftAvatarError):
    """A video or image file cannot be read or written."""


class ConfigError(LiftAvatarError):
    """A command-line option or config value is out of range or inconsistent."""
