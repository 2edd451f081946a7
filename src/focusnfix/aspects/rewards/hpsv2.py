"""HPSv2 / HPSv2.1 (Wu et al., 2023): an open_clip ViT-H/14 fine-tuned on human preferences.

score = cos(E_img, E_txt) of the fine-tuned open_clip model (as ``hpsv2.score`` computes it;
typical values 0.25-0.30). Needs ``open_clip`` (extra ``clip``: ``pip install focusnfix[clip]``),
which needs torchvision; it is imported only when this aspect is built. Weights: a local
checkpoint (``HPS_v2.1_compressed.pt``, a dict with ``state_dict``, read with
``torch.load(weights_only=True)``) or a hub file ``xswu/HPSv2:HPS_v2.1_compressed.pt``.

Untested here: open_clip cannot import beside this project's CPU torch build (its torchvision
dependency fails), and no weights are available offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from torch import nn

from focusnfix.aspects.rewards.base import Localizer, RewardModelAspect, clip_preprocess, require
from focusnfix.errors import InputError


class HPSv2Aspect(RewardModelAspect):
    """HPSv2 reward ``(B,)`` (cosine in [-1, 1], higher = preferred), Grad-CAM on the last
    residual block's input LayerNorm of the open_clip vision transformer."""

    def __init__(
        self, model: nn.Module, tokenizer, localizer: Localizer = "gradcam", blur_sigma: float = 0.0,
        name: str = "hpsv2",
    ) -> None:
        super().__init__(name, localizer, blur_sigma)
        self.model = model
        self.tokenizer = tokenizer
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = images.device
        pixels = clip_preprocess(images, self.image_size)
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        with torch.no_grad():
            txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(device)).float(), dim=-1)
        return (img * txt).sum(-1)

    def gradcam_layer(self) -> nn.Module:
        return self.model.visual.transformer.resblocks[-1].ln_1


def _checkpoint_path(checkpoint: str) -> str:
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return str(path)
    if ":" in checkpoint and checkpoint.count("/") == 1:  # "repo/id:filename"
        repo, filename = checkpoint.split(":", 1)
        try:
            return hf_hub_download(repo, filename)
        except Exception as err:  # offline, missing file, auth
            raise InputError(f"hpsv2: cannot download {checkpoint}: {str(err).splitlines()[0]}") from err
    raise InputError(f"hpsv2: checkpoint {checkpoint!r} is neither a file nor 'hub/repo:filename'")


def from_pretrained(
    checkpoint: str = "xswu/HPSv2:HPS_v2.1_compressed.pt", arch: str = "ViT-H-14", **kwargs
) -> HPSv2Aspect:
    """Aspect type ``hpsv2``: ``args: {checkpoint: PATH_OR_'repo:file', arch: ViT-H-14}``."""
    open_clip = require("open_clip", "clip", "the hpsv2 aspect")
    path = _checkpoint_path(checkpoint)
    model = open_clip.create_model(arch, pretrained=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as err:
        raise InputError(f"hpsv2: cannot load checkpoint {path}: {str(err).splitlines()[0]}") from err
    tokenizer = open_clip.get_tokenizer(arch)
    return HPSv2Aspect(model.eval().requires_grad_(False), tokenizer, **kwargs)
