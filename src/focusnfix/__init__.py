"""focusnfix: region-aware reward fine-tuning of text-to-image diffusion models (Focus-N-Fix)."""

__version__ = "0.1.0"
