"""BiDiffuser: UniDiffuser v1's U-ViT trained on the two clean-condition conditionals (EasyGen, Sec. 3.1)."""

from .convert import (
    detect_format,
    diffusers_to_original,
    infer_config,
    load_uvit,
    original_to_diffusers,
    save_uvit,
)
from .dpm_solver import DPMSolverPP, dpm_solver_sample
from .ema import EMA
from .loss import bidiffuser_loss
from .sampling import sample_i2t, sample_joint, sample_t2i
from .schedule import NoiseSchedule
from .uvit import UViT, UViTConfig

__all__ = [
    "EMA",
    "DPMSolverPP",
    "NoiseSchedule",
    "UViT",
    "UViTConfig",
    "bidiffuser_loss",
    "detect_format",
    "diffusers_to_original",
    "dpm_solver_sample",
    "infer_config",
    "load_uvit",
    "original_to_diffusers",
    "sample_i2t",
    "sample_joint",
    "sample_t2i",
    "save_uvit",
]

# Written alongside; optional so that the core network imports on its own.
try:
    from .pipeline import BiDiffuser  # noqa: F401

    __all__.append("BiDiffuser")
except ImportError:
    pass
try:
    from .caption_decoder import CaptionDecoder  # noqa: F401

    __all__.append("CaptionDecoder")
except ImportError:
    pass
