"""``focusnfix rahf train | eval``: train and evaluate a RAHF-style model on RichHF-18K.

    focusnfix rahf train --tfrecords 'richhf/train*.tfrecord' --images pickapic/ --out runs/rahf [--config c.yaml]
    focusnfix rahf eval  --model runs/rahf --tfrecords 'richhf/test*.tfrecord' --images pickapic/
"""

from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tfrecords", required=True, help="glob of RichHF-18K TFRecord files (quote it)")
    p.add_argument("--images", required=True, help="directory of Pick-a-Pic images, found by the records' filename")
    p.add_argument("--captions", default=None,
                   help="prompts: JSON {filename: caption} or JSON lines with filename and caption "
                        "(else the record's prompt field or <image>.txt)")
    p.add_argument("--no-verify-crc", action="store_true", help="skip TFRecord CRC checks (faster)")


def add_subcommands(subparsers) -> None:
    rahf = subparsers.add_parser("rahf", help="train / evaluate a RAHF-style heatmap and score model")
    sub = rahf.add_subparsers(dest="rahf_command", required=True)

    t = sub.add_parser("train", help="train on RichHF-18K TFRecords + Pick-a-Pic images")
    _common(t)
    t.add_argument("--out", required=True, help="output directory (model + train_log.jsonl)")
    t.add_argument("--config", default=None, help="YAML/JSON training config (see focusnfix.rahf.train.RAHFTrainConfig)")
    t.add_argument("--steps", type=int, default=None, help="override the config's steps")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="heatmap (MSE, CC, KLD, SIM, NSS, AUC-Judd) and score (PLCC, SRCC) metrics")
    _common(e)
    e.add_argument("--model", required=True, help="directory written by `focusnfix rahf train`")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from focusnfix.rahf.data import RichHFDataset
    from focusnfix.rahf.model import RAHFConfig
    from focusnfix.rahf.train import RAHFTrainConfig, train_rahf

    config = RAHFTrainConfig.load(args.config)
    if args.steps is not None:
        config.steps = args.steps
    model_cfg = RAHFConfig.from_dict(config.model)
    data = RichHFDataset(args.tfrecords, args.images, model_cfg.image_size, model_cfg.heatmap_size,
                         args.captions, verify_crc=not args.no_verify_crc)
    print(f"rahf train: {len(data)} examples, {config.steps} steps, batch {config.batch_size}")
    _, records = train_rahf(config, data, args.out)
    print(f"rahf model written to {args.out} (final loss {records[-1]['loss']:.5f})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from focusnfix.rahf.data import RichHFDataset, collate
    from focusnfix.rahf.evaluate import evaluate, format_metrics, write_metrics
    from focusnfix.rahf.model import RAHFModel

    model = RAHFModel.from_pretrained(args.model)
    cfg = model.config
    # ground-truth maps stay at the model's heatmap size; predictions are compared there
    data = RichHFDataset(args.tfrecords, args.images, cfg.image_size, cfg.heatmap_size, args.captions,
                         verify_crc=not args.no_verify_crc)
    result = evaluate(model, DataLoader(data, batch_size=args.batch_size, collate_fn=collate))
    print(format_metrics(result))
    if args.json:
        write_metrics(result, args.json)
    else:
        print(json.dumps(result))
    return 0
