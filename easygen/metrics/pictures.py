"""Text-to-image scores: FID and CLIP score (the paper's text-to-image evaluation).

FID (Heusel et al. 2017) and CLIP score (Hessel et al. 2021) go through torchmetrics with weights
from local paths only: nothing is downloaded. FID from a weights file runs torch-fidelity's
InceptionV3 (the ``fid`` extra).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["fid_score", "require_torch_fidelity", "clip_score"]

# ----------------------------------------------------------------------------------------------------
# Text-to-image: FID and CLIP score
# ----------------------------------------------------------------------------------------------------

ImageBatch = torch.Tensor | Sequence  # uint8 (N, 3, H, W) tensor, or a list of PIL images


def _to_uint8(images: ImageBatch, name: str) -> torch.Tensor:
    """A batch of images as a uint8 (N, 3, H, W) tensor."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        x = images
    else:
        arrays = []
        for k, im in enumerate(images):
            a = np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im)
            if a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(f"{name}[{k}]: expected an RGB image (H, W, 3), got shape {a.shape}")
            arrays.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
        if not arrays:
            raise ValueError(f"{name}: no images")
        x = torch.stack(arrays)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if x.is_floating_point() and x.min() >= 0 and x.max() <= 1:
            x = (x * 255).round().to(torch.uint8)
        else:
            raise ValueError(f"{name}: expected uint8 images or floats in [0, 1], got {x.dtype}")
    return x


def _require_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p} (weights are read from local paths only)")
    return p


_FID_EXTRA = "pip install -e '.[fid]' (torch-fidelity, with a torchvision built for the installed torch)"


def torchmetrics_fid():
    """torchmetrics' ``FrechetInceptionDistance``, with a clear error when its image stack cannot load.

    torchmetrics imports torch-fidelity's InceptionV3 whenever torch-fidelity is installed, and
    torch-fidelity imports torchvision: a torchvision built for another torch (e.g. a CUDA wheel beside
    a CPU-only torch) fails there with "operator torchvision::nms does not exist".
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            f"fid_score: torchmetrics' FID does not import ({type(e).__name__}: {e}); torch-fidelity and "
            f"torchvision must match the installed torch ({torch.__version__}): {_FID_EXTRA}"
        ) from e
    return FrechetInceptionDistance


def require_torch_fidelity() -> None:
    """Fail early, naming the extra to install, when torch-fidelity's InceptionV3 cannot be imported."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            f"FID from an Inception weights file needs torch-fidelity's InceptionV3 ({type(e).__name__}: "
            f"{e}): {_FID_EXTRA}, or pass fid_score a feature extractor module"
        ) from e


def fid_score(
    real_images: ImageBatch,
    fake_images: ImageBatch,
    inception_path: str | os.PathLike | torch.nn.Module,
    *,
    batch_size: int = 50,
    antialias: bool = True,
) -> float:
    """Fréchet Inception Distance (Heusel et al. 2017, eq. 6) between two image sets, through
    torchmetrics' ``FrechetInceptionDistance`` (statistics accumulated in float64).

    ``inception_path`` is either the feature extractor itself (an ``nn.Module`` mapping uint8
    (N, 3, H, W) images to (N, D) features) or the path of a state dict for torch-fidelity's
    ``FeatureExtractorInceptionV3`` (the FID network ported from TensorFlow, e.g.
    ``weights-inception-2015-12-05-6726825d.pth``; 2048-d pool features; needs the ``fid`` extra).
    With a weights file, images are resized to 299x299 inside the network: bilinear with antialiasing
    (``antialias=True``, torchmetrics' default) or TensorFlow 1.x's bilinear resize as in torch-fidelity
    and the original FID code (``antialias=False``); the two give different values unless the images
    are 299x299 already.
    Images: uint8 (N, 3, H, W) tensors, floats in [0, 1], or lists of PIL images.
    """
    real = _to_uint8(real_images, "real_images")
    fake = _to_uint8(fake_images, "fake_images")
    for name, x in (("real_images", real), ("fake_images", fake)):
        if len(x) < 2:
            raise ValueError(f"fid_score: {name} holds {len(x)} image(s); a covariance needs at least 2")
    if isinstance(inception_path, torch.nn.Module):
        FrechetInceptionDistance = torchmetrics_fid()
        fid = FrechetInceptionDistance(feature=inception_path.eval(), input_img_size=tuple(real.shape[1:]))
    else:
        weights = _require_path(inception_path, "Inception weights")
        if weights.is_dir():
            raise ValueError(f"Inception weights {weights}: expected a state dict file, got a folder")
        # torch-fidelity reads the file with weights_only=False (full unpickling): accept only a file
        # that loads as plain tensors.
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"Inception weights {weights}: not a state dict of tensors ({type(e).__name__}: {str(e)[:300]})"
            ) from e
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"Inception weights {weights}: expected a state dict (name -> tensor)")
        del state
        require_torch_fidelity()
        FrechetInceptionDistance = torchmetrics_fid()
        try:
            fid = FrechetInceptionDistance(
                feature=2048, feature_extractor_weights_path=str(weights), antialias=antialias
            )
        except (RuntimeError, KeyError, AttributeError, TypeError, pickle.UnpicklingError) as e:
            raise ValueError(
                f"Inception weights {weights}: not a state dict of torch-fidelity's "
                f"FeatureExtractorInceptionV3 ({type(e).__name__}: {str(e)[:300]})"
            ) from e
    with torch.no_grad():
        for start in range(0, len(real), batch_size):
            fid.update(real[start : start + batch_size], real=True)
        for start in range(0, len(fake), batch_size):
            fid.update(fake[start : start + batch_size], real=False)
        return float(fid.compute())


class _ClipFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return projected embeddings as tensors.

    torchmetrics 1.9 normalises what these return, but transformers 5 returns a
    ``BaseModelOutputWithPooling`` (the projection in ``pooler_output``) where 4.x returned a tensor.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def local_clip_loader(clip_path: str | os.PathLike) -> Callable[[], tuple]:
    path = _require_path(clip_path, "CLIP model folder")

    def load() -> tuple:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        return _ClipFeatures(model), processor

    return load


def clip_score(
    images: ImageBatch, texts: Sequence[str], clip_path: str | os.PathLike, *, batch_size: int = 32
) -> float:
    """CLIP score as torchmetrics' ``CLIPScore`` defines it: ``max(100 * mean(cos(image, text)), 0)``.

    ``clip_path`` is a local folder saved by ``CLIPModel.save_pretrained`` together with its
    ``CLIPProcessor`` (e.g. a copy of openai/clip-vit-large-patch14).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if isinstance(texts, str):
        raise ValueError("clip_score: texts must be a list of str, one per image")
    x = _to_uint8(images, "images")
    if len(x) != len(texts):
        raise ValueError(f"clip_score: {len(x)} images but {len(texts)} texts")
    metric = CLIPScore(model_name_or_path=local_clip_loader(clip_path))
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            metric.update(list(x[start : start + batch_size]), list(texts[start : start + batch_size]))
        return float(metric.compute())
