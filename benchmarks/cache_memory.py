"""Host RAM of the reference cache for a large pool: compact, on-disk items with an LRU vs the
previous layout (every item in RAM as fp32 image, latents, heatmap and mask).

Fills a :class:`focusnfix.cache.ReferenceCache` with ``--items`` synthetic 512x512 items
(random image, smooth heatmap, disk-shaped binary mask, 4x64x64 latents; no model is run), then
reads every item back once more in a shuffled order, as an epoch does, and reports JSON: the
process's RSS growth, the cache's in-RAM bytes, the bytes per item on disk, and what the old
layout would hold in RAM for the same pool (computed from its tensor shapes).

    python benchmarks/cache_memory.py --items 4000 --out /tmp/cache_bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import psutil
import torch

from focusnfix.cache import ReferenceCache
from focusnfix.reference import Reference


def synthetic(size: int):
    def compute(prompts: list[str], seeds: list[int]) -> Reference:
        b = len(prompts)
        g = torch.Generator().manual_seed(seeds[0])
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        heat = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2))[None, None].repeat(b, 1, 1, 1)
        return Reference(
            images=torch.rand(b, 3, size, size, generator=g),
            latents=torch.randn(b, 4, size // 8, size // 8, generator=g),
            heatmap=heat,
            mask=(heat > 0.5).float(),
        )

    return compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ram-items", type=int, default=256, help="the LRU size (data.cache_ram_items default)")
    ap.add_argument("--out", default="/tmp/focusnfix_cache_bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    proc = psutil.Process()
    cache = ReferenceCache(synthetic(args.size), {"bench": 1}, out, ram_items=args.ram_items, announce=lambda _: None)
    keys = [(f"prompt {i}", i) for i in range(args.items)]
    rss0 = proc.memory_info().rss

    def one_pass(order: list[tuple[str, int]]) -> tuple[float, int]:
        """Read (or fill) every item in ``order``, in batches: (seconds, peak RSS)."""
        peak, t0 = proc.memory_info().rss, time.perf_counter()
        for i in range(0, len(order), args.batch):
            chunk = order[i : i + args.batch]
            cache.get([p for p, _ in chunk], [s for _, s in chunk])
            peak = max(peak, proc.memory_info().rss)
        return time.perf_counter() - t0, peak

    fill_s, fill_peak = one_pass(keys)
    random.Random(0).shuffle(keys)
    epoch_s, epoch_peak = one_pass(keys)
    peak = max(fill_peak, epoch_peak)
    files = list(out.glob("*.safetensors"))
    disk = sum(f.stat().st_size for f in files)
    s, lat = args.size, (4 * (args.size // 8) ** 2)
    old_item = 4 * (3 * s * s + lat + s * s + s * s)  # fp32 image, latents, heatmap, mask
    result = {
        "items": args.items,
        "size": args.size,
        "ram_items": args.ram_items,
        "rss_peak_growth_mib": round((peak - rss0) / 2**20, 1),
        "rss_peak_growth_fill_mib": round((fill_peak - rss0) / 2**20, 1),
        "rss_end_growth_mib": round((proc.memory_info().rss - rss0) / 2**20, 1),
        "cache_ram_mib": round(cache.ram_bytes() / 2**20, 1),
        "disk_mib_per_item": round(disk / len(files) / 2**20, 3),
        "disk_gib_total": round(disk / 2**30, 2),
        "old_layout_ram_gib": round(args.items * old_item / 2**30, 2),
        "old_layout_mib_per_item": round(old_item / 2**20, 2),
        "fill_s": round(fill_s, 1),
        "epoch_read_s": round(epoch_s, 1),
        "epoch_read_ms_per_item": round(1000 * epoch_s / args.items, 2),
        "stats": cache.stats,
    }
    print(json.dumps(result, indent=2))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
