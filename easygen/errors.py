"""Errors that stop a run before training with one line saying what is wrong and which key to set."""


class ConfigError(Exception):
    """A configuration problem the user fixes by setting a key; printed as one line by run.py."""
