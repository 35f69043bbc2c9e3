"""Errors that reach the user.

Every problem the user can fix (a missing path, a bad config, an unsupported size) is raised as a
`MeissonicError` with a one-line message that names the problem and, where it helps, what to do.
The CLI prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class MeissonicError(Exception):
    """A problem with the user's input, explained in one line."""


class ModelDirError(MeissonicError):
    """A model directory, subfolder or file is missing or laid out wrongly."""


class ConfigError(MeissonicError):
    """A config file has an unknown, missing or invalid value."""


class WeightsError(MeissonicError):
    """A weights file is not safetensors, or does not match its config."""


class OptionsError(MeissonicError):
    """A generation or export option is out of range."""
