"""The errors flmnist raises for bad input: each message names the setting or file at fault."""


class FlmnistError(Exception):
    """Base class for errors a user can fix."""


class ConfigError(FlmnistError, ValueError):
    """An invalid setting; the message names the key and the allowed values."""


class DataError(FlmnistError, FileNotFoundError):
    """Missing or corrupt data; the message names the file or folder."""


class RunFailed(FlmnistError, RuntimeError):
    """The run cannot go on (no usable update for too long); the message says why."""
