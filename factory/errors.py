"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class FactoryError(Exception):
    """A problem with the user's input: the message names the file and the field.

    Every error meant for the user is one (``ConfigError``, ``StoreError`` and
    ``factory.publish.LockBusy`` are subclasses); ``str(error)`` is the one line the
    ``factory`` commands print, without a traceback.

    Examples
    --------
    >>> from factory import FactoryError, load_config
    >>> try:
    ...     load_config("missing.yaml")
    ... except FactoryError as exc:
    ...     print(exc)
    missing.yaml: no such file
    """


class ConfigError(FactoryError):
    """An invalid configuration file."""


class StoreError(FactoryError):
    """A missing, unreadable, incomplete or corrupt store."""
