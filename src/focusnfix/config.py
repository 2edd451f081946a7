"""Training configuration: YAML files validated by pydantic, every field documented.

Load with :func:`load_config` (a YAML file plus ``key=value`` overrides, e.g.
``train.learning_rate=1e-4`` or ``aspects.0.weight=2``). Any problem raises
:class:`~focusnfix.errors.ConfigError` whose one-line message names the field and what was
expected. See ``configs/*.yaml`` for commented presets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from focusnfix import toyworld
from focusnfix.errors import ConfigError
from focusnfix.files import read_prompts_file, read_text


def _expected(annotation: Any) -> str:
    """A field type in words: ``int`` -> "an integer", ``float | Literal["auto"]`` -> "a number or 'auto'"."""
    if get_origin(annotation) is Literal:
        return " or ".join(repr(a) for a in get_args(annotation))
    words = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    if annotation in words:
        return words[annotation][0]
    if get_origin(annotation) in (list, tuple):
        element = get_args(annotation)[0] if get_args(annotation) else None
        return "a list of " + words.get(element, ("", "values"))[1]
    parts = [a for a in get_args(annotation) if a is not type(None)]
    return " or ".join(_expected(a) for a in parts) if parts else getattr(annotation, "__name__", str(annotation))


def _literals(annotation: Any) -> tuple[Any, ...]:
    """The values of the ``Literal`` types in ``annotation`` (``float | Literal["auto", "off"]`` -> auto, off)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(v for a in get_args(annotation) for v in _literals(a))


def _takes_booleans(annotation: Any) -> bool:
    return annotation is bool or any(_takes_booleans(a) for a in get_args(annotation))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `steps: true` as 1 and `learning_rate: yes` as 1.0; a boolean where a number is
        # expected is a mistake to name, not a value to convert
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            # YAML 1.1 reads an unquoted `off` or `no` as false (gate: off, mixed_precision: no)
            for word in ("off", "no"):
                if value is False and word in _literals(annotation):
                    return word
            if not _takes_booleans(annotation):
                raise ValueError(f"expected {_expected(annotation)}, got a boolean")
        elif info.field_name is not None and cls.model_fields[info.field_name].annotation is bool \
                and not isinstance(value, bool):
            raise ValueError("expected true or false")  # pydantic reads `localize: 1` or "yes" as true
        return value


class ModelConfig(_Section):
    """Which pipeline to fine-tune."""

    path: str = Field("toy", description="'toy' (the packaged toy world), a local diffusers pipeline directory, or a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen base weights; LoRA parameters always train in float32."
    )
    variant: str | None = Field(None, description="from_pretrained variant, e.g. 'fp16'.")
    revision: str | None = Field(None, description="from_pretrained revision (hub models).")


class LoraConfigSection(_Section):
    """The LoRA adapter trained on the UNet."""

    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale = alpha / rank); default: equal to rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="UNet module names (PEFT target_modules) that get an adapter.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    active_steps: int | None = Field(
        None,
        ge=1,
        description="the adapter acts only at the last active_steps of the sampling.num_inference_steps "
        "steps (None = at every step, as DRaFT and the paper). With active_steps = sampling.k the first N - k "
        "steps are the frozen model's, the same chain as Î0's, so the truncated gradient is the whole gradient "
        "and the constraint sees every change the LoRA makes (docs/trainer.md). Inference must gate the LoRA "
        "the same way (focusnfix.inference.late_lora_callback for diffusers pipelines).",
    )
    init_from: str | None = Field(
        None,
        description="start from this LoRA (a pytorch_lora_weights.safetensors or its directory, same rank and "
        "target modules) instead of zero; the reference stays the base model without any LoRA.",
    )


