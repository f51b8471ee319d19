"""Save and resume a training run with megatron-core ``dist_checkpointing`` (torch_dist format).

The loop calls exactly two functions, on every rank::

    run_state = load_checkpoint(cfg.checkpoint, run_dir, model_chunks, optimizer, scheduler, ctx,
                                to_dict(cfg), to_dict(ExperimentConfig()), fingerprints)
    # None: nothing to resume, start at step 0
    ...
    save_checkpoint(cfg.checkpoint, run_dir, step, model_chunks, optimizer, scheduler,
                    {"progress": ..., "data": fingerprints}, to_dict(cfg), ctx, background)
    # background: None (the save returns when the checkpoint is published) or a
    # ``BackgroundSaves`` (``checkpoint.async_save``: it returns once the writers started)

What a checkpoint holds: the model (``model``, or ``model0``, ``model1``... per virtual pipeline
chunk); the distributed optimizer state in megatron-core's ``fully_reshardable`` format (gathered
over the data-parallel group, stored as one full tensor per parameter and state, so TP, PP and DP
may all change on load; ``dp_reshardable`` only allows DP changes, and ``fully_sharded_model_space``
is rejected by megatron-core 0.16's own ShardedTensor checks); the optimizer's common state (Adam
step, param groups, the fp16 loss scaler); the LR scheduler; every RNG of every rank; and, as plain
files, the run state, the resolved config and the software versions. Tensors are stored at full
shape whatever the layout, so loading under another TP/PP/DP layout reshards them.

Filesystem work (temp directory, verification, rename, ``latest``, retention) happens on rank 0;
its outcome is broadcast so every rank returns or raises together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from megatron_ext.checkpoint import directory as fs
from megatron_ext.checkpoint.background import BackgroundSaves, save_failed
from megatron_ext.checkpoint.compatibility import (
    check_config_change,
    check_padded_vocab,
    padded_vocab_rows,
)
from megatron_ext.checkpoint.config import CheckpointConfig
from megatron_ext.checkpoint.directory import CheckpointError
from megatron_ext.checkpoint.rng import capture_rng_state, reseed_rng, restore_rng_state
from megatron_ext.parallel.init import ParallelContext, on_rank0

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
OPTIMIZER_SHARDING = "fully_reshardable"


def save_checkpoint(
    cfg: CheckpointConfig,
    run_dir: str | Path,
    step: int,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    opt_param_scheduler: Any,
    run_state: dict,
    config_dict: dict,
    ctx: ParallelContext,
    background: BackgroundSaves | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically on all ranks; returns its directory.

    With ``background`` the call returns once the writer processes have started, and the
    directory appears (with ``latest`` naming it) when ``background`` finalizes the save; a save
    still in flight from an earlier step is waited for and published first.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    if background is not None:
        background.wait()
    began = time.perf_counter()
    save_dir = Path(cfg.resolved_save_dir(run_dir))
    state_json = _run_state_json(run_state, step)

    def prepare() -> str:
        save_dir.mkdir(parents=True, exist_ok=True)
        fs.remove_stale_temp_dirs(save_dir)
        if cfg.check_free_space:
            fs.check_free_space(save_dir, step)
        temp = fs.new_temp_dir(save_dir, step)
        temp.mkdir()
        return str(temp)

    temp = Path(_on_rank0(ctx, prepare))
    finish_param_gather(model_chunks)
    state = _sharded_state(
        model_chunks,
        optimizer,
        opt_param_scheduler,
        ctx,
        is_loading=False,
        gather_on_cpu=cfg.optimizer_gather_on_cpu,
    )

    def publish() -> Path:
        final = Path(
            _on_rank0(
                ctx, lambda: _publish(cfg, save_dir, temp, step, ctx, state_json, config_dict)
            )
        )
        if ctx.rank == 0:
            logger.info(
                "saved checkpoint %s %s %.1f s",
                final,
                "in" if background is None else "(in the background) after",
                time.perf_counter() - began,
            )
        return final

    if background is None:
        try:
            dist_checkpointing.save(state, str(temp))
        except (CheckpointException, CheckpointingException) as exc:
            # torch's CheckpointException is a BaseException: turned into an Exception here.
            raise save_failed(step, exc, "save") from exc
        _barrier(ctx)
        return publish()
    request = dist_checkpointing.save(state, str(temp), async_sharded_save=True)
    request.add_finalize_fn(publish)
    background.schedule(request, step)
    if ctx.rank == 0:
        logger.info(
            "checkpoint of step %d: writing in the background (training resumed after %.1f s)",
            step,
            time.perf_counter() - began,
        )
    return save_dir / fs.checkpoint_name(step)


def _publish(
    cfg: CheckpointConfig,
    save_dir: Path,
    temp: Path,
    step: int,
    ctx: ParallelContext,
    state_json: str,
    config_dict: dict,
) -> str:
    """Rank 0, once every rank's files are written: verify, rename into place, point ``latest``."""
    final = save_dir / fs.checkpoint_name(step)
    _write_own_files(temp, step, ctx, state_json, config_dict)
    problems = fs.verify_checkpoint(temp)
    if problems:
        raise CheckpointError(
            f"the save of step {step} into {temp} did not verify and was not published:\n  "
            + "\n  ".join(problems)
        )
    fs.publish(temp, final)
    fs.write_latest(save_dir, final.name)
    fs.apply_retention(save_dir, cfg.keep_last)
    return str(final)


