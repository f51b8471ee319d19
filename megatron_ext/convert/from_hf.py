"""Import a Hugging Face Llama directory as a megatron_ext checkpoint to fine-tune from.

    from megatron_ext.convert.from_hf import convert_from_hf
    convert_from_hf("hf/TinyLlama", "runs/tinyllama", tensor_model_parallel_size=2)

writes ``runs/tinyllama/checkpoints/iter_0000000/`` (model tensors in ``torch_dist``,
``config.yaml`` with the ``model`` section, ``run_state.json`` at step 0, ``checkpoint.json``,
``versions.json``, the tokenizer in ``tokenizer/``) and
``runs/tinyllama/checkpoints/latest``. ``torch_dist`` is layout independent: training loads it at
any TP/PP/virtual-PP layout. The model is built once at TP1 x PP1 on CPU with the megatron_ext
builder, its weights are set from the HF tensors, and megatron-core's ``dist_checkpointing``
saves it; so the checkpoint has exactly the keys and shapes training expects.

Vocabulary padding: megatron-core pads the embedding to a multiple of
``make_vocab_size_divisible_by x TP`` and its cross entropy runs over the padded rows. Padded rows
(zeros) would add ``exp(0)`` terms to every softmax and change the loss, so by default the largest
power-of-two multiple (at most 128) that needs no padding at ``tensor_model_parallel_size`` is
chosen; only a vocabulary not divisible by TP gets padded (to the next multiple of TP), and that
is reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from megatron_ext.config.errors import ProblemCollector
from megatron_ext.config.loader import to_dict
from megatron_ext.convert import llama
from megatron_ext.convert.dist_reader import CHECKPOINTS_DIR, LATEST_FILE, iteration_dir_name
from megatron_ext.convert.hf_files import HFWeights
from megatron_ext.convert.megatron_model import (
    build_single_model,
    save_checkpoint_model,
    single_process_megatron,
)
from megatron_ext.convert.run_files import CONFIG_FILE, TOKENIZER_DIR, write_hf_tokenizer
from megatron_ext.models.config import TORCH_DTYPES, ModelConfig

logger = logging.getLogger(__name__)

_ITER_DIR = re.compile(r"^iter_\d{7}$")
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
# megatron-core local-spec module names of the stored per-layer tensors.
_LOCAL_LAYER_NAMES = {
    llama.QKV_NORM: "input_layernorm.weight",
    llama.QKV: "self_attention.linear_qkv.weight",
    llama.PROJ: "self_attention.linear_proj.weight",
    llama.FC1_NORM: "pre_mlp_layernorm.weight",
    llama.FC1: "mlp.linear_fc1.weight",
    llama.FC2: "mlp.linear_fc2.weight",
}


def choose_vocab_multiple(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """Largest power of two <= 128 with ``vocab_size % (multiple * TP) == 0``, else 1 (a
    vocabulary TP does not divide is padded to the next multiple of TP, the fewest zero rows)."""
    for multiple in (128, 64, 32, 16, 8, 4, 2):
        if vocab_size % (multiple * tensor_model_parallel_size) == 0:
            return multiple
    return 1


def convert_from_hf(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    tensor_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int | None = None,
    seq_length: int | None = None,
    dtype: str = "fp32",
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the HF model in ``hf_dir`` as a checkpoint; returns the ``iter_0000000`` directory.

    ``output`` is a run directory (``checkpoints/iter_0000000`` and ``checkpoints/latest`` are
    written in it) or an ``iter_NNNNNNN`` directory. ``tensor_model_parallel_size`` is the TP
    degree training will use (it decides the vocabulary padding); ``seq_length`` defaults to the
    model's ``max_position_embeddings``; ``dtype`` is the stored dtype of the weights.
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
    source = Path(hf_dir)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{source} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    model = llama.model_config_from_hf(hf_config, seq_length)
    tp = tensor_model_parallel_size
    if tp < 1:
        raise ValueError(f"tensor_model_parallel_size must be >= 1, got {tp}")
    problems = ProblemCollector()
    model.validate(problems, tp, 1, None)
    problems.raise_if_any()  # a ConfigError (a ValueError) naming every field that does not fit
    multiple = make_vocab_size_divisible_by or choose_vocab_multiple(model.vocab_size, tp)
    model = replace(model, make_vocab_size_divisible_by=multiple)
    padded = model.padded_vocab_size(tp)
    if padded != model.vocab_size:
        logger.warning(
            "vocabulary %d is padded to %d at TP=%d: the %d zero rows take part in megatron-core's "
            "softmax, so losses differ slightly from the HF model's",
            model.vocab_size,
            padded,
            tp,
            padded - model.vocab_size,
        )
    weights = HFWeights(source)
    check_hf_tensors(weights, model)

    output = Path(output)
    ckpt_dir = (
        output if _ITER_DIR.match(output.name) else output / CHECKPOINTS_DIR / iteration_dir_name(0)
    )
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ValueError(f"{ckpt_dir} exists and is not empty")
    if not _ITER_DIR.match(output.name) and (ckpt_dir.parent / LATEST_FILE).exists():
        raise ValueError(
            f"{output} already holds a run ({ckpt_dir.parent / LATEST_FILE} exists); "
            "convert into a new run directory"
        )
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    # Named like an interrupted save, which megatron_ext.checkpoint cleans up after a crash.
    work = ckpt_dir.parent / f"{ckpt_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    work.mkdir()
    try:
        with single_process_megatron():
            chunk = build_single_model(model, padded)
            fill_model(chunk, weights, model, padded)
            chunk.to(TORCH_DTYPES[dtype])
            save_checkpoint_model(chunk, work / "model")
        for item in (work / "model").iterdir():
            os.replace(item, work / item.name)
        (work / "model").rmdir()
        _write_run_files(work, model, padded, source, tokenizer_dir)
        if ckpt_dir.exists():
            ckpt_dir.rmdir()
        os.replace(work, ckpt_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not _ITER_DIR.match(output.name):
        latest = ckpt_dir.parent / LATEST_FILE
        tmp = latest.with_name(LATEST_FILE + ".tmp")
        tmp.write_text(ckpt_dir.name + "\n", encoding="utf-8")
        os.replace(tmp, latest)
    logger.info("wrote %s", ckpt_dir)
    return ckpt_dir


def check_hf_tensors(weights: HFWeights, model: ModelConfig) -> None:
    """Every expected tensor present with its shape; anything unknown refused."""
    expected = dict(llama.hf_tensor_shapes(model))
    names = set(weights.names())
    ignored = sorted(n for n in names if n.endswith(_IGNORED_HF_SUFFIXES))
    if ignored:
        logger.info("ignoring %d rotary inv_freq buffers (recomputed by the model)", len(ignored))
    tied_head = not model.untie_embeddings_and_output_weights and llama.HF_LM_HEAD in names
    unknown = sorted(
        names - set(expected) - set(ignored) - ({llama.HF_LM_HEAD} if tied_head else set())
    )
    missing = sorted(set(expected) - names)
    problems = []
    if unknown:
        problems.append(f"unknown tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if problems:
        raise ValueError(
            f"{weights.path} is not a Llama model of its config.json: " + "; ".join(problems)
        )


def fill_model(chunk: torch.nn.Module, weights: HFWeights, model: ModelConfig, padded: int) -> None:
    """Set every parameter of a TP1 model from the HF tensors (padded vocabulary rows are zero)."""
    targets = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    assigned: set[str] = set()

    def put(name: str, value: torch.Tensor) -> None:
        if name not in targets:
            raise AssertionError(f"the megatron model has no parameter {name}")
        target = targets[name]
        if target.shape != value.shape:
            raise ValueError(
                f"{name}: HF gives {tuple(value.shape)}, the model has {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value)
        assigned.add(name)

    put("embedding.word_embeddings.weight", _pad_rows(weights.get(llama.HF_EMBEDDING), padded))
    for layer in range(model.num_layers):
        hf_layer = {
            llama.hf_layer_prefix(layer) + name: weights.get(llama.hf_layer_prefix(layer) + name)
            for name in llama.HF_LAYER_NAMES
        }
        for key, tensor in llama.hf_layer_to_megatron(hf_layer, layer, model).items():
            put(f"decoder.layers.{layer}.{_LOCAL_LAYER_NAMES[key]}", tensor)
    put("decoder.final_layernorm.weight", weights.get(llama.HF_FINAL_NORM))
    if model.untie_embeddings_and_output_weights:
        put("output_layer.weight", _pad_rows(weights.get(llama.HF_LM_HEAD), padded))
    unset = sorted(set(targets) - assigned)
    if unset:
        raise AssertionError(f"parameters left unset by the HF weights: {unset}")


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    padding = torch.zeros(rows - weight.shape[0], *weight.shape[1:], dtype=weight.dtype)
    return torch.cat([weight, padding])


def _write_run_files(
    ckpt_dir: Path,
    model: ModelConfig,
    padded: int,
    source: Path,
    tokenizer_dir: str | os.PathLike | None,
) -> None:
    """The files ``megatron_ext.checkpoint`` expects next to the tensors (model only, step 0)."""
    from megatron_ext.checkpoint import directory as ckpt_files
    from megatron_ext.checkpoint.manager import FORMAT_VERSION, software_versions

    _write_tokenizer(ckpt_dir, source, tokenizer_dir)
    header = f"# Converted from the Hugging Face model {source.resolve()}\n"
    ckpt_files.write_text_atomic(
        ckpt_dir / CONFIG_FILE,
        header + yaml.safe_dump({"model": to_dict(model)}, sort_keys=False),
    )
    ckpt_files.write_json(
        ckpt_dir / ckpt_files.RUN_STATE_FILE,
        {"step": 0, "consumed_samples": 0, "consumed_tokens": 0},
    )
    ckpt_files.write_json(ckpt_dir / ckpt_files.VERSIONS_FILE, software_versions())
    files = sorted(
        {p.name for p in ckpt_dir.iterdir() if p.is_file()} | {ckpt_files.CHECKPOINT_FILE}
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "step": 0,
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "cp": 1, "vpp": None},
        "optimizer_sharding": None,
        "padded_vocab_size": padded,
        "model_only": True,
        "converted_from": str(source.resolve()),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    ckpt_files.write_json(ckpt_dir / ckpt_files.CHECKPOINT_FILE, meta)


def _write_tokenizer(ckpt_dir: Path, source: Path, tokenizer_dir: str | os.PathLike | None) -> None:
    tokenizer_source = Path(tokenizer_dir) if tokenizer_dir is not None else source
    has_tokenizer = (
        (tokenizer_source / "tokenizer.json").is_file()
        or (tokenizer_source / "tokenizer.model").is_file()
        or tokenizer_source.suffix == ".model"
    )
    if has_tokenizer:
        (ckpt_dir / TOKENIZER_DIR).mkdir()
        try:
            write_hf_tokenizer(tokenizer_source, ckpt_dir / TOKENIZER_DIR)
        except ValueError as exc:
            if tokenizer_dir is not None:
                raise
            shutil.rmtree(ckpt_dir / TOKENIZER_DIR)
            logger.warning("the tokenizer of %s is not carried over: %s", source, exc)
    elif tokenizer_dir is not None:
        raise ValueError(f"{tokenizer_source} holds no tokenizer.json or tokenizer.model")
    else:
        logger.warning("%s has no tokenizer files: the checkpoint has no tokenizer/", source)
