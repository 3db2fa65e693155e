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


class _DropTip(logging.Filter):
    """Lightning's advertisement for its hosted logger (`💡 Tip: ... litlogger`), printed by every Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_known_warnings() -> None:
    """Silence the messages that every run printed and that do not apply to EasyGen; each says why.
    Anything else Lightning, torch or W&B warn about still shows."""
    import warnings

    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    # Frozen parts (the BiDiffuser in every LLM stage, the LLM in pretrain, the encoders in stage=bidiffuser)
    # are kept in eval mode on purpose: dropout off, no batch statistics; only the trained modules train.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
    # The caption scores are computed once on rank 0 and broadcast (callbacks/caption_eval.py), so every
    # rank logs the same number: a cross-rank reduction would change nothing.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/",
                            category=PossibleUserWarning)
    # Lightning's own pytree helper calls torch's deprecated `LeafSpec` check; no EasyGen code does, and the
    # result is the same (fixed in Lightning, not in a release this project can require yet).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    tip = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTip) for f in tip.filters):
        tip.addFilter(_DropTip())