def load_checkpoint(
    cfg: CheckpointConfig,
    run_dir: str | Path,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    opt_param_scheduler: Any,
    ctx: ParallelContext,
    current_config_dict: dict,
    default_config_dict: dict | None = None,
    data_fingerprints: list[dict] | None = None,
    tokenizer_fingerprint: dict | None = None,
) -> dict | None:
    """Restore the run from its checkpoint on all ranks; returns the saved run state.

    ``default_config_dict`` (the config of all defaults) lets a checkpoint of an earlier
    megatron_ext resume: fields added since are accepted at their defaults.
    ``data_fingerprints`` (``data.fingerprint.data_fingerprints`` of the configured datasets) are
    compared with the ones the checkpoint's run state holds under ``data``: the same datasets
    at other paths resume, other contents at the same paths are refused.
    ``tokenizer_fingerprint`` (``Tokenizer.fingerprint``) likewise lets the same tokenizer be
    read from another path.

    Returns None when there is nothing to resume (no checkpoint yet, or ``finetune``, which loads
    only the weights). Raises ``CheckpointError`` for a missing or corrupt checkpoint (naming the
    file and the last good checkpoint; it never falls back silently) and ``ConfigError`` for a
    config change the checkpoint's config does not allow.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    found = _on_rank0(ctx, lambda: _locate(cfg, Path(run_dir)))
    if found is None:
        if ctx.rank == 0:
            logger.info("no checkpoint to resume from; starting a new run")
        return None
    path, finetune = found["path"], found["finetune"]
    check_config_change(
        found["config"],
        current_config_dict,
        list(cfg.allow_changes),
        path,
        only_sections=("model",) if finetune else None,
        log=ctx.rank == 0,
        defaults=default_config_dict,
        data=None
        if data_fingerprints is None
        else (found["run_state"].get("data"), data_fingerprints),
        tokenizer=(found["run_state"].get("tokenizer"), tokenizer_fingerprint),
    )
    if "model" in current_config_dict and "model" in found["config"]:
        saved_rows = found["meta"].get("padded_vocab_size") or _stored_vocab_rows(path)
        if saved_rows is not None:
            check_padded_vocab(saved_rows, current_config_dict["model"], ctx.layout.tp, path)
    same_layout = found["meta"]["layout"] == _layout_dict(ctx)
    restore_rng = same_layout and not finetune
    state = _sharded_state(
        model_chunks,
        optimizer,
        opt_param_scheduler,
        ctx,
        is_loading=True,
        model_only=finetune,
        with_rng=restore_rng,
        gather_on_cpu=cfg.optimizer_gather_on_cpu,
    )
    try:
        loaded = dist_checkpointing.load(state, path)
    except (CheckpointingException, RuntimeError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"loading {path} failed: {type(exc).__name__}: {exc}") from exc
    for key, chunk in _model_keys(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if finetune:
        # The optimizer's fp32 main weights were built from the initial weights: refresh them.
        optimizer.reload_model_params()
        if ctx.rank == 0:
            logger.info("finetuning from the weights of %s; starting at step 0", path)
        return None
    # Exits inner first: the configured groups (kernel switches included) are back before the
    # steps are placed on the device their kernel expects.
    with _torch_adam_step_hidden(optimizer), _configured_param_groups(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    if opt_param_scheduler is not None:
        try:
            opt_param_scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as exc:
            # megatron-core asserts when the scheduler's settings differ from the checkpoint's.
            raise CheckpointError(
                f"the LR schedule of {path} differs from the configured one ({exc}); build "
                "OptimizerParamScheduler with override_opt_param_scheduler=True to take the "
                "configured values (after allowing the change in checkpoint.allow_changes)"
            ) from exc
    step = found["meta"]["step"]
    if restore_rng:
        restore_rng_state(loaded["rng_state"], ctx.device)
    else:
        seed = int(current_config_dict.get("seed", 0))
        reseed_rng(seed, step, ctx.rank)
        if ctx.rank == 0:
            logger.warning(
                "layout changed (%s -> %s): random generators re-seeded from seed %d and step %d",
                found["meta"]["layout"],
                _layout_dict(ctx),
                seed,
                step,
            )
    if ctx.rank == 0:
        logger.info("resumed from %s (step %d)", path, step)
    return found["run_state"]


def _stored_vocab_rows(path: str) -> int | None:
    """The embedding's rows as stored (``torch_dist`` metadata), for checkpoints written before
    ``checkpoint.json`` recorded them; None when the metadata does not say."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        entry = FileSystemReader(path).read_metadata().state_dict_metadata.get(_EMBEDDING_KEY)
    except (OSError, ValueError, RuntimeError):
        return None
    size = getattr(entry, "size", None)
    return int(size[0]) if size else None


