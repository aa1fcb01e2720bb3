"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class SmupError(Exception):
    """A mistake in user input (config, data, checkpoint, arguments).

    The message is one line that says what to change; the CLI prints it without a
    traceback. Programming errors are ordinary exceptions and keep their traceback.
    """


class ConfigError(SmupError, ValueError):
    """An invalid configuration value or an unknown configuration key."""


class DataError(SmupError, OSError):
    """A data file that is missing, unreadable or fails its checksum."""


class CheckpointError(SmupError):
    """A checkpoint that cannot be loaded or does not belong to this run."""
