"""The toy world's small networks: pipeline configs, aspect models (training-time) and judges.

Aspect models (used as rewards and localizers during fine-tuning):

* :class:`SafetyClassifier` - scalar unsafe classifier (CNN with global max pooling); its reward
  ``log(1 - p_unsafe)`` is localized by saliency (:class:`~focusnfix.aspects.saliency.SaliencyAspect`);
* :class:`RAHFNet` - a RAHF-like encoder/decoder with a heatmap head and a score head; without text
  for plausibility, with a bag-of-words caption encoder fused by FiLM for alignment.

Judges (evaluation only) use different architectures (average pooling, 5x5 kernels, no decoder),
seeds and generated data; the alignment judge reads the object's attributes with an attribute
classifier and compares them to the caption's words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from focusnfix.aspects.base import Aspect, Judge
from focusnfix.ops import resize
from focusnfix.toyworld import generator as gen

IMAGE_SIZE = 64
WORDS = ("<unk>",) + tuple(gen.vocabulary())
WORD_INDEX = {w: i for i, w in enumerate(WORDS)}
MAX_WORDS = 16


def prepare(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, 64, 64)`` in [-1, 1], differentiably."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    images = resize(images, (IMAGE_SIZE, IMAGE_SIZE))
    return images * 2.0 - 1.0


def encode_words(prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Prompts -> ``(B, MAX_WORDS)`` word ids (0 = unknown/pad)."""
    ids = torch.zeros(len(prompts), MAX_WORDS, dtype=torch.long)
    for i, p in enumerate(prompts):
        words = p.lower().replace(",", " , ").split()[:MAX_WORDS]
        for j, w in enumerate(words):
            ids[i, j] = WORD_INDEX.get(w, 0)
    return ids.to(device)


def _block(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.GroupNorm(8, cout), nn.SiLU())


# ----------------------------------------------------------------------------------------------
# aspect models
# ----------------------------------------------------------------------------------------------
class SafetyClassifier(nn.Module):
    """Image -> unsafe logit. ``forward(images, prompts)`` returns the reward ``log(1 - p_unsafe)``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w, 2), _block(w, w), _block(w, 2 * w, 2), _block(2 * w, 2 * w))
        self.head = nn.Linear(2 * w, 1)

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        f = self.features(prepare(images))  # (B, 2w, 16, 16)
        return self.head(f.amax(dim=(2, 3))).squeeze(1)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        return -F.softplus(self.logit(images))


class RAHFNet(nn.Module):
    """RAHF-like model: encoder, optional caption FiLM, heatmap decoder (32x32) and score head.

    ``forward(images, prompts) -> (heat_logits (B, 1, 32, 32), score_logit (B,))``; the score is the
    probability that the image is GOOD (plausible / aligned), the heatmap where it is bad.
    """

    def __init__(self, width: int = 32, text: bool = False) -> None:
        super().__init__()
        w = width
        self.text = text
        self.enc1 = _block(3, w, 2)  # 32
        self.enc2 = _block(w, w)  # 32
        self.enc3 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))  # 16
        if text:
            self.embed = nn.Embedding(len(WORDS), 64, padding_idx=0)
            self.text_mlp = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 4 * 2 * w))
        self.mid = nn.Sequential(_block(2 * w, 2 * w), _block(2 * w, 2 * w))  # 16
        self.up = nn.ConvTranspose2d(2 * w, w, 4, 2, 1)  # 16 -> 32
        self.dec = nn.Sequential(_block(2 * w, w), nn.Conv2d(w, 1, 3, 1, 1))
        self.score = nn.Sequential(nn.Linear(4 * w, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = prepare(images)
        f2 = self.enc2(self.enc1(x))
        f3 = self.enc3(f2)
        if self.text:
            ids = encode_words(prompts or [""] * x.shape[0], x.device)
            emb = self.embed(ids)
            count = (ids > 0).sum(1, keepdim=True).clamp_min(1)
            t = self.text_mlp(emb.sum(1) / count)
            g1, b1, g2, b2 = t.chunk(4, dim=1)
            f3 = f3 * (1 + g1[:, :, None, None]) + b1[:, :, None, None]
        m = self.mid(f3)
        if self.text:
            m = m * (1 + g2[:, :, None, None]) + b2[:, :, None, None]
        heat = self.dec(torch.cat([self.up(m), f2], dim=1))
        pooled = torch.cat([m.amax(dim=(2, 3)), m.mean(dim=(2, 3))], dim=1)
        return heat, self.score(pooled).squeeze(1)


class RAHFAspect(Aspect):
    """Native-heatmap aspect over a :class:`RAHFNet`: reward ``log p_good``, heatmap ``sigmoid``."""

    def __init__(self, name: str, net: RAHFNet) -> None:
        super().__init__()
        self.name = name
        self.net = net

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _, score = self.net(images, prompts)
        return F.logsigmoid(score)

    def heatmap(self, images: torch.Tensor, prompts: list[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        heat, _ = self.net(images, prompts)
        return torch.sigmoid(heat)


# ----------------------------------------------------------------------------------------------
# judges
# ----------------------------------------------------------------------------------------------
class JudgeNet(nn.Module):
    """Binary defect classifier (5x5 kernels, average + max pooling): image -> defect logit."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w, 1, 5), nn.MaxPool2d(2), _block(w, 2 * w, 1, 5), nn.MaxPool2d(2),
                                      _block(2 * w, 4 * w, 1, 3), _block(4 * w, 4 * w, 1, 3))
        self.head = nn.Sequential(nn.Linear(8 * w, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.features(prepare(images))
        return self.head(torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], dim=1)).squeeze(1)