_EMBEDDING_KEY = "embedding.word_embeddings.weight"


# ---- what goes into dist_checkpointing ------------------------------------------------------
def finish_param_gather(model_chunks: list[torch.nn.Module]) -> None:
    """Bring the model's weights up to date with the distributed optimizer's last update.

    With ``parallel.overlap_param_gather`` megatron-core leaves the all-gather of the updated
    weight shards to the next forward pass (its forward pre-hooks), so between an update and that
    forward each rank's model still holds the other ranks' shards from the step before. A
    checkpoint stores the model's weights (the Hugging Face conversion reads them, and a resume
    starts from them), so the save gathers them first, synchronously. The next forward's hooks
    then find the gather done; the next backward's gradient sync re-arms them as usual.
    """
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if (
            ddp_config is not None
            and ddp_config.use_distributed_optimizer
            and ddp_config.overlap_param_gather
        ):
            chunk.start_param_sync(force_sync=True)


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model under megatron-core's DDP wrapper (whose own keys would gain ``module.``)."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    while isinstance(chunk, _BaseDataParallel):
        chunk = chunk.module
    return chunk


def _model_keys(model_chunks: list[torch.nn.Module]) -> list[tuple[str, torch.nn.Module]]:
    if len(model_chunks) == 1:
        return [("model", model_chunks[0])]
    return [(f"model{i}", chunk) for i, chunk in enumerate(model_chunks)]


