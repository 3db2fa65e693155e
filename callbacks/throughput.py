"""Training throughput and model FLOPs utilisation (MFU): Lightning's ``ThroughputMonitor`` with the
project's metric names and GPU peaks.

MFU = model FLOPs per second / peak FLOP/s of one device, with the model FLOPs of a training sample
(forward + backward, e.g. 6.986 TFLOP for BiDiffuser at 512²) reported by the LightningModule's
``flops_per_sample()``. The module sets ``last_batch_size`` (samples in this rank's step) and optionally
``last_num_tokens`` in ``training_step``. Lightning's ``Throughput`` keeps the running totals and computes
the rates over the last ``window`` steps; rank 0's counts stand for every rank (each rank runs a batch of
the same size), so the logged rates are rank 0's times the world size.

Where this differs from Lightning's monitor:

- the metrics are ``perf/samples_per_sec``, ``perf/tokens_per_sec`` and ``perf/mfu`` (global rates),
  logged every step through ``LightningModule.log`` (so they are in ``trainer.callback_metrics``);
- the clock starts at the first training batch (not at ``on_train_start``, before the data loader's
  workers are up), and a validation run is taken out whole: Lightning's monitor takes out its batches
  but counts the validation epoch end, where callbacks/caption_eval.py generates and scores captions;
- FLOPs come from ``flops_per_sample()`` times ``last_batch_size`` (Lightning reads ``flops_per_batch``);
- the peak is ``peak_flops`` when given, else (``"auto"``) the dense bf16 peak of the table below, else
  Lightning's ``get_available_flops`` for the run's precision. Lightning's table misses the plain names
  ``"NVIDIA H200"`` and ``"NVIDIA H200 NVL"``, and its H200 and H100 NVL entries are the figures with
  structured sparsity, not the dense peak (tests/test_library_equivalence.py). Where there is no peak (a
  CPU, an unknown GPU) ``perf/mfu`` is not logged.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("easygen")

# dense (no sparsity) bf16 tensor-core peak FLOP/s per device, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first
PEAK_BF16_FLOPS = {
    "GH200": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,  # SXM: "NVIDIA H200"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM: "NVIDIA H100 80GB HBM3"
    "A100": 312e12,
    "L40S": 362e12,
}

_TRAIN = RunningStage.TRAINING


def peak_flops_for_name(name: str) -> float | None:
    """The table's dense bf16 peak for a CUDA device name, None for a name it does not list."""
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def device_peak_flops(device) -> float | None:
    """The table's peak for a CUDA device, None for other devices and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def _sync(pl_module: pl.LightningModule) -> None:
    # CUDA work is asynchronous: without a sync the clock measures kernel launches.
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class ThroughputCallback(ThroughputMonitor):
    """Log ``perf/samples_per_sec``, ``perf/tokens_per_sec`` and ``perf/mfu`` every training step."""

    def __init__(self, window: int = 20, peak_flops: float | str | None = "auto") -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if peak_flops != "auto" and peak_flops is not None and float(peak_flops) <= 0:
            raise ValueError(f"peak_flops must be > 0, 'auto' or null, got {peak_flops}")
        # Throughput's window holds running totals and a rate spans its first to its last entry: window + 1
        # entries cover `window` steps. The batch size comes from the module, not the batch (see _update).
        super().__init__(batch_size_fn=len, window_size=window + 1)
        self.window = window
        self._peak_setting = peak_flops
        self.peak_flops: float | None = None if peak_flops in ("auto", None) else float(peak_flops)
        self._module: pl.LightningModule | None = None
        self._paused_at: float | None = None
        self._count_tokens = self._count_flops = False
        self._elapsed = 0.0
        # seconds of each training step in the current window (validation taken out)
        self.step_times: deque[float] = deque(maxlen=window)
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        table_peak = device_peak_flops(trainer.strategy.root_device) if self._peak_setting == "auto" else None
        with warnings.catch_warnings():
            if self.peak_flops or table_peak:  # Lightning's "FLOPs not found" does not apply then
                warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)  # one Throughput per stage; Lightning's peak
        if self._peak_setting == "auto":
            self.peak_flops = table_peak or self.available_flops
        self.available_flops = self.peak_flops
        for throughput in self._throughputs.values():
            throughput.available_flops = self.peak_flops
        self._module = pl_module
        if self.peak_flops is None and trainer.is_global_zero:
            log.info(
                "perf/mfu is not logged: no known peak FLOP/s for %s (set callbacks.throughput.peak_flops)",
                trainer.strategy.root_device,
            )

    @rank_zero_only
    def on_train_start(self, trainer, *_) -> None:
        self._t0s.pop(_TRAIN, None)  # the clock starts at the first batch

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if _TRAIN not in self._t0s:
            _sync(pl_module)
            self._start(trainer)  # Lightning: reset this stage's Throughput and totals, start the clock

    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        """One training step into the Throughput: the samples, tokens and FLOPs the module reports."""
        batch_size = getattr(pl_module, "last_batch_size", None)
        if batch_size is None:
            raise AttributeError(
                f"ThroughputCallback needs {type(pl_module).__name__}.last_batch_size set in training_step"
            )
        num_tokens = getattr(pl_module, "last_num_tokens", None)
        flops_fn = getattr(pl_module, "flops_per_sample", None)
        throughput = self._throughputs[_TRAIN]
        if self._batches[_TRAIN] == 0:
            # a zero point at the clock's start, so that the first step's interval counts as well
            self._count_tokens, self._count_flops = bool(num_tokens), callable(flops_fn)
            throughput.update(
                time=0.0,
                batches=0,
                samples=0,
                lengths=0 if self._count_tokens else None,
                flops=0 if self._count_flops else None,
            )
            self._elapsed = 0.0
            self.step_times.clear()
        _sync(pl_module)
        elapsed = time.perf_counter() - self._t0s[_TRAIN]
        self.step_times.append(elapsed - self._elapsed)
        self._elapsed = elapsed
        self._batches[_TRAIN] += 1
        self._samples[_TRAIN] += int(batch_size)
        if self._count_tokens:
            self._lengths[_TRAIN] += int(num_tokens or 0)
        throughput.update(
            time=elapsed,
            batches=self._batches[_TRAIN],
            samples=self._samples[_TRAIN],
            lengths=self._lengths[_TRAIN] if self._count_tokens else None,
            # FLOPs of this rank's step; Throughput multiplies by the world size
            flops=float(flops_fn()) * int(batch_size) if self._count_flops else None,
        )

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        rates = self._throughputs[_TRAIN].compute()
        world = trainer.world_size
        metrics = {}
        if "device/samples_per_sec" in rates:
            metrics["perf/samples_per_sec"] = rates["device/samples_per_sec"] * world
        if "device/items_per_sec" in rates:
            metrics["perf/tokens_per_sec"] = rates["device/items_per_sec"] * world
        if "device/mfu" in rates:
            metrics["perf/mfu"] = rates["device/mfu"]
        self.last_metrics = metrics
        for name, value in metrics.items():
            self._module.log(name, value, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)

    # Validation runs between two training steps: its time (generation, scoring) is not training
    # throughput, so all of it is taken out of the interval of the step after it.
    @rank_zero_only
    def on_validation_start(self, trainer, pl_module) -> None:
        self._paused_at = time.perf_counter() if _TRAIN in self._t0s else None

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        """No validation throughput: the batch sizes are the training step's."""

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if self._paused_at is not None and _TRAIN in self._t0s:
            _sync(pl_module)
            self._t0s[_TRAIN] += time.perf_counter() - self._paused_at
        self._paused_at = None

    def on_test_start(self, *args, **kwargs) -> None:
        """Training throughput only."""

    def on_test_batch_end(self, *args, **kwargs) -> None:
        """Training throughput only."""

    def on_predict_start(self, *args, **kwargs) -> None:
        """Training throughput only."""

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        """Training throughput only."""
