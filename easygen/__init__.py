"""EasyGen: BiDiffuser (UniDiffuser's U-ViT) joined to an LLM through a projector.

Plain PyTorch models and math; no Lightning, no Hydra.
"""

__version__ = "0.1.0"
