"""Loaders of the local tasks' JSONL data (next to this file): no network, no HF cache."""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    import datasets

    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs):
    return _load("mc.jsonl")


def load_ppl(**kwargs):
    return _load("ppl.jsonl")