class SamplingConfig(_Section):
    """How images are sampled during training (DDIM, eta = 0, classifier-free guidance)."""

    num_inference_steps: int = Field(20, ge=1, description="DDIM steps N.")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance scale (<= 1: no guidance).")
    height: int | None = Field(None, gt=0, description="image height in pixels; default: the UNet's native size.")
    width: int | None = Field(None, gt=0, description="image width in pixels; default: the UNet's native size.")
    negative_prompt: str = Field("", description="negative prompt for guidance.")
    grad_mode: Literal["draft_k", "draft_lv", "full"] = Field(
        "draft_k",
        description="draft_k: gradient through the last k steps; draft_lv: k = 1 plus lv_n re-noisings; "
        "full: all steps (set checkpoint_unet, else every step's activations are kept).",
    )
    k: int = Field(2, ge=1, description="DRaFT-K: number of final sampling steps that carry gradient (paper: 2).")
    lv_n: int = Field(2, ge=0, description="DRaFT-LV: re-noisings of the final step (DRaFT paper: 2).")
    checkpoint_unet: bool = Field(False, description="recompute each graded UNet call in backward (saves memory).")
    checkpoint_vae: bool = Field(False, description="recompute the VAE decode in backward (saves memory).")
    merge_lora: bool = Field(
        True,
        description="UNet calls without gradient (the first N - K steps) run with the LoRA merged into the base "
        "weights: the plain model's cost, the same images up to float rounding.",
    )
    compile_unet: bool = Field(
        False,
        description="run the UNet calls without gradient (the first N - K steps, the reference images) through "
        "torch.compile: faster after a one-off compile (benchmarks/step_cost.py), the same images up to float "
        "rounding; on CPU it needs a C++ compiler.",
    )

    @model_validator(mode="after")
    def _k_le_steps(self) -> SamplingConfig:
        if self.grad_mode == "draft_k" and self.k > self.num_inference_steps:
            raise ValueError(f"k={self.k} exceeds num_inference_steps={self.num_inference_steps}")
        return self


class ObjectiveConfig(_Section):
    """loss = -sum_a w_a r_a(I) + beta * ||(1 - M) * (I - I0)||."""

    beta: float = Field(1.0, ge=0, description="weight of the regional constraint; 0 = plain DRaFT.")
    beta_end: float | None = Field(
        None,
        ge=0,
        description="unset: beta is constant. A number: beta holds until train.steps * beta_ramp_start, then "
        "rises (or falls) linearly to beta_end at the last step (objective.beta_at). Why: a weak constraint "
        "lets the reward find the fix; a strong one afterwards takes back what the LoRA changed outside the "
        "mask, while the fix inside it is not penalised (docs/trainer.md).",
    )
    beta_ramp_start: float = Field(
        0.5, ge=0, lt=1, description="share of train.steps at which the ramp from beta to beta_end begins."
    )
    norm: Literal["frobenius", "squared", "mean"] = Field(
        "frobenius", description="frobenius (paper, unsquared), squared, or per-pixel mean of squares."
    )
    space: Literal["pixel", "latent"] = Field("pixel", description="compare decoded images (paper) or latents.")
    reward_input: Literal["image", "composite"] = Field(
        "image",
        description="what the reward scores: image = the fine-tuned image Î (paper); composite = "
        "M * Î + (1 - M) * Î0, Î inside the mask and the frozen image outside (ours), so the reward's "
        "gradient reaches only the pixels that may change and stops pulling towards global redraws "
        "that the constraint must then undo. The constraint is the same either way.",
    )


class MaskConfig(_Section):
    """Heatmap of the frozen model's image -> mask of the region that may change."""

    threshold_mode: Literal["absolute", "relative", "quantile"] = Field(
        "relative", description="absolute: h >= t; relative: h >= t * max(h); quantile: top (1 - t) of pixels."
    )
    threshold: float = Field(0.5, ge=0, le=1, description="threshold t in [0, 1].")
    dilate_px: int = Field(2, ge=0, description="dilation radius in image pixels.")
    feather_px: float = Field(0.0, ge=0, description="Gaussian sigma of a soft edge in pixels (0 = hard mask).")


class AspectConfig(_Section):
    """One quality aspect: a reward and (optionally) a localizer."""

    type: str = Field(..., description="aspect type: toyworld, mask_files, python, saliency, or a registered one (see docs/api.md).")
    name: str | None = Field(None, description="name in logs; default: from the aspect.")
    weight: float = Field(1.0, description="weight of this aspect's reward in the total reward (0 = mask only).")
    localize: bool = Field(True, description="whether its heatmap contributes to the mask (union over aspects).")
    gate: float | Literal["auto", "off"] = Field(
        "auto",
        description="mask gate: this aspect's mask is empty on images whose reward is at or above the gate "
        "(its score says: no defect), so clean images keep the whole constraint. auto: the aspect's own "
        "reward_threshold (toy world: log 0.5), none if it has none; off: never gate; a number: that reward.",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="type-specific arguments.")

    @model_validator(mode="after")
    def _gate_needs_a_mask(self) -> AspectConfig:
        if not self.localize and self.gate != "auto":
            raise ValueError(f"gate {self.gate!r} gates this aspect's mask, but localize is false (it gives none)")
        return self