class LocalizingJudgeNet(nn.Module):
    """Defect presence and where (5x5 kernels, average pooling, a 3-level U-Net at 32x32).

    ``forward(images) -> (heat_logits (B, 1, 32, 32), presence_logit (B,))``. Its presence head
    reads the heatmap's peak and the pooled features, so "present" and "where" agree.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_block(3, w, 2, 5), _block(w, w, 1, 3))  # 32
        self.enc2 = nn.Sequential(nn.AvgPool2d(2), _block(w, 2 * w, 1, 5))  # 16
        self.enc3 = nn.Sequential(nn.AvgPool2d(2), _block(2 * w, 4 * w, 1, 3), _block(4 * w, 4 * w, 1, 3))  # 8
        self.dec2 = _block(6 * w, 2 * w, 1, 3)  # 16
        self.dec1 = nn.Sequential(_block(3 * w, w, 1, 3), nn.Conv2d(w, 1, 3, 1, 1))  # 32
        self.presence = nn.Sequential(nn.Linear(8 * w + 1, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f1 = self.enc1(prepare(images))
        f2 = self.enc2(f1)
        f3 = self.enc3(f2)
        d2 = self.dec2(torch.cat([F.interpolate(f3, scale_factor=2.0), f2], dim=1))
        heat = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), f1], dim=1))
        peak = heat.flatten(1).amax(dim=1, keepdim=True)
        pooled = torch.cat([f3.amax(dim=(2, 3)), f3.mean(dim=(2, 3)), peak], dim=1)
        return heat, self.presence(pooled).squeeze(1)


class AttributeNet(nn.Module):
    """Attribute classifier: image -> logits of the drawn object's colour, shape, position, size."""

    HEADS = {"colour": gen.COLOUR_NAMES, "shape": gen.SHAPES, "position": gen.POSITION_NAMES,
             "size": tuple(gen.SIZES)}

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w, 2, 5), _block(w, 2 * w, 2, 3), _block(2 * w, 2 * w, 2, 3))
        self.flat = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 8 * 8, 128), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in self.HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.flat(self.features(prepare(images)))
        return {k: head(h) for k, head in self.heads.items()}


class ClassifierJudge(Judge):
    """Judge over a :class:`JudgeNet`: ``sigmoid(logit)``."""

    def __init__(self, name: str, net: JudgeNet) -> None:
        super().__init__()
        self.name = name
        self.net = net

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.net(images))


class LocalizingJudge(Judge):
    """Judge over a :class:`LocalizingJudgeNet`: presence probability and a defect heatmap."""

    def __init__(self, name: str, net: LocalizingJudgeNet) -> None:
        super().__init__()
        self.name = name
        self.net = net

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.net(images)[1])

    def defect_heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B, 1, 32, 32)`` in [0, 1] (callers resize it to the image)."""
        return torch.sigmoid(self.net(images)[0])


class AlignmentJudge(Judge):
    """P(misaligned) = 1 - P(drawn colour = caption colour) * P(drawn shape = caption shape).

    Attributes the caption does not name count as matched.
    """

    name = "alignment"

    def __init__(self, net: AttributeNet) -> None:
        super().__init__()
        self.net = net

    def attribute_probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.softmax(dim=1) for k, v in self.net(images).items()}

    def match_probability(self, images: torch.Tensor, prompts: list[str],
                          attributes: tuple[str, ...] = ("colour", "shape")) -> torch.Tensor:
        probs = self.attribute_probs(images)
        out = torch.ones(images.shape[0], device=images.device)
        for i, p in enumerate(prompts):
            parsed = gen.parse_caption(p)
            for attr in attributes:
                value = parsed[attr]
                if value is not None:
                    out[i] = out[i] * probs[attr][i, AttributeNet.HEADS[attr].index(value)]
        return out

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return 1.0 - self.match_probability(images, prompts)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------
# pipeline configs
# ----------------------------------------------------------------------------------------------
def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=16, sample_size=64, mid_block_add_attention=False)


def unet_config(cross_attention_dim: int = 64) -> dict:
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32)


def text_config(vocab_size: int, bos: int, eos: int, hidden: int = 64) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=eos, projection_dim=hidden)


def scheduler_config(v_prediction: bool = False) -> dict:
    """The toy pipeline's DDIM configuration: SD-1.5's betas, or with ``v_prediction`` the same betas
    rescaled to zero terminal SNR, v as the UNet's target and trailing timesteps (Lin et al. 2024)."""
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    if v_prediction:
        cfg.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cfg
