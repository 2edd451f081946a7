"""RAHF-style model: TFRecord I/O without TensorFlow, metrics, training, evaluation, aspect, CLI."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from focusnfix.aspects.registry import build_aspect
from focusnfix.cli import main
from focusnfix.errors import InputError
from focusnfix.rahf import evaluate as M
from focusnfix.rahf.data import RichHFDataset, RichHFRecord, read_richhf, write_richhf
from focusnfix.rahf.model import HEATMAPS, SCORES, RAHFModel, tiny_config
from focusnfix.rahf.tfrecord import crc32c, encode_example, parse_example, read_tfrecord, write_tfrecord
from focusnfix.rahf.train import RAHFTrainConfig, train_rahf

PROMPTS = ["a red circle on the left", "a blue square", "a green circle", "a big red square"]


def _record(i: int, rng: np.random.Generator) -> RichHFRecord:
    art = np.zeros((64, 64), np.uint8)
    if i % 2 == 0:
        art[8 * i % 48 : 8 * i % 48 + 16, 10:30] = 200 + i
    mis = (rng.random((64, 64)) * 40).astype(np.uint8)
    return RichHFRecord(
        filename=f"img_{i:03d}.png",
        scores={"plausibility": 0.1 * i, "alignment": 0.9 - 0.1 * i, "aesthetics": 0.5, "overall": 0.25 + 0.05 * i},
        artifact_map=art,
        misalignment_map=mis,
        token_labels=[1, 0, 1][: 1 + i % 3],
    )


@pytest.fixture(scope="module")
def richhf(tmp_path_factory) -> tuple[Path, Path, list[RichHFRecord]]:
    """Two TFRecord files (3 + 3 records) and a directory of matching images with captions."""
    tmp = tmp_path_factory.mktemp("richhf")
    rng = np.random.default_rng(0)
    records = [_record(i, rng) for i in range(6)]
    write_richhf(tmp / "train-00000-of-00002.tfrecord", records[:3])
    write_richhf(tmp / "train-00001-of-00002.tfrecord", records[3:])
    images = tmp / "pickapic"
    images.mkdir()
    for i, rec in enumerate(records):
        color = [(200, 40, 40), (40, 40, 200), (40, 200, 40)][i % 3]
        arr = np.zeros((48, 48, 3), np.uint8)
        arr[:] = color
        arr[10:20, 10:30] = 255
        Image.fromarray(arr).save(images / rec.filename)
    (tmp / "captions.json").write_text(json.dumps({r.filename: PROMPTS[i % 4] for i, r in enumerate(records)}))
    return tmp, images, records


# ---- TFRecord and Example codec -------------------------------------------------------------------
def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0


def test_tfrecord_framing_round_trip_and_corruption(tmp_path):
    payloads = [b"", b"hello", bytes(range(256)) * 10]
    path = write_tfrecord(tmp_path / "x.tfrecord", payloads)
    assert list(read_tfrecord(path)) == payloads
    raw = bytearray(path.read_bytes())
    # first record header: 8-byte length 0 + 4-byte masked crc of it
    assert struct.unpack("<Q", raw[:8])[0] == 0
    raw[12 + 4 + 12 + 2] ^= 0xFF  # flip a byte of "hello"
    (tmp_path / "bad.tfrecord").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="bad data CRC"):
        list(read_tfrecord(tmp_path / "bad.tfrecord"))
    (tmp_path / "short.tfrecord").write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InputError, match="truncated"):
        list(read_tfrecord(tmp_path / "short.tfrecord"))


def test_example_codec_round_trip():
    feats = {"filename": [b"a.png"], "score": [0.25, -1.5], "ids": [3, -2, 1 << 40], "empty": [b""]}
    assert parse_example(encode_example(feats)) == feats


def test_example_parser_reads_unpacked_lists():
    """TensorFlow writes FloatList packed; proto2 writers may not. Hand-made bytes, unpacked."""
    def ld(num, payload):
        return bytes([num << 3 | 2, len(payload)]) + payload

    floats = b"".join(bytes([1 << 3 | 5]) + struct.pack("<f", v) for v in (1.0, 2.0))
    ints = bytes([1 << 3 | 0, 7, 1 << 3 | 0, 5])
    entry_f = ld(1, b"f") + ld(2, ld(2, floats))
    entry_i = ld(1, b"i") + ld(2, ld(3, ints))
    ex = ld(1, ld(1, entry_f) + ld(1, entry_i))
    assert parse_example(ex) == {"f": [1.0, 2.0], "i": [7, 5]}


def test_richhf_records_read_back_exactly(richhf):
    tmp, _, records = richhf
    back = list(read_richhf(str(tmp / "train-*.tfrecord")))
    assert len(back) == 6
    for a, b in zip(records, back, strict=True):
        assert a.filename == b.filename and a.token_labels == b.token_labels
        assert np.array_equal(a.artifact_map, b.artifact_map) and np.array_equal(a.misalignment_map, b.misalignment_map)
        for k in a.scores:
            assert b.scores[k] == pytest.approx(a.scores[k], abs=1e-7)  # float32 storage


def test_dataset_joins_images_and_captions(richhf):
    tmp, images, records = richhf
    ds = RichHFDataset(str(tmp / "*.tfrecord"), images, image_size=32, map_size=32, captions=tmp / "captions.json")
    assert len(ds) == 6
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["maps"].shape == (2, 32, 32) and item["maps"].max() <= 1
    assert item["prompt"] == PROMPTS[0]
    torch.testing.assert_close(item["scores"], torch.tensor([0.0, 0.9, 0.5, 0.25]))
    with pytest.raises(InputError, match="no usable RichHF record"), pytest.warns(UserWarning, match="without a prompt"):
        RichHFDataset(str(tmp / "*.tfrecord"), images, 32, 32)  # no captions anywhere
    with pytest.raises(InputError, match="matches no file"):
        RichHFDataset(str(tmp / "nothing*.tfrecord"), images, 32, 32)


# ---- metrics --------------------------------------------------------------------------------------
def _blob() -> np.ndarray:
    y, x = np.mgrid[0:16, 0:16]
    return np.exp(-((x - 5) ** 2 + (y - 9) ** 2) / 8.0)


def test_metrics_on_known_inputs():
    g = _blob()
    assert M.mse(g, g) == 0 and M.mse(np.zeros((2, 2)), np.ones((2, 2))) == 1
    assert M.cc(g, g) == pytest.approx(1.0) and M.cc(-g, g) == pytest.approx(-1.0)
    assert M.kld(g, g) == pytest.approx(0.0, abs=1e-9) and M.kld(np.ones_like(g), g) > 0
    assert M.sim(g, g) == pytest.approx(1.0) and M.sim(np.ones_like(g), g) < 1
    fix = M.fixations(g)
    assert M.auc_judd(fix.astype(float), g) == pytest.approx(1.0)  # a perfect map
    assert M.auc_judd(1.0 - g, g) < 0.25  # an inverted map (AUC-Judd is not a full ROC: > 0)
    assert M.auc_judd(np.random.default_rng(0).random(g.shape), g) == pytest.approx(0.5, abs=0.15)
    p = fix.astype(float)
    expected = ((p - p.mean()) / p.std())[fix].mean()
    assert M.nss(p, g) == pytest.approx(expected) and M.nss(p, g) > 0
    assert math.isnan(M.cc(np.zeros_like(g), g)) and math.isnan(M.auc_judd(g, np.zeros_like(g)))
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert M.plcc(a, 2 * a + 1) == pytest.approx(1.0)
    assert M.srcc(a, a**3) == pytest.approx(1.0) and M.srcc(a, -a) == pytest.approx(-1.0)


# ---- model, training, evaluation, aspect, CLI ---------------------------------------------------
def test_model_shapes_ranges_and_gradients():
    torch.manual_seed(0)
    model = RAHFModel.from_config(tiny_config())
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    out = model(x, PROMPTS[:2])
    for k in HEATMAPS:
        assert out[k].shape == (2, 1, 32, 32) and 0 <= out[k].min() and out[k].max() <= 1
    for k in SCORES:
        assert out[k].shape == (2,) and ((0 <= out[k]) & (out[k] <= 1)).all()
    out["plausibility"].sum().backward()
    assert x.grad.abs().sum() > 0
    # the prompt matters (text tokens are fused)
    with torch.no_grad():
        a = model(x[:1], ["a red circle"])["alignment"]
        b = model(x[:1], ["a completely different prompt"])["alignment"]
    assert not torch.equal(a, b)


def test_transformers_encoders_can_replace_the_builtin_ones(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, ViTConfig, ViTModel

    from tiny import WORDS, write_tokenizer

    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(tmp_path / "txt")
    write_tokenizer(tmp_path / "tok").save_pretrained(tmp_path / "txt")
    cfg = tiny_config(vision_model=str(tmp_path / "vit"), text_model=str(tmp_path / "txt"), text_max_length=12)
    model = RAHFModel.from_config(cfg).eval()
    x = torch.rand(1, 3, 32, 32)
    out = model(x, ["a red circle"])
    assert out["implausibility"].shape == (1, 1, 32, 32)
    model.save_pretrained(tmp_path / "saved")
    again = RAHFModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again(x, ["a red circle"])["overall"], out["overall"])


def test_training_lowers_the_loss_and_eval_reports_every_metric(richhf, tmp_path, capsys):
    tmp, images, _ = richhf
    ds = RichHFDataset(str(tmp / "*.tfrecord"), images, 32, 32, captions=tmp / "captions.json")
    cfg = RAHFTrainConfig(model=tiny_config().__dict__, steps=30, batch_size=3, learning_rate=3e-3, log_every=0,
                          device="cpu")
    model, log = train_rahf(cfg, ds, tmp_path / "rahf")
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "rahf" / "model.safetensors").is_file()
    assert len((tmp_path / "rahf" / "train_log.jsonl").read_text().splitlines()) == 30

    # aspect type 'rahf' loads the trained model by path
    aspect = build_aspect("rahf", {"model": str(tmp_path / "rahf"), "score": "plausibility",
                                   "heatmap": "implausibility"})
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    r = aspect.reward(x, PROMPTS[:2])
    assert r.shape == (2,)
    r.sum().backward()
    assert x.grad.abs().sum() > 0
    hm = aspect.heatmap(x.detach(), PROMPTS[:2])
    assert hm.shape == (2, 1, 32, 32) and hm.min() >= 0 and hm.max() <= 1
    with pytest.raises(InputError, match="score must be one of"):
        build_aspect("rahf", {"model": str(tmp_path / "rahf"), "score": "beauty"})

    # CLI eval prints every metric
    code = main(["rahf", "eval", "--model", str(tmp_path / "rahf"), "--tfrecords", str(tmp / "*.tfrecord"),
                 "--images", str(images), "--captions", str(tmp / "captions.json"), "--json", str(tmp_path / "m.json")])
    assert code == 0
    text = capsys.readouterr().out
    for name in ("mse", "cc", "kld", "sim", "nss", "auc_judd", "plcc", "srcc", *HEATMAPS, *SCORES):
        assert name in text
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n_images"] == 6
    assert result["heatmaps"]["implausibility"]["n_nonempty"] == 3
    assert result["heatmaps"]["misalignment"]["auc_judd"] is not None
    assert result["scores"]["plausibility"]["plcc"] is not None


def test_cli_train_and_bad_input(richhf, tmp_path, capsys):
    tmp, images, _ = richhf
    (tmp_path / "cfg.yaml").write_text(
        "model: {image_size: 32, patch_size: 8, width: 32, vision_depth: 1, text_depth: 1, fusion_depth: 1,\n"
        "        heads: 2, text_max_length: 24, decoder_channels: [8, 8, 8], upsample_stages: 3, score_hidden: 8}\n"
        "batch_size: 3\nlog_every: 1\ndevice: cpu\n"
    )
    code = main(["rahf", "train", "--tfrecords", str(tmp / "*.tfrecord"), "--images", str(images), "--captions",
                 str(tmp / "captions.json"), "--out", str(tmp_path / "m"), "--config", str(tmp_path / "cfg.yaml"),
                 "--steps", "2"])
    assert code == 0 and (tmp_path / "m" / "rahf_config.json").is_file()
    assert "step 2" in capsys.readouterr().out
    assert main(["rahf", "eval", "--model", str(tmp_path / "missing"), "--tfrecords", str(tmp / "*.tfrecord"),
                 "--images", str(images)]) == 2
    (tmp_path / "bad.yaml").write_text("model: {colour: red}\n")
    assert main(["rahf", "train", "--tfrecords", str(tmp / "*.tfrecord"), "--images", str(images),
                 "--out", str(tmp_path / "x"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown fields ['colour']" in capsys.readouterr().err
