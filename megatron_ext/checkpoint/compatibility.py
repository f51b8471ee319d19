"""Refuse resumes whose config would silently change the run.

The checkpoint stores the resolved config it was trained with. On resume every leaf of the two
configs is compared; a difference is allowed only when it is in a section or field that cannot
change what is trained (``ALWAYS_ALLOWED``) or the user listed it in ``checkpoint.allow_changes``
(a field such as ``schedule.train_steps`` or a whole section such as ``data``). Allowed changes are
logged; anything else (model shape, precision, data blend and paths, schedule length, batch or
learning rate, seed, ...) raises one error naming every changed field.

A checkpoint written by an earlier megatron_ext lacks the fields added since. Such a field at its
default is accepted (and logged): a new field's default is what the code did before the field
existed. Set to anything else, it is a change like any other.

The datasets are compared by content as well as by path when the checkpoint recorded their
fingerprints (``data.fingerprint``): other paths to the same content (the files were copied
elsewhere) are accepted and logged, and a dataset whose content changed under its path is refused
as a change of ``data.data_path``. The tokenizer likewise: when the checkpoint recorded its
fingerprint (``Tokenizer.fingerprint``), the same tokenizer read from another path is accepted
and logged, and another tokenizer under the same path is logged as a warning (the tokens are in
the datasets; the tokenizer is checked against them and exported with the model).
"""

from __future__ import annotations

import logging
from typing import Any

from megatron_ext.config.errors import ConfigError, Problem
from megatron_ext.data.fingerprint import describe

logger = logging.getLogger(__name__)

ALWAYS_ALLOWED = (
    "parallel",
    "checkpoint",
    "monitoring",
    "run_dir",
    "training.exit_after_steps",
    "training.eval_interval",
    "training.eval_iters",
    "data.num_workers",
    "data.prefetch_batches",
    "data.pin_memory",
    "data.index_cache_dir",
    "model.compile_layers",
    "model.make_vocab_size_divisible_by",
    "model.fused_cross_entropy",
    "model.wgrad_fusion",
    "optimizer.fused_adamw",
    "optimizer.fused_param_copy",
)
"""What a resume may change freely: the layout is resharded on load; the rest decides where
outputs go, what is logged or evaluated, how long this invocation runs, how batches are read ahead
or where the data index is kept (the same arrays), and which kernels compute the same step (the
fast path's switches, the fused AdamW update and its copy into the model's weights agree with the
plain path to float rounding), never which tokens are trained on or how. The vocabulary padding
multiple is free because ``check_padded_vocab`` compares what it decides, the padded size."""

_MISSING = "<absent>"
DATA_PATH = "data.data_path"
TOKENIZER_PATH = "tokenizer.tokenizer_model"


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay leaves)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, path + "."))
        else:
            flat[path] = value
    return flat


