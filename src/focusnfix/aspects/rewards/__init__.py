"""Reward-model adapters for real checkpoints; :mod:`focusnfix.aspects.registry` registers them.

One module per reward model; each builds from a user path or hub id. Their optional packages
(extras) are imported only when such an aspect is built, never at startup:

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
