"""One handler per log record.

Importing `lightning` gives its top-level logger a console handler of its own (``INFO: ...``) while the
logger still propagates to the root logger, where Hydra's `job_logging` handlers (console and the run's
log file, `conf/hydra/default.yaml`) print the same record again as ``[time][name][INFO] - ...``.
`single_handler` removes Lightning's own console handlers once the root logger has handlers, so every
record goes through the root's handlers only.
"""

from __future__ import annotations

import logging

LIGHTNING_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning_fabric",
    "pytorch_lightning",
)


def single_handler() -> None:
    import lightning.pytorch  # noqa: F401 - its import is what adds the handlers removed here

    if not logging.getLogger().handlers:
        return  # no root handler (a plain script): Lightning's own is the only one
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler:  # console handlers only; a user's file handler stays
                logger.removeHandler(h)
        logger.propagate = True
