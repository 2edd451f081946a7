"""focusnfix: region-aware reward fine-tuning of text-to-image diffusion models (Focus-N-Fix).

The Python API (docs/api.md): :class:`FocusNFixTrainer`, the :class:`Aspect` and :class:`Judge`
interfaces, :func:`config_from_dict` / :func:`load_config`, :func:`export_kohya`. They are imported
on first use, so ``import focusnfix`` stays cheap. The evaluation harness is
``from focusnfix.evaluate import evaluate``: ``focusnfix.evaluate`` is its module (a function of the
same name exported here would be shadowed by the submodule once anything imported it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FocusNFixTrainer": "focusnfix.train",
    "Aspect": "focusnfix.aspects.base",
    "Judge": "focusnfix.aspects.base",
    "Config": "focusnfix.config",
    "config_from_dict": "focusnfix.config",
    "load_config": "focusnfix.config",
    "export_kohya": "focusnfix.export",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'focusnfix' has no attribute {name!r}")