def _sharded_state(
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    opt_param_scheduler: Any,
    ctx: ParallelContext,
    is_loading: bool,
    model_only: bool = False,
    with_rng: bool = True,
    gather_on_cpu: bool = False,
) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state: dict[str, Any] = {
        key: _unwrap(chunk).sharded_state_dict() for key, chunk in _model_keys(model_chunks)
    }
    if model_only:
        return state
    _ensure_optimizer_state(optimizer)
    metadata = {
        "distrib_optim_sharding_type": OPTIMIZER_SHARDING,
        "distrib_optim_fully_reshardable_mem_efficient": gather_on_cpu,
    }
    state["optimizer"] = optimizer.sharded_state_dict(
        dict(state), is_loading=is_loading, metadata=metadata
    )
    if opt_param_scheduler is not None:
        state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    if with_rng:
        # One object per global rank: an identical layout maps every rank to the same place.
        state["rng_state"] = ShardedObject(
            "rng_state",
            capture_rng_state(ctx.device) if not is_loading else None,
            (ctx.layout.world_size,),
            (ctx.rank,),
            replica_id=0,
        )
    return state


def _ensure_optimizer_state(optimizer: Any) -> None:
    """Give a torch Adam that has not stepped yet the state its first step would create.

    megatron-core's distributed optimizer reads the Adam ``step`` from the per-parameter state when
    it builds its state dict; torch creates that state lazily at the first step, so a freshly built
    optimizer (the normal case when resuming) has none. Zero moments and step 0 are exactly what
    torch's first step would start from (``step`` on the parameter's device for the fused kernel,
    on CPU otherwise), and loading overwrites them.
    """
    for torch_optimizer in torch_adams(optimizer):
        if len(torch_optimizer.state) > 0:
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                torch_optimizer.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32, device=_step_device(group, param)),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


def torch_adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside megatron-core's optimizer (none with TE or apex)."""
    return [
        o
        for o in _inner_optimizers(optimizer)
        if isinstance(o, torch.optim.Adam | torch.optim.AdamW)
    ]


def _step_device(group: dict, param: torch.Tensor) -> torch.device:
    """Where torch's Adam keeps ``step``: with the parameter for fused/capturable, else on CPU."""
    on_param = group.get("fused") or group.get("capturable")
    return param.device if on_param else torch.device("cpu")


_GROUP_STATE = ("params", "lr", "step")
"""What a param group holds of the run's state rather than of its configuration."""


def _inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron-core's (chained) optimizer, of any kind."""
    inner = [
        getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])
    ]
    return [o for o in inner if isinstance(o, torch.optim.Optimizer)]


@contextlib.contextmanager
def _configured_param_groups(optimizer: Any) -> Iterator[None]:
    """Keep the configured settings of every param group through a load of optimizer state.

    torch's ``load_state_dict`` replaces the param groups with the checkpoint's, i.e. with the
    saving run's configuration: everything but the parameters, ``lr`` and ``step`` is put back
    afterwards. Otherwise a resume would keep the old kernel switches (``fused``, ``foreach``)
    and undo a change it allowed: megatron-core's scheduler computes the learning rate from each
    group's ``max_lr`` / ``min_lr``, and AdamW reads ``betas``, ``eps`` and ``weight_decay``
    there. Without an allowed change the two are equal.
    """
    inner = _inner_optimizers(optimizer)
    configured = [
        [{k: v for k, v in g.items() if k not in _GROUP_STATE} for g in opt.param_groups]
        for opt in inner
    ]
    yield
    for opt, groups in zip(inner, configured, strict=True):
        for group, settings in zip(opt.param_groups, groups, strict=True):
            group.update(settings)