def diff_configs(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Every dotted field whose value differs: ``{field: (saved, current)}``."""
    old, new = flatten_config(saved), flatten_config(current)
    changed = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before != after:
            changed[key] = (before, after)
    return changed


def _covered(key: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def added_at_default(changes: dict[str, tuple[Any, Any]], defaults: dict | None) -> set[str]:
    """The changed fields the saved config lacks and the current one has at its default."""
    if defaults is None:
        return set()
    flat_defaults = flatten_config(defaults)
    return {
        key
        for key, (before, after) in changes.items()
        if before == _MISSING and key in flat_defaults and flat_defaults[key] == after
    }


def check_config_change(
    saved: dict,
    current: dict,
    allow_changes: list[str],
    checkpoint: str,
    only_sections: tuple[str, ...] | None = None,
    log: bool = True,
    defaults: dict | None = None,
    data: tuple[list[dict] | None, list[dict]] | None = None,
    tokenizer: tuple[dict | None, dict | None] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Raise ConfigError (one problem per field) for refused changes; log and return the others.

    ``only_sections`` restricts the comparison (finetuning compares the ``model`` section only).
    ``defaults``: the config of all defaults; a field the saved config lacks (added to megatron_ext
    after the checkpoint was written) is accepted at its default. ``data``: the checkpoint's
    dataset fingerprints (None when it recorded none) and the current ones, one per
    ``data.data_path`` entry; compared when the ``data`` section is. ``tokenizer``: the
    checkpoint's tokenizer fingerprint and the current one (None where there is none); equal
    ones make a changed ``tokenizer.tokenizer_model`` a move, not a change, and different ones
    under the same path are logged as a warning.
    """
    changes = diff_configs(saved, current)
    if only_sections is not None:
        changes = {k: v for k, v in changes.items() if _covered(k, only_sections)}
    added = added_at_default(changes, defaults)
    rewritten, moved = None, None
    if data is not None and (only_sections is None or _covered(DATA_PATH, only_sections)):
        paths = current.get("data", {}).get("data_path", [])
        rewritten = _rewritten_datasets(data[0], data[1], paths, checkpoint, log)
        if rewritten == [] and DATA_PATH in changes:
            moved = changes.pop(DATA_PATH)
    moved_tokenizer, retrained = None, False
    compare_tokenizer = only_sections is None or _covered(TOKENIZER_PATH, only_sections)
    if compare_tokenizer and tokenizer is not None and None not in tokenizer:
        if TOKENIZER_PATH in changes and tokenizer[0] == tokenizer[1]:
            moved_tokenizer = changes.pop(TOKENIZER_PATH)
        retrained = TOKENIZER_PATH not in changes and tokenizer[0] != tokenizer[1]
    refused = [
        (key, new, f"differs from {old!r} in the checkpoint {checkpoint}")
        for key, (old, new) in changes.items()
        if not (_covered(key, ALWAYS_ALLOWED) or _covered(key, allow_changes) or key in added)
    ]
    if rewritten and not _covered(DATA_PATH, allow_changes):
        refused += rewritten
    # One fix for all: the list that allows every refused change at once.
    names = ", ".join(dict.fromkeys(key for key, _, _ in refused))
    fix = (
        "restore what the checkpoint was trained with, or allow the change with "
        f"--checkpoint.allow_changes='[{names}]'"
    )
    problems = [Problem(key, value, rule, fix) for key, value, rule in refused]
    if problems:
        raise ConfigError(problems)
    if log:
        _log_accepted(changes, added, rewritten or [], moved)
        if moved_tokenizer is not None:
            logger.info(
                "resume reads the same tokenizer from another place: %r -> %r", *moved_tokenizer
            )
        if retrained:
            logger.warning(
                "the tokenizer at %r is not the one the checkpoint %s was trained with: training "
                "reads its tokens from the datasets, but the Hugging Face export will ship this "
                "tokenizer",
                current.get("tokenizer", {}).get("tokenizer_model"),
                checkpoint,
            )
    return changes


def _log_accepted(
    changes: dict[str, tuple[Any, Any]],
    added: set[str],
    rewritten: list[tuple[str, str, str]],
    moved: tuple[Any, Any] | None,
) -> None:
    for key, _, rule in rewritten:
        logger.warning("resume changes %s: %s (allowed by checkpoint.allow_changes)", key, rule)
    if moved is not None:
        logger.info("resume reads the same datasets from another place: %r -> %r", *moved)
    for key, (old, new) in changes.items():
        if _covered(key, ("checkpoint", "monitoring", "run_dir")):
            continue
        if _covered(key, ("parallel",)):
            reason = "layout change, resharded on load"
        elif key in added:
            reason = "a field added after this checkpoint was written, at its default"
        elif _covered(key, ALWAYS_ALLOWED):
            reason = "does not change what is trained"
        else:
            reason = "allowed by checkpoint.allow_changes"
        logger.warning("resume changes %s: %r -> %r (%s)", key, old, new, reason)


def _rewritten_datasets(
    saved: list[dict] | None, current: list[dict], paths: list[str], checkpoint: str, log: bool
) -> list[tuple[str, str, str]] | None:
    """``(field, path, rule)`` of each dataset whose content is not what the checkpoint trained on.

    None when contents cannot be compared: the checkpoint recorded no fingerprints, or another
    number of datasets is configured (a change of ``data.data_path`` anyway).
    """
    if saved is None:
        if log:
            logger.warning(
                "the checkpoint records no dataset fingerprints (it was written by an earlier "
                "megatron_ext or converted): its datasets are compared by path only"
            )
        return None
    if len(saved) != len(current):
        return None
    if any(then.get("version") != now.get("version") for then, now in zip(saved, current)):
        if log:
            logger.warning(
                "the checkpoint's dataset fingerprints are of another version: its datasets are "
                "compared by path only"
            )
        return None
    return [
        (
            DATA_PATH,
            paths[i],
            f"dataset {i} holds other data than when the checkpoint {checkpoint} was written "
            f"({describe(then)} then, {describe(now)} now)",
        )
        for i, (then, now) in enumerate(zip(saved, current))
        if then != now
    ]


def padded_vocab_rows(model: dict, tp: int) -> int:
    """Rows of the embedding and output layer of the ``model`` config section at TP ``tp``."""
    from megatron_ext.models.config import ModelConfig

    fields = ("vocab_size", "make_vocab_size_divisible_by")
    return ModelConfig(**{k: model[k] for k in fields if k in model}).padded_vocab_size(tp)


def check_padded_vocab(saved_rows: int, current_model: dict, tp: int, checkpoint: str) -> None:
    """Refuse a load whose padded vocabulary differs from the checkpoint's ``saved_rows``.

    The embedding and output layer have ``padded_vocab_size(tp)`` rows, which depends on TP.
    Loaded under another TP, megatron-core fills missing rows with zeros, and every zero row of
    the output layer adds ``exp(0)`` to the softmax: the loss shifts. (65,536, the recipe's
    vocabulary, pads to itself at any TP up to 512.)
    """
    rows = padded_vocab_rows(current_model, tp)
    if rows == saved_rows:
        return
    fix = (
        f"use model.make_vocab_size_divisible_by={saved_rows // tp}, which pads to {saved_rows} "
        f"rows at TP{tp}"
        if saved_rows % tp == 0
        else f"use a tensor-parallel size that divides {saved_rows}"
    )
    raise ConfigError(
        [
            Problem(
                "model.make_vocab_size_divisible_by",
                current_model.get("make_vocab_size_divisible_by"),
                f"pads the vocabulary of {current_model.get('vocab_size')} to {rows} rows at "
                f"TP{tp}, the checkpoint {checkpoint} has {saved_rows}; the missing rows would "
                "load as zeros and join every softmax",
                fix,
            )
        ]
    )
