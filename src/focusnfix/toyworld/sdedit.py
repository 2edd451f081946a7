"""Judge training data that looks like the pipeline's samples, with labels that stay true.

Generator renders are flat; the pipeline's samples (and a fine-tuned model's) are soft, textured
and haloed, and judges trained on renders flag those looks as defects. Here each render with a
defect and its fixed twin (:func:`~focusnfix.toyworld.forms.render_fixed`) are both passed
through the base pipeline image-to-image (SDEdit: encode, noise to an intermediate step, denoise
with the caption) with *the same* noise. What still differs between the two outputs is the
defect as the pipeline draws it: its mask is where they differ by more than
:data:`SDEDIT_MASK_TOLERANCE`, and the defect counts as present when that mask holds at least
:data:`MIN_DEFECT_PIXELS` pixels (else the pipeline erased it and the pair is labelled clean).
The fixed twin's output is a clean, sample-like negative.
"""

from __future__ import annotations

import torch

from focusnfix.backbones import Backbone
from focusnfix.ops import dilate
from focusnfix.sampling import SamplingOptions, decode, denoise
from focusnfix.toyworld.forms import forms_dataset, render_fixed

#: a pixel of an SDEdit output belongs to the defect when it differs from the fixed twin's output
#: by more than this in some channel (and lies near the drawn defect)
SDEDIT_MASK_TOLERANCE = 0.08
#: fewer differing pixels than this: the pipeline erased the defect
MIN_DEFECT_PIXELS = 4


@torch.no_grad()
def sdedit(backbone: Backbone, images: torch.Tensor, prompts: list[str], start: int, seed: int,
           options: SamplingOptions) -> torch.Tensor:
    """Image-to-image: ``images (B, 3, H, W)`` in [0, 1] noised to DDIM step ``start`` of
    ``options.num_inference_steps`` (one noise draw per ``seed``) and denoised with ``prompts``."""
    vae = backbone.vae
    latents = vae.encode(images.to(backbone.device, vae.dtype) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    sched = backbone.scheduler
    sched.set_timesteps(options.num_inference_steps, device=latents.device)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    x = sched.add_noise(latents, noise, sched.timesteps[start : start + 1].repeat(latents.shape[0]))
    cond = backbone.encode_prompts(prompts, options.negative_prompt, options.guidance_scale > 1.0)
    x0, _ = denoise(backbone, cond, x, options, grad_steps=0, start=start)
    return decode(backbone, x0).float().clamp(0, 1)


def sdedit_forms_dataset(backbone: Backbone, n: int, seed: int, aspect: str, batch: int = 32,
                         steps: int = 20, starts: tuple[int, ...] = (12, 13, 14), guidance: float = 5.0,
                         progress=None, forms: tuple[str, ...] | None = None,
                         p_defect: float = 0.5) -> dict[str, torch.Tensor]:
    """``2n`` sample-like images: each defect (or clean) render of :func:`forms_dataset` (``forms``,
    ``p_defect`` passed on) and its fixed twin, both through :func:`sdedit` with the same noise;
    labels and masks as the module docstring says. Returns ``images``, ``masks``, ``labels``,
    ``captions`` (the first ``n`` of each batch pair are the defect renders' outputs, interleaved
    by batch with their twins')."""
    data = forms_dataset(n, seed, aspect, "train", p_defect=p_defect, forms=forms)
    fixed = torch.stack([torch.from_numpy(render_fixed(s, aspect)) for s in data["scenes"]])
    out_img, out_mask, out_lab, caps = [], [], [], []
    for i in range(0, n, batch):
        sl = slice(i, min(n, i + batch))
        prompts = data["captions"][sl]
        start = starts[(i // batch) % len(starts)]
        opts = SamplingOptions(num_inference_steps=steps, guidance_scale=guidance)
        a = sdedit(backbone, data["images"][sl], prompts, start, seed * 100003 + i, opts).cpu()
        b = sdedit(backbone, fixed[sl], prompts, start, seed * 100003 + i, opts).cpu()
        near = dilate((data["masks"][sl] > 0).float(), 3)
        diff = ((a - b).abs().amax(dim=1, keepdim=True) > SDEDIT_MASK_TOLERANCE).float() * near
        present = diff.flatten(1).sum(1) >= MIN_DEFECT_PIXELS
        out_img += [a, b]
        out_mask += [diff * present.view(-1, 1, 1, 1), torch.zeros_like(diff)]
        out_lab += [present.float(), torch.zeros(len(prompts))]
        caps += list(prompts) * 2
        if progress is not None:
            progress(f"sdedit {aspect} {min(n, i + batch)}/{n}")
    return {"images": torch.cat(out_img), "masks": torch.cat(out_mask), "labels": torch.cat(out_lab),
            "captions": caps}


__all__ = ["MIN_DEFECT_PIXELS", "SDEDIT_MASK_TOLERANCE", "sdedit", "sdedit_forms_dataset"]
