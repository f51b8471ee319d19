"""Write a SentencePiece BPE model as Hugging Face fast-tokenizer files with the same ids.

The files written into ``output_dir``:

- ``tokenizer.json``: a ``tokenizers`` BPE model with byte fallback. Its vocabulary is the
  SentencePiece piece list in id order; its merges are every split of a piece into two pieces of
  the vocabulary, ranked by the merged piece's id (SentencePiece BPE merges the pair whose result
  scores highest, and scores fall with the id). Spaces become ``▁`` and words are split before
  each ``▁``, as SentencePiece does with ``split_by_whitespace``.
- ``tokenizer_config.json`` and ``special_tokens_map.json``: the special tokens, no BOS/EOS added
  around the text, no clean-up of spaces when decoding, and ``split_special_tokens`` so that a
  literal ``<s>`` in a document is encoded as text, as SentencePiece does.

``transformers.AutoTokenizer.from_pretrained(output_dir)`` and ``PreTrainedTokenizerFast`` load
them offline. Only models trained with identity normalisation, no dummy prefix and kept extra
whitespace (what ``train_tokenizer`` writes) are exported: other settings would need
SentencePiece's normaliser, which ``tokenizers`` does not reproduce exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SPACE = "\u2581"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_hf_tokenizer(
    model_path: str | os.PathLike, output_dir: str | os.PathLike, model_max_length: int = 8192
) -> list[str]:
    """Write the Hugging Face files for the SentencePiece model; returns their paths."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(model_path))
    _check_exportable(sp, model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = [
        i
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    ]
    merges = []
    for piece_id in mergeable:
        piece = sp.id_to_piece(piece_id)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()

    unk = sp.id_to_piece(sp.unk_id())
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in merges],
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="never", split=True
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(
        [AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special]
    )

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    names = {
        "bos_token": _piece_or_none(sp, sp.bos_id()),
        "eos_token": _piece_or_none(sp, sp.eos_id()),
        "unk_token": unk,
        "pad_token": _piece_or_none(sp, sp.pad_id()),
    }
    names = {k: v for k, v in names.items() if v is not None}
    reserved = [sp.id_to_piece(i) for i in special if sp.id_to_piece(i) not in names.values()]
    special_map = {**names, "additional_special_tokens": reserved}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": model_max_length,
    }
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "tokenizer_config.json", config)
    return [str(out / name) for name in HF_FILES]


def _check_exportable(sp, model_path: str | os.PathLike) -> None:
    # Identity normalisation without a dummy prefix is what makes the plain Replace normaliser
    # above equal to SentencePiece's: probe it instead of parsing the model's protobuf.
    probe = "a  b\u00bd\uff21 "
    first = sp.encode("A", out_type=str)
    if sp.decode(sp.encode(probe)) != probe or (first and first[0].startswith(SPACE)):
        raise ValueError(
            f"{model_path}: only SentencePiece models with identity normalisation, no dummy "
            "prefix and kept whitespace can be exported (train them with train_tokenizer)"
        )


def _piece_or_none(sp, token_id: int) -> str | None:
    return sp.id_to_piece(token_id) if token_id >= 0 else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
