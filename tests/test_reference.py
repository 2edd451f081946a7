"""The reference cache (cache.py): compact items, content keys, a manifest that names changes, bounded RAM."""

import json

import pytest
import torch

from focusnfix.cache import IMAGE_TOLERANCE, ReferenceCache, decode_item, encode_item
from focusnfix.objective import regional_constraint
from focusnfix.reference import Reference, changed_fields


def _fake_compute(calls: list):
    """A reference 'model': image and latents from (prompt, seed), a binary mask."""

    def compute(prompts, seeds):
        calls.append(list(zip(prompts, seeds, strict=True)))
        g = torch.Generator().manual_seed(sum(seeds) + len(prompts[0]))
        b = len(prompts)
        mask = torch.zeros(b, 1, 16, 16)
        mask[..., :8] = 1
        return Reference(
            images=torch.rand(b, 3, 16, 16, generator=g),
            latents=torch.randn(b, 4, 2, 2, generator=g) * 3,
            heatmap=torch.rand(b, 1, 16, 16, generator=g),
            mask=mask,
        )

    return compute


FIELDS = {"format": 2, "model": {"unet": "abc"}, "mask": {"threshold": 0.5}}


def test_compact_item_round_trip_is_within_half_a_quantization_step():
    ref = _fake_compute([])(["a"], [0])
    soft = ref.mask[0] * 0.7
    for mask in (ref.mask[0], soft):
        item = encode_item(ref.images[0], ref.latents[0], ref.heatmap[0], mask)
        assert item["image"].dtype == torch.uint8 and item["latents"].dtype == torch.float16
        back = decode_item(item)
        assert (back["images"] - ref.images[0]).abs().max() <= 0.5 / 255 + 1e-7
        assert torch.allclose(back["latents"], ref.latents[0], rtol=2**-10, atol=0)
        assert (back["mask"] - mask).abs().max() <= 0.5 / 255 + 1e-7
    binary = encode_item(ref.images[0], ref.latents[0], ref.heatmap[0], ref.mask[0])
    assert "mask_bits" in binary and binary["mask_bits"].numel() == 16 * 16 // 8
    assert torch.equal(decode_item(binary)["mask"], ref.mask[0])  # binary masks are exact


def test_quantized_reference_keeps_the_zero_lora_constraint_exactly_zero():
    exact = torch.rand(3, 3, 32, 32, requires_grad=True)
    stored = decode_item(encode_item(exact[0].detach(), torch.zeros(4, 4, 4), torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)))
    quantized = torch.stack([stored["images"]] * 3)
    quantized[1:] = (exact[1:].detach() * 255).round() / 255
    mask = torch.zeros(3, 1, 32, 32)
    c = regional_constraint(exact, quantized, mask, tolerance=IMAGE_TOLERANCE)
    assert torch.equal(c, torch.zeros(3))
    c.sum().backward()
    assert torch.equal(exact.grad, torch.zeros_like(exact))
    # a real change is still seen, less only the dead zone
    moved = (exact.detach() + 0.05).requires_grad_()
    c = regional_constraint(moved, quantized, mask, tolerance=IMAGE_TOLERANCE)
    assert (c > 0.04 * (3 * 32 * 32) ** 0.5).all()


def test_items_are_keyed_by_content_and_computed_once(tmp_path):
    calls = []
    cache = ReferenceCache(_fake_compute(calls), FIELDS, tmp_path / "c")
    first = cache.get(["a", "b"], [0, 1])
    again = cache.get(["b", "a"], [1, 0])
    assert len(calls) == 1 and torch.equal(again.images, first.images.flip(0))
    assert cache.key("a", 0) != cache.key("a", 1) != cache.key("b", 1)
    other = ReferenceCache(_fake_compute([]), {**FIELDS, "mask": {"threshold": 0.3}}, tmp_path / "c2")
    assert other.key("a", 0) != cache.key("a", 0)
    # a new cache on the same folder reads the items from disk
    calls2 = []
    reread = ReferenceCache(_fake_compute(calls2), FIELDS, tmp_path / "c")
    assert torch.equal(reread.get(["a"], [0]).images, first.images[:1]) and calls2 == []


