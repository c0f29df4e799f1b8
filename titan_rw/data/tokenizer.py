"""A TorchTitan tokenizer over any sentencepiece model, and training of such a model.

TorchTitan 0.3.0 only loads HF `tokenizer.json`; this `BaseTokenizer` subclass loads a
sentencepiece `.model` (ours, or a Llama-2 `tokenizer.model` as it is) so the Trainer's
`config.tokenizer.build(tokenizer_path=config.hf_assets_path)` works with either a `.model`
file or a directory that holds `tokenizer.model`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from torchtitan.components.tokenizer import BaseTokenizer

MODEL_FILENAME = "tokenizer.model"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A `.model` file, or a directory holding `tokenizer.model`; FileNotFoundError otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        cand = p / MODEL_FILENAME
        if cand.is_file():
            return cand
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return models[0]
        hf = " (tokenizer.json here is a Hugging Face tokenizer: titan_rw loads sentencepiece only)" if (
            p / "tokenizer.json").is_file() and not models else ""
        raise FileNotFoundError(
            f"{p}: no sentencepiece model here (looked for {MODEL_FILENAME} or a single *.model; "
            f"found {[m.name for m in models] or 'none'}){hf}"
        )
    if p.is_file():
        return p
    raise FileNotFoundError(f"{p}: sentencepiece tokenizer model not found")


FIX = ("use a sentencepiece .model file (a Llama-2 tokenizer.model, or one made by `titan-rw tokenizer "
       "train`), or a folder holding tokenizer.model")


def not_a_model_reason(path: str | os.PathLike) -> str:
    """What a file that sentencepiece cannot load really is, and what to use instead (one line).

    A sentencepiece model is a binary protobuf; the usual wrong files are text: a Hugging Face
    `tokenizer.json`, Llama 3's `tokenizer.model` (tiktoken: base64 piece and rank per line) or the
    `.vocab` file written beside a `.model`."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        return f"cannot be read ({e.strerror or e}); {FIX}"
    if not head:
        return f"is empty (0 bytes), not a sentencepiece model; {FIX}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # binary (a cut multi-byte character at the end is still text)
            return (f"is not a sentencepiece model: its bytes do not parse as one (a truncated copy, or "
                    f"another binary format?); {FIX}")
        text = head[: e.start].decode("utf-8")
    first = text.lstrip().split("\n", 1)[0]
    if text.lstrip().startswith("{"):
        if '"model"' in text or '"added_tokens"' in text or '"vocab"' in text:
            return (f"is a Hugging Face tokenizer.json (JSON text), not a sentencepiece model: titan_rw "
                    f"loads sentencepiece only; {FIX}")
        return f"is a JSON text file, not a sentencepiece model (a binary protobuf); {FIX}"
    if re.fullmatch(r"[A-Za-z0-9+/=]+ \d+", first.strip()):
        return (f"is a tiktoken BPE file (Llama 3's tokenizer.model: base64 piece and rank per line), not a "
                f"sentencepiece model: titan_rw loads sentencepiece only; {FIX}")
    if re.fullmatch(r"\S+\t-?\d+(\.\d+)?", first.strip()):
        return (f"is a sentencepiece .vocab file (piece and score per line), not the model: use the .model "
                f"file written beside it")
    return f"is a text file, not a sentencepiece model (a binary protobuf); {FIX}"


def model_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SentencePieceTokenizer(BaseTokenizer):
    """TorchTitan tokenizer over a sentencepiece model.

    `encode(text, add_bos=True, add_eos=True)` -> ids; `decode(ids)` -> text (BOS/EOS/pad dropped).
    `bos_id`, `eos_id`, `pad_id` (None where the model has none), `get_vocab_size()`.
    `fingerprint` names the model by path and content hash; it is what token shards record in
    their `.ds.metadata` and what the loader checks shards against.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        model_path: str = ""
        """sentencepiece `.model` file or a directory holding `tokenizer.model`. Empty: use the
        `tokenizer_path` the Trainer passes to build() (its `hf_assets_path`)."""

    def __init__(self, config: Config | None = None, *, tokenizer_path: str | None = None):
        super().__init__()
        chosen = (config.model_path if config is not None and config.model_path else None) or tokenizer_path
        if not chosen:
            raise ValueError("SentencePieceTokenizer needs a model: set Config.model_path or pass tokenizer_path")
        self.model_path = os.path.abspath(resolve_model_path(chosen))
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"{self.model_path}: {not_a_model_reason(self.model_path)}") from e
        self.sha256 = model_sha256(self.model_path)

        def _id(v: int) -> int | None:
            return None if v < 0 else int(v)

        self.bos_id = _id(self.sp.bos_id())
        self.eos_id = _id(self.sp.eos_id())
        self.pad_id = _id(self.sp.pad_id())
        self.unk_id = _id(self.sp.unk_id())
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
        self._specials = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    # --- BaseTokenizer -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self.sp.encode(text, out_type=int)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(
        self, texts: list[str], add_bos: bool = True, add_eos: bool = True, num_threads: int = 1
    ) -> list[list[int]]:
        return self.sp.encode(
            list(texts),
            out_type=int,
            add_bos=add_bos and self.bos_id is not None,
            add_eos=add_eos and self.eos_id is not None,
            num_threads=num_threads,
        )

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._specials and i >= 0]
        return self.sp.decode(ids)

    def get_vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    # --- helpers -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        """`<path>#sha256=<hex16>`: what `.ds.metadata` records (datatrove's `tokenizer|bytes` line)."""
        return f"{self.model_path}#sha256={self.sha256[:16]}"

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.sp.id_to_piece(i) else int(i)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab={self.get_vocab_size()})"


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    *,
    vocab_size: int = 2048,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    max_sentence_length: int = 16384,
    num_threads: int = 1,
    seed: int = 0,
) -> Path:
    """Train a sentencepiece model whose decode(encode(text)) == text for any text.

    Identity normalization, no whitespace squeezing, byte fallback (every byte is a piece, so
    no <unk>), Llama-2 ids (unk 0, bos 1, eos 2, no pad). Documents are fed line by line (long
    lines cut at `max_sentence_length` bytes so none is silently dropped by the trainer).
    Writes `<model_prefix>.model` and `.vocab`; returns the `.model` path.
    """
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences() -> Iterator[str]:
        n = 0
        for text in texts:
            for line in text.split("\n"):
                if not line.strip():
                    continue
                while line:
                    piece, line = line[: max_sentence_length // 4], line[max_sentence_length // 4 :]
                    yield piece
                    n += 1
                    if n >= max_sentences:
                        return

    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=max_sentence_length,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    return prefix.with_suffix(".model") if prefix.suffix == "" else Path(str(prefix) + ".model")
