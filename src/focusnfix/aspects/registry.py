"""The aspect types a config can name (``aspects[].type``), all registered here.

Built-in types:

* ``toyworld``: the toy world's aspect models; ``args: {aspect: safety|safety_narrow|plausibility|alignment}``,
  optionally ``localizer: gradcam|smoothgrad|input_gradient`` for the safety rewards (else the packaged one).
* ``mask_files``: user-given masks (:class:`MaskFileAspect`); ``args: {path: ...}``.
* ``python``: any factory returning an :class:`Aspect`; ``args: {target: "pkg.mod:fn", kwargs: {...}}``.
* ``saliency``: a scalar reward module from a factory, localized by saliency;
  ``args: {target: "pkg.mod:fn", kwargs: {...}, method: input_gradient|smoothgrad|gradcam,
  layer: ..., blur_sigma: ...}``.
* reward models (see :mod:`focusnfix.aspects.rewards`): ``clip_score``, ``pickscore``,
  ``aesthetic``, ``hpsv2``, ``imagereward``; the ``nudenet`` localizer; a trained ``rahf`` model.
  Their optional packages (extras) are imported when such an aspect is built, not here.

More types register with :func:`register_aspect_type`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from focusnfix import toyworld
from focusnfix.aspects.base import Aspect
from focusnfix.aspects.mask_files import MaskFileAspect
from focusnfix.aspects.nudenet import NudeNetAspect
from focusnfix.aspects.rewards import aesthetic, clip_score, hpsv2, imagereward, pickscore
from focusnfix.aspects.saliency import SaliencyAspect
from focusnfix.errors import InputError
from focusnfix.rahf import aspect as rahf_aspect

AspectFactory = Callable[..., Aspect]
ASPECT_TYPES: dict[str, AspectFactory] = {}


def register_aspect_type(name: str, factory: AspectFactory) -> None:
    """Make ``type: name`` usable in configs; ``factory(**args)`` returns an :class:`Aspect`."""
    ASPECT_TYPES[name] = factory


def import_target(target: str) -> Any:
    """``"package.module:attribute"`` -> the attribute."""
    if ":" not in target:
        raise InputError(f"target {target!r} must look like 'package.module:attribute'")
    module_name, attr = target.split(":", 1)
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise InputError(f"target {target!r} must look like 'package.module:attribute' (an absolute module path "
                         "and a name in it)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"cannot import {module_name!r} for target {target!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise InputError(f"module {module_name!r} has no attribute {attr!r}") from err


def import_factory(target: str) -> Any:
    """:func:`import_target`, checked to be callable (a class or a function that builds the object)."""
    factory = import_target(target)
    if not callable(factory):
        raise InputError(f"target {target!r} is a {type(factory).__name__}, expected a class or function to call")
    return factory


def build_aspect(type_name: str, args: dict[str, Any], name: str | None = None) -> Aspect:
    """Build one aspect from its config entry; frozen and in eval mode."""
    if type_name not in ASPECT_TYPES:
        raise InputError(f"unknown aspect type {type_name!r}; known: {', '.join(sorted(ASPECT_TYPES))}")
    try:
        aspect = ASPECT_TYPES[type_name](**args)
    except TypeError as err:
        raise InputError(f"aspect type {type_name!r}: bad args {sorted(args)}: {err}") from err
    if name:
        aspect.name = name
    aspect.eval().requires_grad_(False)
    return aspect


def _toyworld(aspect: str, localizer: str | None = None, root: str | None = None) -> Aspect:
    """``root``: a toy world build directory (``focusnfix toyworld build --out DIR``) whose aspect
    model to use instead of the packaged one (default: the packaged assets)."""
    if aspect not in toyworld.ASPECT_MODELS:
        raise InputError(f"toyworld aspect must be one of {list(toyworld.ASPECT_MODELS)}, got {aspect!r}")
    try:
        return toyworld.load_aspect(aspect, localizer=localizer, root=root)
    except FileNotFoundError as err:
        raise InputError(f"toyworld aspect {aspect!r}: args.root: {err}") from err
    except ValueError as err:
        raise InputError(f"toyworld aspect {aspect!r}: {err}") from err


def _python(target: str, kwargs: dict[str, Any] | None = None) -> Aspect:
    aspect = import_factory(target)(**(kwargs or {}))
    if not isinstance(aspect, Aspect):
        raise InputError(f"{target} returned {type(aspect).__name__}, expected a focusnfix Aspect")
    return aspect


def _saliency(target: str, kwargs: dict[str, Any] | None = None, name: str = "saliency", **options: Any) -> Aspect:
    """``options``: :class:`SaliencyAspect`'s method, layer, smooth_samples, noise_std, blur_sigma."""
    model = import_factory(target)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise InputError(f"{target} returned {type(model).__name__}, expected an nn.Module reward")
    try:  # a saliency reward is called as model(images, prompts): check before any image is sampled
        inspect.signature(model.forward).bind(None, None)
    except TypeError as err:
        raise InputError(f"{target}: a saliency reward model is called as model(images, prompts) -> (B,), but "
                         f"its forward{inspect.signature(model.forward)} cannot take that ({err})") from err
    except ValueError:  # no signature to read (a builtin): it is called as it is
        pass
    try:
        return SaliencyAspect(name, model, **options)
    except ValueError as err:
        raise InputError(str(err)) from err


register_aspect_type("toyworld", _toyworld)
register_aspect_type("mask_files", MaskFileAspect)
register_aspect_type("python", _python)
register_aspect_type("saliency", _saliency)
register_aspect_type("clip_score", clip_score.from_pretrained)
register_aspect_type("pickscore", pickscore.from_pretrained)
register_aspect_type("aesthetic", aesthetic.from_pretrained)
register_aspect_type("hpsv2", hpsv2.from_pretrained)
register_aspect_type("imagereward", imagereward.from_pretrained)
register_aspect_type("nudenet", NudeNetAspect)
register_aspect_type("rahf", rahf_aspect.from_pretrained)

__all__ = ["ASPECT_TYPES", "AspectFactory", "build_aspect", "import_target", "register_aspect_type"]
