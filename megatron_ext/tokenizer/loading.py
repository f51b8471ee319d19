"""Load a trained tokenizer for data preprocessing and training.

Two kinds, named as in Megatron-LM's ``--tokenizer-type``:

- ``SentencePieceTokenizer``: a ``.model`` file, or a directory holding ``tokenizer.model``.
- ``HuggingFaceTokenizer``: a ``tokenizer.json`` file, or a directory holding one (read with the
  ``tokenizers`` library); a directory without ``tokenizer.json`` goes through
  ``transformers.AutoTokenizer`` with ``local_files_only=True``. Nothing is downloaded.

Both give the same small interface: ``tokenize(text) -> list[int]`` (content ids only, never a
BOS or EOS: ``preprocess`` appends the end-of-document id itself), ``tokenize_batch(texts)``,
``tokenize_flat(texts)`` (numpy: all ids back to back, and each text's count),
``detokenize(ids) -> str``, ``vocab_size``, ``eod``, ``bos`` and ``pad`` (``None`` when the
vocabulary has none).

    tok = load_tokenizer("SentencePieceTokenizer", "out/tokenizer/tokenizer.model")
    ids = tok.tokenize("Bonjour le monde")
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from megatron_ext.tokenizer.word_cache import WordCache, flatten_ids

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")

# Names tried, in order, when a Hugging Face tokenizer's config does not name its EOS token.
_EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class Tokenizer(Protocol):
    """What training and preprocessing need from a tokenizer."""

    vocab_size: int
    eod: int
    bos: int | None
    pad: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]: ...

    def tokenize_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]: ...

    def detokenize(self, ids: Any) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model; ``eod`` is its EOS id (``eos_id`` set at training time)."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece

        path = _resolve(model_path, "tokenizer.model", "SentencePieceTokenizer")
        self.model_path = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size: int = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(
                f"SentencePiece model {path} has no EOS id (trained with eos_id=-1); "
                "retrain it with an EOS token, it is used as the end-of-document id"
            )
        self.eod: int = eos
        self.bos: int | None = _non_negative(self._sp.bos_id())
        self.pad: int | None = _non_negative(self._sp.pad_id())
        self.unk: int | None = _non_negative(self._sp.unk_id())

        # Word cache (see tokenize_flat), for models where it gives the same ids.
        self._word_cache: WordCache | None = None
        if _splits_at_spaces(self._sp):
            self._word_cache = WordCache(
                self._encode_many, _MAX_CACHED_WORDS, _MAX_CACHED_WORD_CHARS
            )

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """``tokenize`` of each text, computed as ``tokenize_flat``."""
        return _split_flat(*self.tokenize_flat(texts))

    def tokenize_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all ``texts`` back to back (same as ``tokenize`` on each) and their counts.

        For models whose pieces never hold a space except as their first character and that do
        not normalise (what ``train_tokenizer`` writes), each distinct word is encoded only once
        (``word_cache.WordCache``); other models encode every text.
        """
        if self._word_cache is None:
            return flatten_ids(self._encode_many(texts))
        return self._word_cache.encode(texts)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        # One C++ call per batch; one thread because preprocessing runs a process per core.
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def detokenize(self, ids: Any) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def fingerprint(self) -> dict:
        """What the tokenizer is, whatever file it was read from: the model it loaded."""
        return _fingerprint(type(self).__name__, self._sp.serialized_model_proto())


