"""Training throughput and model FLOPs utilisation (MFU), SPEC §8.

MFU = model FLOPs per second / peak FLOP/s of one device, with the model
FLOPs of a training sample (forward + backward, e.g. 6.986 TFLOP for BiDiffuser at 512²) reported by
the LightningModule's ``flops_per_sample()``. The module sets ``last_batch_size`` (samples in this
rank's step) and optionally ``last_num_tokens`` in ``training_step``. Rates are over a sliding window
of ``window`` steps and summed over ranks (each rank runs its own batch).

The peak is ``peak_flops`` when given, else (``"auto"``) the dense bf16 peak of a known GPU (table
below, vendors' data sheets); where there is none (a CPU, an unknown GPU) ``perf/mfu`` is not logged.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import lightning.pytorch as pl
import torch

log = logging.getLogger("easygen")

# dense bf16 tensor-core peak FLOP/s per device, by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "GH200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def device_peak_flops(device) -> float | None:
    """The table's peak for a CUDA device, None for other devices and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():  # "H100 PCIe" before "H100": first match wins
        if key in name:
            return value
    return None


class ThroughputCallback(pl.Callback):
    """Log ``perf/samples_per_sec``, ``perf/tokens_per_sec`` and ``perf/mfu`` every training step."""

    def __init__(self, window: int = 20, peak_flops: float | str | None = "auto") -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if peak_flops != "auto" and peak_flops is not None and float(peak_flops) <= 0:
            raise ValueError(f"peak_flops must be > 0, 'auto' or null, got {peak_flops}")
        self.window = window
        self._peak_setting = peak_flops
        self.peak_flops: float | None = None if peak_flops in ("auto", None) else float(peak_flops)
        self._steps: deque[tuple[float, int, int]] = deque(maxlen=window)
        self._start: float | None = None
        self._paused_at: float | None = None
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._peak_setting == "auto":
            self.peak_flops = device_peak_flops(trainer.strategy.root_device)
            if self.peak_flops is None and trainer.is_global_zero:
                log.info(
                    "perf/mfu is not logged: no known peak FLOP/s for %s (set callbacks.throughput.peak_flops)",
                    trainer.strategy.root_device,
                )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    # Validation runs between two training steps: its time (generation, scoring) is not training
    # throughput, so it is taken out of the interval of the step after it.
    def on_validation_start(self, trainer, pl_module) -> None:
        self._paused_at = time.perf_counter() if self._start is not None else None

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._start is not None and self._paused_at is not None:
            self._sync(pl_module)
            self._start += time.perf_counter() - self._paused_at
        self._paused_at = None

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        # CUDA work is asynchronous: without a sync the clock measures kernel launches.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        now = time.perf_counter()
        batch_size = getattr(pl_module, "last_batch_size", None)
        if batch_size is None:
            raise AttributeError(
                f"ThroughputCallback needs {type(pl_module).__name__}.last_batch_size set in training_step"
            )
        num_tokens = getattr(pl_module, "last_num_tokens", None)
        self._steps.append((now - self._start, int(batch_size), int(num_tokens or 0)))
        self._start = now
        elapsed = sum(s[0] for s in self._steps)
        if elapsed <= 0:
            return
        world = trainer.world_size
        samples_per_sec = world * sum(s[1] for s in self._steps) / elapsed
        metrics = {"perf/samples_per_sec": samples_per_sec}
        if num_tokens is not None:
            metrics["perf/tokens_per_sec"] = world * sum(s[2] for s in self._steps) / elapsed
        flops_fn = getattr(pl_module, "flops_per_sample", None)
        if callable(flops_fn) and self.peak_flops:
            # Peak is per device, throughput summed over devices.
            metrics["perf/mfu"] = samples_per_sec * float(flops_fn()) / (self.peak_flops * world)
        self.last_metrics = metrics
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
