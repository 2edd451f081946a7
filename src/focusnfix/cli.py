"""Command-line interface: every ``focusnfix`` command and its flags, in one parser.

    focusnfix [--threads N] train | sample | mask | demo | eval | votes | diagnose | oracle | report | rate | sweep | export
                            | push
    focusnfix [--threads N] toyworld build | path | stats | calibrate | ceiling | robustness | audit-sheets | audit-add
    focusnfix [--threads N] rahf train | eval

The handlers live in :mod:`focusnfix.commands` (named here, imported once a command runs). Every command exits with 0 on success, 2 on bad
input (one line naming the field, path or value at fault), 1 on anything else. Library loading
bars (diffusers, transformers) are off in every command; the commands' own progress bars stay.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Sequence

# keep third-party chatter (torchvision fallbacks, deprecations) off the user's terminal; set
# before diffusers and transformers are first imported, which read these at import
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

from focusnfix.errors import InputError  # noqa: E402

#: the commands, in the order ``focusnfix --help`` lists them
COMMANDS = ("train", "sample", "mask", "demo", "eval", "votes", "diagnose", "oracle", "report", "rate", "sweep", "select",
            "export", "push", "toyworld", "rahf")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default (where it has one that is not None or False and the
    help text does not already say it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


#: seeds must fit torch's and numpy's generators (a signed 64-bit integer, not negative)
MAX_SEED = 2**63 - 1


def seed_int(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be an integer in [0, 2**63 - 1], got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def torch_device(text: str) -> str:
    """A device string torch parses (cpu, cuda, cuda:1, mps, ...) whose device this machine has."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a torch device (e.g. cpu, cuda, cuda:1, mps): {text!r}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="focusnfix", description="Region-aware reward fine-tuning of text-to-image diffusion models."
    )
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores that "
                             "other processes leave idle: cpu_count - 1-minute load average, at least 1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    p = sub.add_parser("train", formatter_class=HelpFormatter, help="fine-tune a LoRA with Focus-N-Fix (beta = 0: DRaFT)")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeat per field: --set a=1 --set b=2)")
    p.add_argument("--resume", nargs="?", const="latest", default=False, metavar="PATH|latest",
                   help="continue from the run directory's last checkpoint, or from the checkpoint directory PATH")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds a run")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print the plan; load nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func="cmd_train")

    p = sub.add_parser("sample", formatter_class=HelpFormatter, help="sample an image with the same sampler as training")
    p.add_argument("--model", help="'toy', a diffusers pipeline directory or a hub id (default: the run's, else toy)")
    p.add_argument("--lora", help="directory with pytorch_lora_weights.safetensors")
    p.add_argument("--config", help="a run's config.yaml: model and sampling settings (default: RUN_DIR/config.yaml "
                                    "when --lora is RUN_DIR/lora)")
    p.add_argument("--prompt", required=True, help="the prompt to draw")
    p.add_argument("--seed", type=seed_int, nargs="+", default=[0], help="one or more seeds (several: a row)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the run's, else 20)")
    p.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: the run's, else 7.5)")
    p.add_argument("--height", type=int, help="pixels, a multiple of the VAE scale factor (default: the model's)")
    p.add_argument("--width", type=int, help="pixels, a multiple of the VAE scale factor (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the run's, else float32")
    p.add_argument("--device", type=torch_device, default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func="cmd_sample")

    p = sub.add_parser("mask", formatter_class=HelpFormatter, help="show what training would fix: Î0 | heatmap | mask | overlay")
    p.add_argument("--config", required=True, help="a training config (its model, aspects, mask settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeat per field: --set a=1 --set b=2)")
    p.add_argument("--prompt", required=True, help="the prompt whose frozen-model image is masked")
    p.add_argument("--seed", type=seed_int, default=0, help="initial-noise seed")
    p.add_argument("--scale", type=positive_int, default=4, help="pixel upscaling of the picture")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func="cmd_mask")

    p = sub.add_parser("demo", formatter_class=HelpFormatter, help="train Focus-N-Fix and DRaFT on the toy world, evaluate, report")
    p.add_argument("--out", required=True, help="output directory (metrics.json, report.html, lora/)")
    p.add_argument("--quick", action="store_true", help="1 seed, 6 training steps per method, 16 evaluation images (about 1 minute on 2 cores): a smoke test")
    p.add_argument("--reward", default="safety", choices=["safety", "safety_narrow", "plausibility"],
                   help="the toy reward trained on: safety (robust), safety_narrow (hackable), plausibility")
    p.add_argument("--train-seeds", type=positive_int, default=None, help="training seeds per method (default 3, quick 1)")
    p.add_argument("--jobs", type=positive_int, default=None, help="runs trained side by side (default 2 where 2 cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func="cmd_demo")

    p = sub.add_parser("eval", formatter_class=HelpFormatter, help="evaluate base vs LoRAs (and SLD) on held-out prompts and seeds")
    p.add_argument("--model", help="'toy', a diffusers pipeline directory or a hub id (default: the config's; "
                   "loaded with the config's dtype, variant, revision and train.device)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                   help="a method: name and run (or LoRA) directory, repeatable, e.g. focusnfix=runs/fnf; "
                   "several comma-separated runs (training seeds) of one method are resampled together")
    p.add_argument("--compare", action="append", default=[], metavar="A,B",
                   help="report the paired difference A - B of two methods (same number of runs)")
    p.add_argument("--aspects", help="toy world aspects, comma-separated; the first is the target")
    p.add_argument("--config", help="the training config (default: the runs' own config.yaml; they must agree)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeat per field: --set a=1 --set b=2)")
    p.add_argument("--prompts", help="prompt file (one per line) or toy:heldout (default: toy:heldout for the toy "
                   "model; required for any other)")
    p.add_argument("--max-prompts", type=non_negative_int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds per prompt")
    p.add_argument("--seed-offset", type=non_negative_int, default=10000, help="first seed (clear of the training seeds)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default: the training config's)")
    p.add_argument("--guidance", type=finite_float, help="guidance scale (default: the training config's)")
    p.add_argument("--sld", action="store_true", help="also run the Safe Latent Diffusion baseline (method 'sld')")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per sampling and scoring batch")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples per interval")
    p.add_argument("--votes", action="append", default=[], metavar="FILE", help="fold human votes into metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func="cmd_eval")

    p = sub.add_parser("votes", formatter_class=HelpFormatter, help="fold rating-page votes into an evaluation's metrics.json")
    p.add_argument("dir", help="evaluation directory")
    p.add_argument("--votes", action="append", required=True, metavar="FILE", help="votes JSON (repeatable)")
    p.set_defaults(func="cmd_votes")

    p = sub.add_parser("diagnose", formatter_class=HelpFormatter, help="where each method's fixes happened and whether the mask allowed them "
                                        "(after the fact; toy-world judges)")
    p.add_argument("dir", help="evaluation directory")
    p.add_argument("--min-psnr", type=finite_float, default=35.0, help="outside-mask PSNR (dB) of a regional fix")
    p.set_defaults(func="cmd_diagnose")

    p = sub.add_parser("oracle", formatter_class=HelpFormatter, help="what the objective asks for without the LoRA: each reference image's latents "
                                      "optimized alone under the config's reward, mask and beta")
    p.add_argument("--config", required=True, help="a training config (its model, aspects, mask, sampling, norm)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeat per field: --set a=1 --set b=2)")
    p.add_argument("--prompts", help="prompts (default: the config's training prompts; keep held-out prompts out)")
    p.add_argument("--max-prompts", type=non_negative_int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds per prompt, from the config's seed_offset")
    p.add_argument("--betas", default=None, help="comma-separated (default: 0 and the config's beta and beta_end)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per image (0: the references only)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="Adam learning rate in latent units")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--no-judges", action="store_true", help="do not judge the images (toy world judges otherwise)")
    p.add_argument("--out", required=True, help="directory for oracle.json and oracle.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func="cmd_oracle")

    p = sub.add_parser("report", formatter_class=HelpFormatter, help="write a self-contained HTML report of an evaluation")
    p.add_argument("dir", help="evaluation directory")
    p.add_argument("--out", help="HTML file (default: DIR/report.html)")
    p.add_argument("--train-log", action="append", default=[], metavar="NAME=PATH",
                   help="a training log.jsonl (or run directory) to plot (repeatable)")
    p.add_argument("--sweep", help="sweep.json for the beta trade-off curve")
    p.add_argument("--max-examples", type=non_negative_int, help="example images shown (default: 32, chosen to show the range)")
    p.add_argument("--markdown", action="store_true",
                   help="print the claim table as markdown (the README's tables) instead of writing HTML")
    p.set_defaults(func="cmd_report")

    p = sub.add_parser("rate", formatter_class=HelpFormatter, help="write the static human-rating page of an evaluation")
    p.add_argument("dir", help="evaluation directory")
    p.add_argument("--out", help="HTML file (default: DIR/rate.html)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the task order")
    p.add_argument("--max-examples", type=positive_int, help="rate only the first N images (default: all)")
    p.set_defaults(func="cmd_rate")

    p = sub.add_parser("sweep", formatter_class=HelpFormatter, help="train one LoRA per beta and evaluate the trade-off (beta 0 = DRaFT)")
    p.add_argument("--config", required=True, help="the training config every run starts from")
    p.add_argument("--betas", required=True, help="comma-separated, e.g. 0,0.3,1,3")
    p.add_argument("--out", required=True, help="output directory: beta_<b>/ runs, eval/, sweep.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (every run)")
    p.add_argument("--draft-set", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides of the beta 0 (DRaFT) run only, e.g. lora.active_steps=null, sampling.k=2")
    p.add_argument("--prompts", help="evaluation prompts (default: the config's training prompts)")
    p.add_argument("--seeds", type=positive_int, default=2, help="evaluation seeds per prompt")
    p.add_argument("--seed-offset", type=non_negative_int, default=10000, help="first evaluation seed (clear of training seeds)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="evaluation batch size")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples per interval")
    p.add_argument("--no-judges", action="store_true",
                   help="do not load the judges (choosing beta on validation prompts: training-time signals only)")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs trained side by side, one process each")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func="cmd_sweep")

    p = sub.add_parser("select", formatter_class=HelpFormatter, help="the validation selection rule over several sweeps (a grid beyond beta)")
    p.add_argument("sweeps", nargs="+", help="`focusnfix sweep` output directories (or their sweep.json)")
    p.add_argument("--out", required=True, help="writes OUT/sweep.json: every point and the selection")
    p.set_defaults(func="cmd_select")

    p = sub.add_parser("export", formatter_class=HelpFormatter, help="write a run's LoRA in another format (kohya: ComfyUI, AUTOMATIC1111)")
    p.add_argument("run", help="a run directory, its lora/ directory or a pytorch_lora_weights.safetensors")
    p.add_argument("--format", default="kohya", choices=["kohya"], help="target format")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha, only for files without adapter metadata")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    p.set_defaults(func="cmd_export")

    p = sub.add_parser("push", formatter_class=HelpFormatter, help="upload a run's LoRA with a model card to the Hugging Face Hub")
    p.add_argument("run", help="run directory")
    p.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    p.add_argument("--eval", default=None, help="an evaluation directory whose metrics go into the card")
    p.add_argument("--private", action="store_true")
    p.add_argument("--base-model", default=None, metavar="USER/NAME",
                   help="the Hub id of the weights trained on, for the card's base_model (default: the run's "
                        "model.path when it is a Hub id; a local folder gives none)")
    p.add_argument("--dry-run", metavar="DIR", nargs="?", const="", default=None,
                   help="only write the upload folder, to DIR (default: RUN/hub_upload)")
    p.set_defaults(func="cmd_push")

    tw = sub.add_parser("toyworld", formatter_class=HelpFormatter, help="the embedded toy world: build, locate, measure")
    tw_sub = tw.add_subparsers(dest="toyworld_command", required=True)
    p = tw_sub.add_parser("build", formatter_class=HelpFormatter, help="train the toy pipeline, aspect models and judges (CPU)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="a few-minute, lower-quality build (for tests)")
    p.add_argument("--seed", type=int, default=0, help="build seed (default 0 = the shipped models)")
    p.add_argument("--threads", type=int, default=None, dest="recipe_threads",
                   help="torch threads per build process (default: the recipe's, 1)")
    p.add_argument("--device", type=torch_device, default="cpu", help="torch device for training (default cpu)")
    p.add_argument("--stats", action="store_true", help="measure and write stats.json after building")
    p.add_argument("--only", default=None, metavar="STAGES",
                   help="retrain only these stages of the finished build in --out, from its own VAE and "
                        "pipeline: decoder (fine-tune the VAE decoder alone, once), rewards (narrow safety, "
                        "plausibility, alignment), safety_reward, judges, safety_harden "
                        "(the safety reward's hardening against long attacks alone; comma-separated, "
                        "run in this order)")
    p.set_defaults(func="cmd_toyworld_build")
    p = tw_sub.add_parser("path", formatter_class=HelpFormatter, help="print the packaged toy pipeline directory")
    p.add_argument("--model", default=None, help="a build directory instead of the packaged assets")
    p.set_defaults(func="cmd_toyworld_path")
    p = tw_sub.add_parser("stats", formatter_class=HelpFormatter, help="measure the toy world and print JSON")
    p.add_argument("--model", default=None, help="a build directory (default: the packaged assets)")
    p.add_argument("--n", type=positive_int, default=192, help="pipeline samples (held-out prompts x seeds)")
    p.add_argument("--grid", default=None, help="also save a PNG grid of the first 64 samples")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="CFG scale of the pipeline samples (default 7.5; the toy presets train at 5)")
    p.set_defaults(func="cmd_toyworld_stats")
    p = tw_sub.add_parser("calibrate", formatter_class=HelpFormatter, help="localizer recall and mask area vs the generator's exact defect masks")
    p.add_argument("--aspect", default="safety", help="toy aspect: safety, safety_narrow or plausibility")
    p.add_argument("--n", type=positive_int, default=512, help="calibration images (training captions, about half defective)")
    p.add_argument("--min-recall", type=share, default=0.95, help="recall the chosen setting must reach, in (0, 1]")
    p.add_argument("--source", choices=("renders", "pipeline"), default="renders",
                   help="renders: generator renders with exact masks; pipeline: render / fixed-twin pairs "
                        "through the base pipeline image-to-image, mask = where the outputs differ")
    p.add_argument("--out", default=None, help="also write every row as JSON here")
    p.set_defaults(func="cmd_toyworld_calibrate")
    p = tw_sub.add_parser("ceiling", formatter_class=HelpFormatter, help="outside-mask PSNR a perfect regional fix reaches through the toy VAE, "
                                          "and how far the decoder spreads a latent change")
    p.add_argument("--aspect", default="safety", help="toy aspect: safety or plausibility")
    p.add_argument("--n", type=positive_int, default=256, help="training-caption scenes drawn with the defect")
    p.add_argument("--dilate", default="3,5,8", help="mask dilations in pixels, comma-separated")
    p.set_defaults(func="cmd_toyworld_ceiling")
    p = tw_sub.add_parser("robustness", formatter_class=HelpFormatter, help="how often pixel and decoder (latent) attacks inside a mark fool a "
                                             "safety reward, on held-out generator scenes (JSON)")
    p.add_argument("--aspect", default="safety", help="safety or safety_narrow")
    p.add_argument("--model", default=None, help="a build directory (default: the packaged assets)")
    p.add_argument("--n", type=positive_int, default=192, help="held-out scenes, each with a mark in a random form")
    p.add_argument("--steps", default="5,10,20", help="attack lengths, comma-separated")
    p.set_defaults(func="cmd_toyworld_robustness")
    p = tw_sub.add_parser("audit-sheets", formatter_class=HelpFormatter, help="sample a new audit batch from trained runs: shuffled images, "
                                               "labelling sheets, a labels template (docs/toyworld.md)")
    p.add_argument("--run", action="append", required=True, metavar="SOURCE=RUN_DIR",
                   help="a training run and the source name it is recorded under (repeatable); "
                        "SOURCE 'base' samples the run's base model (no LoRA)")
    p.add_argument("--prompts", default="toy:heldout", help="prompts: toy:heldout or a file (default toy:heldout)")
    p.add_argument("--n-prompts", type=positive_int, default=15, help="the first N prompts (default 15)")
    p.add_argument("--seeds", default="50000,50001", help="sampling seeds, comma-separated")
    p.add_argument("--shuffle-seed", type=seed_int, default=0, help="seed of the blind order")
    p.add_argument("--out", required=True, help="batch directory")
    p.set_defaults(func="cmd_toyworld_audit_sheets")
    p = tw_sub.add_parser("audit-add", formatter_class=HelpFormatter, help="append a labelled audit batch to the audit set")
    p.add_argument("--batch", required=True, help="a directory made by audit-sheets")
    p.add_argument("--labels", required=True, help="its filled-in labels file")
    p.add_argument("--model", default=None, help="a build directory instead of the packaged assets")
    p.set_defaults(func="cmd_toyworld_audit_add")

    rahf = sub.add_parser("rahf", formatter_class=HelpFormatter, help="train / evaluate a RAHF-style heatmap and score model on RichHF-18K")
    rahf_sub = rahf.add_subparsers(dest="rahf_command", required=True)
    p = rahf_sub.add_parser("train", formatter_class=HelpFormatter, help="train on RichHF-18K TFRecords + Pick-a-Pic images")
    _richhf_data_args(p)
    p.add_argument("--out", required=True, help="output directory (model + train_log.jsonl)")
    p.add_argument("--config", default=None, help="YAML/JSON training config (see focusnfix.rahf.train.RAHFTrainConfig)")
    p.add_argument("--steps", type=positive_int, default=None, help="override the config's steps")
    p.set_defaults(func="cmd_rahf_train")
    p = rahf_sub.add_parser("eval", formatter_class=HelpFormatter, help="heatmap (MSE, CC, KLD, SIM, NSS, AUC-Judd) and score (PLCC, SRCC) metrics")
    _richhf_data_args(p)
    p.add_argument("--model", required=True, help="directory written by `focusnfix rahf train`")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func="cmd_rahf_eval")
    return parser


def _richhf_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tfrecords", required=True, help="glob of RichHF-18K TFRecord files (quote it)")
    p.add_argument("--images", required=True, help="directory of Pick-a-Pic images, found by the records' filename")
    p.add_argument("--captions", default=None,
                   help="prompts: JSON {filename: caption} or JSON lines with filename and caption "
                        "(else the record's prompt field or <image>.txt)")
    p.add_argument("--no-verify-crc", action="store_true", help="skip TFRecord CRC checks (faster)")


def default_threads(requested: int | None) -> int | None:
    """Torch threads for this command: ``--threads``; else None (keep torch's) when OMP_NUM_THREADS
    is set; else the cores that other processes leave idle, ``cpu_count - round(1-min load)``, >= 1.

    Two torch processes that each use every core of a shared machine thrash (5-15x slower).
    """
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows)
        return None
    return max(1, min(cpus, cpus - round(load)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The one deliberate exception to "imports at the top": the handlers pull in torch, diffusers
    # and every model family (about 10 s), which `focusnfix --help` and a bad flag must not wait for.
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from focusnfix import commands

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    threads_before = torch.get_num_threads()
    threads = default_threads(args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return int(getattr(commands, args.func)(args) or 0)
    except InputError as err:
        print(f"focusnfix: error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        # a path given where another kind of path was expected (--out naming a file, a file naming a folder)
        expected = {FileExistsError: "a folder, or a path that does not exist yet",
                    IsADirectoryError: "a file, not a folder", NotADirectoryError: "a folder, not a file",
                    PermissionError: "a path this user may write"}[type(err)]
        print(f"focusnfix: error: {err.filename}: {err.strerror} (expected {expected})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("focusnfix: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    sys.exit(main())