class HuggingFaceTokenizer:
    """A Hugging Face fast tokenizer, used without adding special tokens around the text."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.exists():
            raise ValueError(f"HuggingFaceTokenizer: {path} does not exist")
        json_path = path if path.is_file() else path / "tokenizer.json"
        config = _read_hf_config(path if path.is_dir() else path.parent)
        if json_path.is_file():
            from tokenizers import Tokenizer as BackendTokenizer

            self._backend = BackendTokenizer.from_file(str(json_path))
        elif path.is_dir():
            from transformers import AutoTokenizer

            auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            backend = getattr(auto, "backend_tokenizer", None)
            if backend is None:
                raise ValueError(f"HuggingFaceTokenizer: {path} holds no fast tokenizer")
            self._backend = backend
            config = {**config, "eos_token": config.get("eos_token") or auto.eos_token}
        else:
            raise ValueError(
                f"HuggingFaceTokenizer: expected tokenizer.json or a directory: {path}"
            )
        # Literal "<s>" in a document is text, not a control token: same ids as SentencePiece.
        self._backend.encode_special_tokens = True
        self.model_path = str(path)
        self.vocab_size: int = self._backend.get_vocab_size(with_added_tokens=True)
        eod = self._token_id(config.get("eos_token"))
        if eod is None:
            eod = next((i for n in _EOD_CANDIDATES if (i := self._token_id(n)) is not None), None)
        if eod is None:
            raise ValueError(
                f"HuggingFaceTokenizer: {path} names no EOS token (eos_token in "
                f"tokenizer_config.json) and has none of {list(_EOD_CANDIDATES)}"
            )
        self.eod: int = eod
        self.bos: int | None = self._token_id(config.get("bos_token"))
        self.pad: int | None = self._token_id(config.get("pad_token"))

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        return self._backend.token_to_id(token)

    def tokenize(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def tokenize_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all ``texts`` back to back (int32) and each text's id count (int64)."""
        return flatten_ids(self.tokenize_batch(texts))

    def detokenize(self, ids: Any) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> dict:
        """What the tokenizer is, whatever files it was read from: the tokenizer it loaded and
        the special ids its config chose."""
        specials = json.dumps([self.eod, self.bos, self.pad]).encode()
        return _fingerprint(type(self).__name__, self._backend.to_str().encode() + specials)


def _fingerprint(kind: str, content: bytes) -> dict:
    return {"version": 1, "type": kind, "sha256": hashlib.sha256(content).hexdigest()}


def load_tokenizer(
    tokenizer_type: str, model_path: str
) -> SentencePieceTokenizer | HuggingFaceTokenizer:
    """The tokenizer ``tokenizer_type`` (one of ``TOKENIZER_TYPES``) stored at ``model_path``."""
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(model_path)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(model_path)
    raise ValueError(
        f"tokenizer_type must be one of {list(TOKENIZER_TYPES)}, got {tokenizer_type!r}"
    )


def _resolve(model_path: str | os.PathLike, file_name: str, kind: str) -> Path:
    path = Path(model_path)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise ValueError(f"{kind}: no model file at {path}")
    return path


def _read_hf_config(directory: Path) -> dict:
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = directory / name
        if file.is_file():
            try:
                loaded = json.loads(file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"HuggingFaceTokenizer: {file} is not valid JSON: {exc}") from exc
            if isinstance(loaded, dict):
                config.update({k: v for k, v in loaded.items() if v is not None})
    return config


_MAX_CACHED_WORDS = 150_000  # per dict; both full took about 47 MB (docs/tokenizer_and_data.md)
_MAX_CACHED_WORD_CHARS = 48
_SPACE = "\u2581"


def _splits_at_spaces(sp) -> bool:
    """Whether encoding word by word gives the same ids as encoding the whole text."""
    probe = "a  b\u00bd\uff21 \u3000x "
    if sp.decode(sp.encode(probe)) != probe:  # the model normalises text
        return False
    first = sp.encode("a", out_type=str)
    if first and first[0].startswith(_SPACE):  # dummy prefix: a space is added in front
        return False
    pieces = sp.id_to_piece(list(range(sp.get_piece_size())))
    inner_space = [i for i, piece in enumerate(pieces) if _SPACE in piece[1:]]
    return all(sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) for i in inner_space)


def _split_flat(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    if not lengths.size:
        return []
    return [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])]


def _non_negative(value: int) -> int | None:
    return value if value >= 0 else None
