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
"""

from __future__ import annotations

import logging
from typing import Any

from megatron_ext.config.errors import ConfigError, Problem

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
    "model.fused_cross_entropy",
    "model.wgrad_fusion",
    "optimizer.fused_adamw",
    "optimizer.fused_param_copy",
)
"""What a resume may change freely: the layout is resharded on load; the rest decides where
outputs go, what is logged or evaluated, how long this invocation runs, how batches are read ahead
or where the data index is kept (the same arrays), and which kernels compute the same step (the
fast path's switches, the fused AdamW update and its copy into the model's weights agree with the
plain path to float rounding), never which tokens are trained on or how."""

_MISSING = "<absent>"


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
) -> dict[str, tuple[Any, Any]]:
    """Raise ConfigError (one problem per field) for refused changes; log and return the others.

    ``only_sections`` restricts the comparison (finetuning compares the ``model`` section only).
    ``defaults``: the config of all defaults; a field the saved config lacks (added to megatron_ext
    after the checkpoint was written) is accepted at its default.
    """
    changes = diff_configs(saved, current)
    if only_sections is not None:
        changes = {k: v for k, v in changes.items() if _covered(k, only_sections)}
    added = added_at_default(changes, defaults)
    refused = {
        k: v
        for k, v in changes.items()
        if not _covered(k, ALWAYS_ALLOWED) and not _covered(k, allow_changes) and k not in added
    }
    if refused:
        names = ", ".join(refused)
        fix = (
            f"restore the checkpoint's value, or allow the change with "
            f"--checkpoint.allow_changes='[{names}]'"
        )
        raise ConfigError(
            [
                Problem(key, new, f"differs from {old!r} in the checkpoint {checkpoint}", fix)
                for key, (old, new) in refused.items()
            ]
        )
    for key, (old, new) in changes.items():
        if log and not _covered(key, ("checkpoint", "monitoring", "run_dir")):
            if _covered(key, ("parallel",)):
                reason = "layout change, resharded on load"
            elif key in added:
                reason = "a field added after this checkpoint was written, at its default"
            elif _covered(key, ALWAYS_ALLOWED):
                reason = "does not change what is trained"
            else:
                reason = "allowed by checkpoint.allow_changes"
            logger.warning("resume changes %s: %r -> %r (%s)", key, old, new, reason)
    return changes
