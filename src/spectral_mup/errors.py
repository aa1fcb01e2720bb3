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


def import_object(path: str, what: str) -> object:
    """The object an import path names (``pkg.module.attr`` or ``pkg.module:attr``), or a
    ConfigError naming ``what`` was expected."""
    import importlib

    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import {what} {path!r} ({exc}); check the path") from None
    return obj
