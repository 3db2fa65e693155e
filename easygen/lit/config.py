"""`instantiate` for the objects the config names by `_target_` (models, strategies, loggers, ...)."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate

from easygen.errors import ConfigError


def instantiate(node, *args, **kwargs):
    """`hydra.utils.instantiate`, except that a factory's ConfigError (a check naming the key to set)
    reaches the user as itself, not wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
