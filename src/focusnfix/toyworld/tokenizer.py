"""An offline word-level CLIP BPE tokenizer for the toy captions.

The vocabulary holds every single character (with and without the ``</w>`` end-of-word suffix) and
every caption word as one token; the merges are built so CLIP's BPE turns each caption word into
exactly one token (unknown words fall back to characters).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word (lower-case, no spaces) with the given merge ranks."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts[:-1], parts[1:], strict=True))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        first, second = parts[i], parts[i + 1]
        merged: list[str] = []
        j = 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges that tokenize each of ``words`` to a single token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    multi = [w for w in words if len(w) > 1]
    changed = True
    while changed:
        changed = False
        for w in multi:
            parts = _bpe(w, ranks)
            if len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
    tokens: list[str] = []
    for ch in string.ascii_lowercase + string.digits + ",.'-":
        tokens += [ch, ch + "</w>"]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    for w in words:
        t = w + "</w>"
        if t not in tokens:
            tokens.append(t)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(out_dir: str | Path, words: list[str]) -> int:
    """Write ``vocab.json``, ``merges.txt`` and the transformers tokenizer files; return vocab size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"),
                        model_max_length=MAX_LENGTH)
    tok.model_max_length = MAX_LENGTH
    tok.save_pretrained(out)
    return len(vocab)


def load_tokenizer(path: str | Path):
    return CLIPTokenizer.from_pretrained(str(path))