@contextlib.contextmanager
def _torch_adam_step_hidden(optimizer: Any) -> Iterator[None]:
    """Let megatron-core 0.16 load ``fully_reshardable`` state into a torch (not TE/Apex) Adam.

    Its loader copies every entry of the per-parameter state from the checkpoint, but torch Adam
    keeps a ``step`` entry there that the checkpoint stores in the param groups instead (and
    restores separately), so the copy fails with ``KeyError: 'step'``. While loading, each
    parameter's ``step`` is set aside around that copy and put back unchanged. Afterwards every
    parameter gets its own copy of the restored step, on the device its group's kernel expects.
    """
    adams = torch_adams(optimizer)
    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(inner, "optimizer", None) not in adams:
            continue

        def set_states(model_param, tensors, inner=inner, setter=setter):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            state = inner.optimizer.state[main_param]
            step = state.pop("step", None)
            try:
                setter(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        inner._set_main_param_and_optimizer_states = set_states
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states
        for adam in adams:
            for group in adam.param_groups:
                for param in group["params"]:
                    state = adam.state.get(param, {})
                    # megatron-core gives every parameter the same ``step`` tensor, and torch's
                    # Adam increments each parameter's step in place: shared, it would advance
                    # once per parameter per step and corrupt the bias correction.
                    if isinstance(state.get("step"), torch.Tensor):
                        state["step"] = state["step"].to(
                            dtype=torch.float32, device=_step_device(group, param), copy=True
                        )


# ---- files of our own and the search for a checkpoint ------------------------------------------
def _layout_dict(ctx: ParallelContext) -> dict:
    layout = ctx.layout
    return {
        "world_size": layout.world_size,
        "tp": layout.tp,
        "pp": layout.pp,
        "cp": layout.cp,
        "vpp": layout.vpp,
    }


def software_versions() -> dict[str, str]:
    """Versions recorded in ``versions.json``."""

    def version(dist_name: str) -> str:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": version("megatron-core"),
        "megatron_ext": version("megatron_ext"),
        "transformer-engine": version("transformer-engine"),
    }


def _run_state_json(run_state: dict, step: int) -> str:
    if run_state.get("step", step) != step:
        raise CheckpointError(f"run_state['step']={run_state['step']} but saving step {step}")
    try:
        return json.dumps({"step": step, **run_state}, indent=1, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"run_state must be JSON-serialisable: {exc}") from exc


