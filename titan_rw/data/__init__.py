"""Data for titan_rw: the shipped corpus and tokenizer, datatrove tokenization, the token loader.

    DEFAULT_TOKENIZER   path of the shipped sentencepiece model (vocab 2048, byte fallback)
    EMBEDDED_CORPUS     directory of the shipped FineWeb-schema parquet (train/, validation/)
    tokenizer.SentencePieceTokenizer   TorchTitan BaseTokenizer over any sentencepiece .model
    loader.TokenDataLoader             world-size-free, checkpointable token stream
    tokenize.run_tokenize              parquet -> datatrove .ds shards
    cli.tokenizer_train_main / cli.tokenize_main   the `titan-rw` subcommands

Submodules import torchtitan / datatrove; this file does not.
"""

import os as _os

_ASSETS = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "assets")
DEFAULT_TOKENIZER = _os.path.join(_ASSETS, "tokenizer", "tokenizer.model")
EMBEDDED_CORPUS = _os.path.join(_ASSETS, "corpus")
EMBEDDED_TRAIN = _os.path.join(EMBEDDED_CORPUS, "train")
EMBEDDED_VALIDATION = _os.path.join(EMBEDDED_CORPUS, "validation")
EMBEDDED_DOMAINS = ("python_docs", "linux_docs", "wikipedia", "fortunes")

__all__ = [
    "DEFAULT_TOKENIZER",
    "EMBEDDED_CORPUS",
    "EMBEDDED_TRAIN",
    "EMBEDDED_VALIDATION",
    "EMBEDDED_DOMAINS",
]
