"""What preprocessing recorded about a dataset, checked against the training config.

``tools/preprocess_data.py`` writes ``<output_prefix>_preprocess_stats.json`` next to its
datasets: the tokenizer's vocabulary size and end-of-document id, whether an end-of-document
token ends every document (``append_eod``), and the largest token id written. Before training,
``dataset_problems`` compares that with the config, so that a mismatch stops the run with its
fix instead of training on it:

- ``data.append_eod`` on a dataset that already ends every document with EOD (two in a row);
- ``data.eod_token_id`` other than the id the dataset was written with (the wrong token masked
  or inserted);
- token ids at or above ``model.vocab_size`` (rows of the vocabulary padding trained, and lost
  on export; ids past the padding fail on a GPU).

Datasets without a stats file (written by other tools, or before these fields were recorded)
are not checked, and a dataset whose documents have no end-of-document token at all is only
logged: its documents run into each other.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megatron_ext.config.errors import Problem
from megatron_ext.data.config import DataConfig

logger = logging.getLogger(__name__)

STATS_SUFFIX = "_preprocess_stats.json"


def preprocess_stats(prefix: str, _directories: dict | None = None) -> dict | None:
    """The stats file beside ``prefix`` that lists it among its outputs, or None.

    A stats file and its datasets are written into one directory, so outputs are matched by
    file name: the match survives copying the directory elsewhere, whatever paths the stats
    recorded. ``_directories`` caches each directory's stats files across calls.
    """
    directory = Path(prefix).parent
    cache = {} if _directories is None else _directories
    if directory not in cache:
        cache[directory] = _stats_files(directory)
    name = Path(prefix).name
    for stats in cache[directory]:
        outputs = stats.get("outputs")
        if isinstance(outputs, dict) and any(
            isinstance(p, str) and Path(p).name == name for p in outputs.values()
        ):
            return stats
    return None


def _stats_files(directory: Path) -> list[dict]:
    found = []
    for path in sorted(directory.glob("*" + STATS_SUFFIX)):
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("%s is not readable JSON: not used to check its datasets", path)
            continue
        if isinstance(stats, dict):
            found.append(stats)
    return found


def dataset_problems(data: DataConfig, vocab_size: int) -> list[Problem]:
    """Mismatches between ``data.data_path``'s recorded stats and the config."""
    problems = []
    directories: dict = {}
    for prefix in data.data_path:
        stats = preprocess_stats(prefix, directories)
        if stats is None:
            continue
        has_eod = bool(stats.get("append_eod"))
        if has_eod and data.append_eod:
            problems.append(
                Problem(
                    "data.append_eod",
                    True,
                    f"{prefix} was preprocessed with --append-eod: every document already ends "
                    "with the end-of-document token, and a second would follow it",
                    "set data.append_eod=false",
                )
            )
        # Every rank validates the same config: the first one says it.
        if not has_eod and not data.append_eod and os.environ.get("RANK", "0") == "0":
            logger.warning(
                "%s has no end-of-document tokens and data.append_eod is off: its documents run "
                "into each other",
                prefix,
            )
        eod = stats.get("eod_id")
        if eod is not None and data.eod_token_id is not None and data.eod_token_id != eod:
            problems.append(
                Problem(
                    "data.eod_token_id",
                    data.eod_token_id,
                    f"{prefix} was written by a tokenizer whose end-of-document id is {eod}",
                    f"set data.eod_token_id={eod}",
                )
            )
        largest = stats.get("max_token_id")
        if isinstance(largest, int) and largest >= vocab_size:
            problems.append(
                Problem(
                    "model.vocab_size",
                    vocab_size,
                    f"{prefix} holds token ids up to {largest}",
                    f"set model.vocab_size to the tokenizer's vocabulary size "
                    f"({stats.get('tokenizer_vocab_size', largest + 1)})",
                )
            )
    return problems


def merged_stats(prefixes: list[str]) -> dict | None:
    """The stats of a dataset merged from ``prefixes``: None when some input has none; a
    ValueError when the inputs were written with other tokenizers or EOD settings (their ids
    would mean different things in one dataset)."""
    directories: dict = {}
    found = [preprocess_stats(prefix, directories) for prefix in prefixes]
    if any(stats is None for stats in found):
        return None
    # Compared where every input recorded them (stats of earlier versions lack some).
    keys = [
        key
        for key in ("tokenizer_type", "tokenizer_vocab_size", "eod_id", "append_eod", "dtype")
        if all(key in stats for stats in found)
    ]
    kinds = {tuple(stats[key] for key in keys) for stats in found}
    if len(kinds) > 1:
        described = "; ".join(
            f"{prefix}: " + ", ".join(f"{k}={stats[k]}" for k in keys)
            for prefix, stats in zip(prefixes, found)
        )
        raise ValueError(f"the datasets were preprocessed differently: {described}")
    largest = [stats.get("max_token_id") for stats in found]
    return {
        "inputs": list(prefixes),
        **{key: found[0][key] for key in keys},
        "num_docs": sum(stats.get("num_docs", 0) for stats in found),
        "num_tokens": sum(stats.get("num_tokens", 0) for stats in found),
        # Unknown when an input did not record it: never a number that is not true.
        "max_token_id": None if None in largest else max(largest),
    }


def write_stats(output_prefix: str, stats: dict) -> Path:
    """``stats`` as ``<output_prefix>_preprocess_stats.json``, written atomically."""
    path = Path(output_prefix + STATS_SUFFIX)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
