"""Lightning callbacks: caption evaluation, text-to-image samples, throughput/MFU."""

from callbacks.caption_eval import CaptionEvalCallback
from callbacks.t2i_samples import T2ISampleCallback
from callbacks.throughput import ThroughputCallback

__all__ = ["CaptionEvalCallback", "T2ISampleCallback", "ThroughputCallback"]
