"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): CLIP ViT-L/14 + an MLP head.

score = MLP(E_img / |E_img|), on the 1-10 scale of the AVA/LAION ratings (typical SD images:
5-6.5). The CLIP image embedding is OpenAI CLIP ViT-L/14's (``openai/clip-vit-large-patch14``,
768-d); the head has LAION's layout, so its published weights load by key::

    layers.0: Linear(768, 1024)  -> Dropout(0.2)
    layers.2: Linear(1024, 128)  -> Dropout(0.2)
    layers.4: Linear(128, 64)    -> Dropout(0.1)
    layers.6: Linear(64, 16)
    layers.7: Linear(16, 1)

(no activations, as in LAION's code). Head weights come from a user path: a ``.safetensors``
file, or a ``.pth``/``.pt`` state dict of tensors (read with ``torch.load(weights_only=True)``,
which refuses pickled code). To convert once: ``safetensors.torch.save_file(torch.load(p,
weights_only=True), "aesthetic_head.safetensors")``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPModel

from focusnfix.aspects.rewards.base import Localizer, RewardModelAspect, clip_preprocess, features
from focusnfix.errors import InputError


class LaionAestheticHead(nn.Module):
    """The LAION MLP: ``(B, embed_dim)`` unit-norm CLIP embedding -> ``(B, 1)`` rating."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_head(path: str | Path, embed_dim: int = 768) -> LaionAestheticHead:
    """Read a LAION head state dict (``.safetensors``, or a ``.pth``/``.pt`` of tensors).

    Raises:
        InputError: missing file, unreadable file, or keys/shapes not of the LAION layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"aesthetic: head weights {path} do not exist (expected a .safetensors or .pth state dict)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled code refused by weights_only
        raise InputError(f"aesthetic: cannot read head weights {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict):
        raise InputError(f"aesthetic: {path} holds a {type(state).__name__}, expected a state dict of tensors")
    head = LaionAestheticHead(embed_dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"aesthetic: {path} is not a LAION aesthetic head: {str(err).splitlines()[0]}") from err
    return head.eval().requires_grad_(False)


class AestheticAspect(RewardModelAspect):
    """LAION aesthetic score ``(B,)`` (about 1-10, higher is better), localized by Grad-CAM on the
    CLIP vision tower's last layer (input LayerNorm, see :class:`CLIPScoreAspect`)."""

    def __init__(
        self,
        clip_model: nn.Module,
        head: nn.Module,
        localizer: Localizer = "gradcam",
        blur_sigma: float = 0.0,
        name: str = "aesthetic",
    ) -> None:
        super().__init__(name, localizer, blur_sigma)
        self.clip = clip_model
        self.head = head
        self.image_size = int(clip_model.config.vision_config.image_size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.clip.parameters()).dtype
        pixels = clip_preprocess(images, self.image_size).to(dtype)
        emb = F.normalize(features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return self.head(emb.to(next(self.head.parameters()).dtype)).float().squeeze(-1)

    def gradcam_layer(self) -> nn.Module:
        return self.clip.vision_model.encoder.layers[-1].layer_norm1


def from_pretrained(
    head: str, clip: str = "openai/clip-vit-large-patch14", **kwargs
) -> AestheticAspect:
    """Aspect type ``aesthetic``: ``args: {head: PATH_TO_HEAD, clip: PATH_OR_HUB_ID}``."""
    try:
        model = CLIPModel.from_pretrained(clip)
    except (OSError, ValueError) as err:
        raise InputError(f"aesthetic: cannot load a CLIPModel from {clip!r}: {str(err).splitlines()[0]}") from err
    model = model.eval().requires_grad_(False)
    return AestheticAspect(model, load_head(head, int(model.config.projection_dim)), **kwargs)


__all__ = ["AestheticAspect", "LaionAestheticHead", "from_pretrained", "load_head"]