class DataConfig(_Section):
    """The training pool: every prompt x every seed; Î0 and its mask are computed once per pair."""

    prompts: list[str] | None = Field(None, description="training prompts (or use prompts_file).")
    prompts_file: str | None = Field(None, description="text file with one prompt per line ('toy:train' = toy world).")
    prompts_dataset: str | None = Field(
        None,
        description="a Hugging Face `datasets` dataset: a folder written by save_to_disk, a data file "
        "(csv, json, jsonl, parquet, txt) or a hub id; needs the datasets extra.",
    )
    prompts_column: str = Field("prompt", min_length=1, description="the dataset's column that holds the prompts.")
    prompts_split: str = Field("train", min_length=1, description="the dataset's split.")
    seeds_per_prompt: int = Field(4, ge=1, description="initial-noise seeds per prompt.")
    seed_offset: int = Field(0, ge=0, description="seeds are seed_offset .. seed_offset + seeds_per_prompt - 1.")
    validation_prompts: list[str] | None = Field(
        None,
        description="prompts never trained on, sampled every train.validation_every steps at fixed seeds, the base "
        "model's image above the current one (samples/validation_*.png and the tracker).",
    )
    validation_seeds: list[int] = Field(default_factory=lambda: [10_000], min_length=1,
                                        description="initial-noise seeds of the validation images.")
    cache_on_disk: bool = Field(
        True,
        description="store the reference cache (Î0, latents, heatmap, mask per prompt and seed) under "
        "output_dir/reference_cache, read lazily; false keeps every item in RAM (grows with the pool).",
    )
    cache_ram_items: int = Field(
        256, ge=1, description="reference items kept in RAM (LRU) when cache_on_disk; about 1.1 MB each at 512x512."
    )
    prefill_reference: bool = Field(
        True,
        description="compute every missing reference item before the first step, in batches of "
        "prefill_batch_size, so that training steps never wait for one (the items of step 0 come from the "
        "zero LoRA's own sample, which is the frozen model's). With several processes it needs cache_on_disk.",
    )
    prefill_batch_size: int = Field(32, ge=1, description="prompts per reference batch when prefilling.")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if sum(x is not None for x in (self.prompts, self.prompts_file, self.prompts_dataset)) != 1:
            raise ValueError("give exactly one of data.prompts, data.prompts_file or data.prompts_dataset")
        if self.prompts is not None and (not self.prompts or any(not p.strip() for p in self.prompts)):
            raise ValueError("data.prompts must be a non-empty list of non-empty strings")
        if self.validation_prompts is not None and (
            not self.validation_prompts or any(not p.strip() for p in self.validation_prompts)
        ):
            raise ValueError("data.validation_prompts must be a non-empty list of non-empty strings (or unset)")
        return self


class TrainConfig(_Section):
    """Optimisation, checkpoints and logging."""

    output_dir: str = Field("runs/focusnfix", description="run directory (config, log, checkpoints, LoRA, samples).")
    steps: int = Field(100, ge=1, description="optimizer steps.")
    batch_size: int = Field(4, ge=1, description="global images per micro-batch, split across processes.")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch) or adamw_8bit (bitsandbytes, CUDA only: the bnb extra)."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (DRaFT: 0.1).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm.")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None,
        description="autocast precision; unset: accelerate's (`accelerate launch --mixed_precision`, "
        "`accelerate config`), 'no' when none is configured. Set here, it wins over accelerate's.",
    )
    seed: int = Field(0, ge=0, description="seed of the LoRA initialisation, batch order and DRaFT-LV noise.")
    checkpoint_every: int = Field(50, ge=0, description="save a resumable checkpoint every N steps (0 = never).")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep.")
    sample_every: int = Field(0, ge=0, description="save a sample grid every N steps (0 = only at the end).")
    num_sample_images: int = Field(4, ge=1, description="pool items shown in sample grids.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: what accelerate picks.")
    validation_every: int = Field(0, ge=0, description="sample data.validation_prompts every N steps (0 = only at the end).")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none",
        description="experiment tracker (through accelerate): every numeric field of each step's log record and "
        "the sample grids; tensorboard writes under output_dir/trackers. Needs the matching extra.",
    )
    tracker_project: str = Field("focusnfix", min_length=1, description="tracker project / run group name.")