def test_a_changed_field_is_named_and_its_items_rebuilt(tmp_path):
    notes = []
    ReferenceCache(_fake_compute([]), FIELDS, tmp_path / "c").get(["a"], [0])
    changed = {**FIELDS, "mask": {"threshold": 0.3}}
    calls = []
    cache = ReferenceCache(_fake_compute(calls), changed, tmp_path / "c", announce=notes.append)
    cache.get(["a"], [0])
    assert len(notes) == 1 and "mask.threshold changed" in notes[0]
    assert len(calls) == 1 and len(list((tmp_path / "c").glob("*.safetensors"))) == 1
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["fields"] == changed


def test_ram_stays_bounded_however_large_the_pool(tmp_path):
    cache = ReferenceCache(_fake_compute([]), FIELDS, tmp_path / "c", ram_items=3)
    for i in range(20):
        cache.get([f"p{i}", f"q{i}"], [i, i])
        assert len(cache.ram) <= 3
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 40
    one = cache.ram_bytes() / len(cache.ram)
    assert one == 3 * 16 * 16 + 4 * 2 * 2 * 2 + 16 * 16 + 16 * 16 // 8 + 3 * 8  # uint8, fp16, bits, shape


def test_a_damaged_item_is_recomputed(tmp_path):
    calls = []
    cache = ReferenceCache(_fake_compute(calls), FIELDS, tmp_path / "c", ram_items=1)
    cache.get(["a"], [0])
    (tmp_path / "c" / f"{cache.key('a', 0)}.safetensors").write_bytes(b"not safetensors")
    cache.ram.clear()
    cache.get(["a"], [0])
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("old", "new", "want"),
    [
        ({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}, ["b.c"]),
        ({"a": [1, {"x": 1}]}, {"a": [1, {"x": 2}]}, ["a.1.x"]),
        ({"a": 1}, {"a": 1, "z": 0}, ["z"]),
        ({"a": [1]}, {"a": [1, 2]}, ["a"]),
        ({"a": 1}, {"a": 1}, []),
    ],
)
def test_changed_fields_names_dotted_paths(old, new, want):
    assert changed_fields(old, new) == want


def test_files_named_by_aspect_args_are_part_of_the_identity(tmp_path):
    from focusnfix.reference import _file_hashes

    mask = tmp_path / "mask.png"
    mask.write_bytes(b"one")
    before = _file_hashes({"path": str(mask), "weight": 1})
    mask.write_bytes(b"two")  # same path, other content: another identity
    after = _file_hashes({"path": str(mask), "weight": 1})
    assert before["path"] != after["path"] and before["weight"] is None
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"abc")
    listed = _file_hashes(str(folder))
    (folder / "w.bin").write_bytes(b"abcd")  # another size
    assert _file_hashes(str(folder)) != listed


def test_the_cache_key_holds_what_shapes_a_reference_item_and_not_what_shapes_only_the_gradient(tiny_sd_dir):
    from focusnfix.backbones import load_backbone
    from focusnfix.config import config_from_dict
    from focusnfix.reference import fingerprint, reference_fields

    from conftest import base_config
    from toy_aspects import BrightnessAspect

    bb, aspects = load_backbone(str(tiny_sd_dir)), [BrightnessAspect("left")]

    def key(*overrides: str) -> str:
        config = config_from_dict(base_config(str(tiny_sd_dir), "unused"), list(overrides))
        return fingerprint(reference_fields(config, bb, aspects, "cpu"))

    base = key()
    for shapes_the_item in ("sampling.guidance_scale=5", "sampling.num_inference_steps=6", "sampling.negative_prompt=x",
                            "mask.dilate_px=2", "mask.threshold_mode=relative", "aspects.0.gate=0.3",
                            "aspects.0.args.kwargs.region=right", "lora.active_steps=2"):
        assert key(shapes_the_item) != base, shapes_the_item
    for gradient_only in ("sampling.k=1", "sampling.grad_mode=full", "sampling.checkpoint_unet=true",
                          "sampling.merge_lora=false", "objective.beta=3", "train.learning_rate=0.1",
                          "aspects.0.weight=2", "lora.rank=8"):
        assert key(gradient_only) == base, gradient_only
    # this aspect has no reward_threshold: "auto" gates nothing, as "off" does (the same items)
    assert key("aspects.0.gate=off") == base