def _write_own_files(temp: Path, step: int, ctx: ParallelContext, state_json: str, config: dict):
    fs.write_text_atomic(temp / fs.RUN_STATE_FILE, state_json)
    fs.write_text_atomic(temp / fs.CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    fs.write_json(temp / fs.VERSIONS_FILE, software_versions())
    files = sorted(p.name for p in temp.iterdir() if p.is_file() and not p.name.startswith(".tmp"))
    files = sorted({*files, fs.CHECKPOINT_FILE})
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "layout": _layout_dict(ctx),
        "optimizer_sharding": OPTIMIZER_SHARDING,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    if "model" in config:
        meta["padded_vocab_size"] = padded_vocab_rows(config["model"], ctx.layout.tp)
    fs.write_json(temp / fs.CHECKPOINT_FILE, meta)


def _locate(cfg: CheckpointConfig, run_dir: Path) -> dict | None:
    """Rank 0: the checkpoint to resume from, verified, with its metadata, run state and config,
    and whether it is loaded as a fine-tuning start (``finetune``).

    ``checkpoint.load`` outside the run's own ``save_dir`` (another run, a converted model) is
    where the run starts; once the run has checkpoints of its own (``latest`` in ``save_dir``),
    the same command resumes from them, so that a requeued or restarted job keeps its progress
    instead of starting again from ``load``. ``load`` inside ``save_dir`` (going back to an
    earlier checkpoint of the run) is always taken as given.
    """
    save_dir = Path(cfg.resolved_save_dir(run_dir))
    for stale in fs.remove_stale_temp_dirs(save_dir):
        logger.warning("an earlier save was interrupted: removed %s", stale)
    finetune = cfg.finetune
    if cfg.load is not None and fs.read_latest(save_dir) is not None:
        if not _inside(Path(cfg.load), save_dir):
            logger.warning(
                "checkpoint.load=%s%s is where this run started; it has checkpoints of its own "
                "now, and resumes from %s/latest",
                cfg.load,
                " (finetune)" if cfg.finetune else "",
                save_dir,
            )
            finetune, cfg = False, dataclasses.replace(cfg, load=None)
    if cfg.load is None:
        path, pointer_dir = _from_latest(save_dir, required=False)
        if path is None:
            return None
    else:
        path, pointer_dir = _from_explicit(Path(cfg.load))
    problems = fs.verify_checkpoint(path)
    if problems:
        good = fs.last_good_checkpoint(pointer_dir or path.parent, exclude=path)
        advice = (
            f"The last good checkpoint is {good}; resume from it with --checkpoint.load={good}"
            if good is not None
            else "No other complete checkpoint was found."
        )
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt:\n  "
            + "\n  ".join(problems)
            + f"\n{advice}"
        )
    if pointer_dir is not None:
        _report_unreferenced(pointer_dir, path)
    meta = json.loads((path / fs.CHECKPOINT_FILE).read_text(encoding="utf-8"))
    run_state = json.loads((path / fs.RUN_STATE_FILE).read_text(encoding="utf-8"))
    config = yaml.safe_load((path / fs.CONFIG_FILE).read_text(encoding="utf-8"))
    versions = json.loads((path / fs.VERSIONS_FILE).read_text(encoding="utf-8"))
    now = software_versions()
    for name, saved in versions.items():
        if now.get(name) != saved:
            logger.warning("%s was saved with %s %s; running %s", path, name, saved, now.get(name))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / fs.CHECKPOINT_FILE}: format_version {meta.get('format_version')!r}, this "
            f"version reads {FORMAT_VERSION}"
        )
    return {
        "path": str(path),
        "meta": meta,
        "run_state": run_state,
        "config": config,
        "finetune": finetune,
    }


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _from_latest(save_dir: Path, required: bool) -> tuple[Path | None, Path]:
    name = fs.read_latest(save_dir)
    if name is None:
        if required:
            raise CheckpointError(f"{save_dir} has no `latest` file")
        if fs.list_checkpoints(save_dir):
            logger.warning(
                "%s holds checkpoints but no `latest` (a save was interrupted before it was "
                "recorded); starting a new run. Set checkpoint.load to one of them to resume.",
                save_dir,
            )
        return None, save_dir
    path = save_dir / name
    if not path.is_dir():
        good = fs.last_good_checkpoint(save_dir)
        raise CheckpointError(
            f"{save_dir / fs.LATEST_FILE} names {name}, which does not exist. "
            f"Last good checkpoint: {good or 'none'}"
            + (f"; resume with --checkpoint.load={good}" if good else "")
        )
    return path, save_dir


def _from_explicit(path: Path) -> tuple[Path, Path | None]:
    if not path.exists():
        raise CheckpointError(f"checkpoint.load={path} does not exist")
    if (path / fs.LATEST_FILE).exists():
        return _from_latest(path, required=True)
    if fs.parse_step(path.name) is not None or (path / "metadata.json").exists():
        return path, None
    raise CheckpointError(
        f"checkpoint.load={path} is neither a checkpoint (iter_XXXXXXX) nor a save directory with "
        "a `latest` file"
    )


def _report_unreferenced(save_dir: Path, chosen: Path) -> None:
    chosen_step = fs.parse_step(chosen.name) or 0
    newer = [p.name for step, p in fs.list_checkpoints(save_dir) if step > chosen_step]
    if newer:
        logger.warning(
            "resuming from %s; ignoring newer checkpoints that `latest` does not name: %s",
            chosen,
            ", ".join(newer),
        )


# ---- rank coordination ---------------------------------------------------------------------
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier(ctx: ParallelContext) -> None:
    if _world() > 1:
        dist.barrier()


def _on_rank0(ctx: ParallelContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and hand its result (or its error, as a CheckpointError) to every
    rank."""
    return on_rank0(ctx.rank, fn, CheckpointError)
