"""A RAHF-style model: image + prompt -> two heatmaps and four scores.

Architecture (after Liang et al., "Rich Human Feedback for Text-to-Image Generation", CVPR 2024):

* image encoder: a ViT (patch embedding + transformer) over the image resized to
  ``image_size``; or any transformers vision model with ``last_hidden_state`` tokens
  (``vision_model``: a local directory or hub id of e.g. ``ViTModel`` or ``CLIPVisionModel``);
* text encoder: a small transformer over byte tokens (UTF-8 bytes, no tokenizer files); or any
  transformers text encoder and its tokenizer (``text_model``: e.g. ``google-t5/t5-base``, loaded
  as ``T5EncoderModel``);
* fusion: self-attention over the concatenation [image tokens; text tokens];
* heatmap heads (``implausibility``, ``misalignment``): the fused image tokens as a grid ->
  convs -> transposed-conv upsampling (x2 per stage) -> sigmoid, ``(B, 1, S, S)`` in [0, 1]
  with ``S = grid * 2 ** upsample_stages`` (= ``image_size`` by default);
* score heads (``plausibility``, ``alignment``, ``aesthetics``, ``overall``): convs -> global
  average pool -> MLP -> sigmoid, ``(B,)`` in [0, 1], higher is better.

Everything is configurable (:class:`RAHFConfig`); :func:`tiny_config` is the test size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

from focusnfix.errors import InputError
from focusnfix.ops import resize

HEATMAPS = ("implausibility", "misalignment")
SCORES = ("plausibility", "alignment", "aesthetics", "overall")
CONFIG_NAME = "rahf_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class RAHFConfig:
    """Sizes of a :class:`RAHFModel` (all fields are saved in ``rahf_config.json``).

    Attributes:
        image_size: side of the square image the encoder sees (pixels).
        patch_size: ViT patch size; the token grid is ``image_size // patch_size``.
        width: token width of the fusion transformer (and the built-in encoders).
        vision_depth, text_depth, fusion_depth: transformer layers of each part.
        heads: attention heads.
        mlp_ratio: transformer MLP width / ``width``.
        text_max_length: maximum text tokens (bytes for the built-in encoder).
        decoder_channels: channels of the heatmap decoder after each upsampling stage.
        upsample_stages: transposed-conv x2 stages; heatmap side = grid * 2 ** stages.
        score_hidden: hidden width of the score MLPs.
        dropout: dropout in the transformers.
        vision_model: optional transformers vision model (directory or hub id) replacing the
            built-in ViT; its ``last_hidden_state`` tokens are projected to ``width``.
        text_model: optional transformers text encoder (directory or hub id) and tokenizer
            replacing the byte-level encoder.
        image_mean, image_std: input normalisation (0.5/0.5 fits ViT; use the CLIP mean/std
            for a CLIP vision tower).
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    vision_depth: int = 6
    text_depth: int = 2
    fusion_depth: int = 4
    heads: int = 6
    mlp_ratio: float = 4.0
    text_max_length: int = 128
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32])
    upsample_stages: int = 4
    score_hidden: int = 256
    dropout: float = 0.0
    vision_model: str | None = None
    text_model: str | None = None
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise InputError(f"rahf config: image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if len(self.decoder_channels) != self.upsample_stages:
            raise InputError(
                f"rahf config: decoder_channels needs one entry per upsample stage ({self.upsample_stages}), "
                f"got {self.decoder_channels}"
            )
        if self.width % self.heads:
            raise InputError(f"rahf config: width {self.width} must be divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def heatmap_size(self) -> int:
        return self.grid * 2**self.upsample_stages

    @classmethod
    def from_dict(cls, data: dict) -> RAHFConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"rahf config: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def tiny_config(**overrides) -> RAHFConfig:
    """A test-size config: 32 px images, 4 x 4 tokens, 32 px heatmaps, ~60k parameters."""
    base = dict(
        image_size=32, patch_size=8, width=32, vision_depth=1, text_depth=1, fusion_depth=1, heads=2,
        mlp_ratio=2.0, text_max_length=24, decoder_channels=[16, 8, 8], upsample_stages=3, score_hidden=16,
    )
    base.update(overrides)
    return RAHFConfig(**base)


def _encoder(width: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, int(width * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 = pad, 1 = begin, byte b -> b + 2 (vocab 258). No files needed."""

    vocab_size = 258

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, both ``(B, max_length)`` long, padded/truncated."""
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [1] + [b + 2 for b in text.encode("utf-8")][: max_length - 1]
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = 1
        return ids, mask


class HeatmapHead(nn.Module):
    """``(B, C, g, g)`` tokens -> ``(B, 1, g * 2**n, g * 2**n)`` in [0, 1]."""

    def __init__(self, width: int, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        c_in = width
        for c in channels:
            layers += [nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


class ScoreHead(nn.Module):
    """``(B, C, g, g)`` tokens -> ``(B,)`` in [0, 1]."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(width, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU()
        )
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(self.conv(x).mean(dim=(2, 3)))).squeeze(-1)


class RAHFModel(nn.Module):
    """See the module docstring. ``forward(images, prompts)`` returns a dict:

    * ``"implausibility"``, ``"misalignment"``: ``(B, 1, S, S)`` in [0, 1] (1 = problem);
    * ``"plausibility"``, ``"alignment"``, ``"aesthetics"``, ``"overall"``: ``(B,)`` in [0, 1]
      (1 = best).

    ``images``: ``(B, 3, H, W)`` in [0, 1] at any size (resized in torch, differentiable).
    """

    def __init__(self, config: RAHFConfig, hf_vision: nn.Module | None = None, hf_text: nn.Module | None = None,
                 hf_tokenizer=None) -> None:
        super().__init__()
        self.config = config
        w, g = config.width, config.grid
        # -- image
        self.hf_vision = hf_vision
        if hf_vision is None:
            self.patch = nn.Conv2d(3, w, config.patch_size, stride=config.patch_size)
            self.img_pos = nn.Parameter(torch.randn(1, g * g, w) * 0.02)
            self.vision = _encoder(w, config.vision_depth, config.heads, config.mlp_ratio, config.dropout)
        else:
            self.vision_proj = nn.Linear(int(hf_vision.config.hidden_size), w)
        # -- text
        self.hf_text = hf_text
        self.tokenizer = hf_tokenizer if hf_text is not None else ByteTokenizer()
        if hf_text is None:
            self.tok_emb = nn.Embedding(ByteTokenizer.vocab_size, w)
            self.txt_pos = nn.Parameter(torch.randn(1, config.text_max_length, w) * 0.02)
            self.text = _encoder(w, config.text_depth, config.heads, config.mlp_ratio, config.dropout)
        else:
            hidden = getattr(hf_text.config, "hidden_size", None) or hf_text.config.d_model
            self.text_proj = nn.Linear(int(hidden), w)
        # -- fusion and heads
        self.type_emb = nn.Parameter(torch.zeros(2, w))
        self.fusion = _encoder(w, config.fusion_depth, config.heads, config.mlp_ratio, config.dropout)
        self.heatmap_heads = nn.ModuleDict({k: HeatmapHead(w, config.decoder_channels) for k in HEATMAPS})
        self.score_heads = nn.ModuleDict({k: ScoreHead(w, config.score_hidden) for k in SCORES})
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    # -- encoders ---------------------------------------------------------------------------------
    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        x = images.float()
        x = resize(x, (s, s), antialias=True)
        x = (x - self.mean) / self.std
        if self.hf_vision is not None:
            tokens = self.hf_vision(pixel_values=x.to(next(self.hf_vision.parameters()).dtype)).last_hidden_state
            g2 = self.config.grid**2
            tokens = tokens[:, -g2:]  # drop class/register tokens
            if tokens.shape[1] != g2:
                raise InputError(f"rahf: vision model gives {tokens.shape[1]} patch tokens, config expects {g2}")
            return self.vision_proj(tokens.float())
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.img_pos
        return self.vision(tokens)

    def _text_tokens(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.config.text_max_length
        if self.hf_text is not None:
            enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=n, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            hidden = self.hf_text(input_ids=ids, attention_mask=mask).last_hidden_state
            return self.text_proj(hidden.float()), mask
        ids, mask = self.tokenizer(list(prompts), n)
        ids, mask = ids.to(device), mask.to(device)
        x = self.tok_emb(ids) + self.txt_pos
        return self.text(x, src_key_padding_mask=mask == 0), mask

    def forward(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self._image_tokens(images) + self.type_emb[0]
        txt, mask = self._text_tokens(prompts, images.device)
        txt = txt + self.type_emb[1]
        pad = torch.cat([torch.zeros(img.shape[:2], dtype=torch.bool, device=img.device), mask == 0], dim=1)
        fused = self.fusion(torch.cat([img, txt], dim=1), src_key_padding_mask=pad)
        g = self.config.grid
        grid = fused[:, : g * g].transpose(1, 2).reshape(images.shape[0], -1, g, g)
        out = {k: head(grid) for k, head in self.heatmap_heads.items()}
        out.update({k: head(grid) for k, head in self.score_heads.items()})
        return out

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``rahf_config.json``, ``model.safetensors`` and, for transformers encoders, their
        configs and tokenizer (so loading needs no hub access)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        if self.hf_vision is not None:
            self.hf_vision.config.save_pretrained(directory / "vision_config")
        if self.hf_text is not None:
            self.hf_text.config.save_pretrained(directory / "text_config")
            self.tokenizer.save_pretrained(directory / "tokenizer")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> RAHFModel:
        """Load a model written by :meth:`save_pretrained`.

        Raises:
            InputError: missing files or weights that do not fit the config.
        """
        directory = Path(directory).expanduser()
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise InputError(f"rahf model {directory} needs {CONFIG_NAME} and {WEIGHTS_NAME} (from `focusnfix rahf train`)")
        config = RAHFConfig.from_dict(json.loads(cfg_path.read_text()))
        vision = text = tok = None
        if config.vision_model:
            vision = AutoModel.from_config(AutoConfig.from_pretrained(directory / "vision_config"))
        if config.text_model:
            text = _text_encoder_from_config(AutoConfig.from_pretrained(directory / "text_config"))
            tok = AutoTokenizer.from_pretrained(directory / "tokenizer")
        model = cls(config, vision, text, tok)
        try:
            model.load_state_dict(load_file(str(w_path)))
        except RuntimeError as err:
            raise InputError(f"rahf model {w_path} does not fit {cfg_path}: {str(err).splitlines()[0]}") from err
        return model.to(device).eval()

    @classmethod
    def from_config(cls, config: RAHFConfig) -> RAHFModel:
        """A new model; pretrained transformers encoders (if named) are loaded from their path/hub id."""
        vision = text = tok = None
        if config.vision_model or config.text_model:
            try:
                if config.vision_model:
                    vision = AutoModel.from_pretrained(config.vision_model)
                    vision = getattr(vision, "vision_model", vision) if hasattr(vision, "text_model") else vision
                if config.text_model:
                    text = _text_encoder_from_pretrained(config.text_model, AutoConfig, AutoModel)
                    tok = AutoTokenizer.from_pretrained(config.text_model)
            except (OSError, ValueError) as err:
                raise InputError(f"rahf: cannot load a pretrained encoder: {str(err).splitlines()[0]}") from err
        return cls(config, vision, text, tok)


def _text_encoder_from_pretrained(path: str, auto_config, auto_model) -> nn.Module:
    cfg = auto_config.from_pretrained(path)
    if getattr(cfg, "is_encoder_decoder", False):  # T5: keep the encoder only
        return T5EncoderModel.from_pretrained(path)
    return auto_model.from_pretrained(path)


def _text_encoder_from_config(cfg) -> nn.Module:
    if getattr(cfg, "is_encoder_decoder", False):
        return T5EncoderModel(cfg)
    return AutoModel.from_config(cfg)

