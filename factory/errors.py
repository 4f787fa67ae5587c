"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class FactoryError(Exception):
    """A problem with the user's input: the message names the file and the field."""


class ConfigError(FactoryError):
    """An invalid configuration file."""


class StoreError(FactoryError):
    """A missing, unreadable, incomplete or corrupt store."""
