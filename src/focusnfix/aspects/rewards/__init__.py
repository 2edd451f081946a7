"""Reward-model adapters for real checkpoints, registered as aspect types.

One module per reward model; each builds from a user path or hub id and is imported only when a
config uses it (optional packages are never imported at startup):

==============  =======================================  ==========================  ========
type            reward (higher is better)                weights                     extra
==============  =======================================  ==========================  ========
clip_score      CLIP cosine (or logit) image/text        CLIPModel dir / hub id      -
pickscore       logit_scale * cosine of PickScore        CLIPModel dir / hub id      -
aesthetic       LAION aesthetic predictor v2 (1-10)      CLIP ViT-L/14 + MLP head    -
hpsv2           HPSv2 cosine (open_clip ViT-H/14)        checkpoint file / hub file  clip
imagereward     ImageReward (BLIP + MLP)                 ImageReward-v1.0 / .pt      imagereward
nudenet         none (localizer only: detector boxes)    shipped in the nudenet wheel nudenet
rahf            a RAHF score; heatmap = a RAHF map       ``focusnfix rahf train`` dir -
==============  =======================================  ==========================  ========

Heatmaps: Grad-CAM of the reward on the vision tower's last layer by default (``localizer``),
NudeNet boxes, or RAHF's predicted maps.
"""

from __future__ import annotations

import importlib
from typing import Any

from focusnfix.aspects import Aspect, register_aspect_type


def _lazy(module: str, attr: str = "from_pretrained"):
    def factory(**kwargs: Any) -> Aspect:
        return getattr(importlib.import_module(module), attr)(**kwargs)

    factory.__name__ = f"{module.rsplit('.', 1)[-1]}_{attr}"
    return factory


REWARD_TYPES = {
    "clip_score": _lazy("focusnfix.aspects.rewards.clip_score"),
    "pickscore": _lazy("focusnfix.aspects.rewards.pickscore"),
    "aesthetic": _lazy("focusnfix.aspects.rewards.aesthetic"),
    "hpsv2": _lazy("focusnfix.aspects.rewards.hpsv2"),
    "imagereward": _lazy("focusnfix.aspects.rewards.imagereward"),
    "nudenet": _lazy("focusnfix.aspects.nudenet", "NudeNetAspect"),
    "rahf": _lazy("focusnfix.rahf.aspect", "from_pretrained"),
}

for _name, _factory in REWARD_TYPES.items():
    register_aspect_type(_name, _factory)

__all__ = ["REWARD_TYPES"]
