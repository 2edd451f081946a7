"""Aspects: a reward plus a localizer per quality aspect.

* :mod:`focusnfix.aspects.base`: the :class:`Aspect` and :class:`Judge` interfaces;
* :mod:`focusnfix.aspects.registry`: the aspect types a config names, :func:`build_aspect`,
  :func:`register_aspect_type`;
* :mod:`focusnfix.aspects.saliency`: saliency localizers of a scalar reward (:class:`SaliencyAspect`);
* :mod:`focusnfix.aspects.mask_files`: user-given masks (:class:`MaskFileAspect`);
* :mod:`focusnfix.aspects.rewards`, :mod:`focusnfix.aspects.nudenet`: real reward models and localizers.

This package imports only the interfaces and the two plain aspects; the registry imports every
aspect type (the toy world included), so it is a module of its own that nothing here imports.
"""

from __future__ import annotations

from focusnfix.aspects.base import Aspect, CalibratedJudge, Judge, aspect_heatmap
from focusnfix.aspects.mask_files import MaskFileAspect
from focusnfix.aspects.saliency import SaliencyAspect

__all__ = ["Aspect", "CalibratedJudge", "Judge", "MaskFileAspect", "SaliencyAspect", "aspect_heatmap"]