class Config(_Section):
    """A whole training run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    aspects: list[AspectConfig] = Field(..., min_length=1, description="the aspects to fix (at least one).")
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _checks(self) -> Config:
        if not any(a.localize for a in self.aspects):
            raise ValueError("aspects: at least one aspect must have localize: true (it gives the mask)")
        if all(a.weight == 0 for a in self.aspects):
            raise ValueError("aspects: every weight is 0, so there is no reward to raise (the loss and its gradient "
                             "would be 0 at every step): give the target aspect a non-zero weight")
        for i, a in enumerate(self.aspects):
            if a.type == "mask_files" and (a.weight != 0 or not a.localize):  # its reward is 0: masks are all it gives
                raise ValueError(f"aspects[{i}]: a mask_files aspect gives masks only (its reward is 0): set weight: 0 "
                                 "and localize: true, and give the reward as another aspect")
        names = [a.name for a in self.aspects if a.name]
        if len(names) != len(set(names)):
            raise ValueError(f"aspects: names must be unique, got {names}")
        steps = self.sampling.num_inference_steps
        if self.lora.active_steps is not None and self.lora.active_steps > steps:
            raise ValueError(f"lora.active_steps={self.lora.active_steps} exceeds sampling.num_inference_steps={steps}")
        return self


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict) or first["type"] == "missing" else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{shown}{more}"


# ``--set key.path=value`` overrides stay hand-written (25 lines) on purpose: OmegaConf or Hydra
# would do it, but they bring their own config objects and interpolation rules next to pydantic,
# which already validates every field; here a value is YAML-parsed and the result validated once.
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-4"`` -> (["train", "learning_rate"], 1e-4); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML") from err
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {'.'.join(path)}: {where} is not a valid list index")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {'.'.join(path)}: {where} is not a section")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {'.'.join(path)}: {last} is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a config dict (plus overrides) into a :class:`Config`."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy through plain types
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file (e.g. configs/toy_safety.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(read_text(path, "config file"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    config = config_from_dict(data, overrides)
    # a relative prompts path is read from the working directory, else beside the config file; fixed
    # here so that every command (train, eval, sweep, oracle) and the run's config.yaml agree
    d = config.data
    for field in ("prompts_file", "prompts_dataset"):
        spec = getattr(d, field)
        if spec and not spec.startswith("toy:") and not Path(spec).is_absolute() and not Path(spec).exists() \
                and (path.parent / spec).exists():
            setattr(d, field, str((path.parent / spec).resolve()))
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML (written to every run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _dataset_prompts(data: DataConfig, base_dir: Path | None) -> list[str]:
    """The prompts column of a ``datasets`` dataset (a save_to_disk folder, a data file or a hub id)."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError("data.prompts_dataset needs the 'datasets' package: pip install 'focusnfix[datasets]'") from err
    spec = data.prompts_dataset
    assert spec is not None
    path = Path(spec)
    if not path.exists() and base_dir is not None and (base_dir / spec).exists():
        path = base_dir / spec
    suffixes = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            ds = ds[data.prompts_split] if isinstance(ds, datasets.DatasetDict) else ds
        elif path.is_file() and path.suffix in suffixes:
            ds = datasets.load_dataset(suffixes[path.suffix], data_files=str(path), split=data.prompts_split)
        else:
            ds = datasets.load_dataset(spec, split=data.prompts_split)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise ConfigError(f"data.prompts_dataset {spec!r} (split {data.prompts_split!r}) cannot be read: {err}") from err
    if data.prompts_column not in ds.column_names:
        raise ConfigError(f"data.prompts_column {data.prompts_column!r} is not a column of {spec!r}; "
                          f"it has {ds.column_names}")
    prompts = [str(p) for p in ds[data.prompts_column] if p is not None and str(p).strip()]
    if not prompts:
        raise ConfigError(f"data.prompts_dataset {spec!r}: column {data.prompts_column!r} holds no non-empty prompt")
    return prompts


def resolve_prompts(data: DataConfig, base_dir: Path | None = None) -> list[str]:
    """The training prompts: the inline list, a file (one per line), ``toy:<split>``, or a ``datasets`` dataset."""
    if data.prompts is not None:
        return list(data.prompts)
    if data.prompts_dataset is not None:
        return _dataset_prompts(data, base_dir)
    assert data.prompts_file is not None
    if data.prompts_file.startswith("toy:"):
        split = data.prompts_file.split(":", 1)[1]
        if split not in toyworld.PROMPT_SPLITS:
            raise ConfigError(f"data.prompts_file: toy split must be one of {toyworld.PROMPT_SPLITS}, got {split!r}")
        return list(toyworld.prompts(split))
    path = Path(data.prompts_file)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    return read_prompts_file(path, "data.prompts_file")
