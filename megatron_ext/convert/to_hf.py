"""Export a megatron_ext ``torch_dist`` checkpoint as a Hugging Face ``LlamaForCausalLM`` directory.

    from megatron_ext.convert.to_hf import convert_to_hf
    convert_to_hf("runs/demo", "out/hf", dtype="bf16")

The checkpoint is read tensor by tensor (one decoder layer at a time) with
``torch.distributed.checkpoint``: no process group, no GPU, no model construction, whatever TP/PP/
virtual-PP layout wrote it. The output directory receives ``config.json``,
``generation_config.json``, ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``, and the training tokenizer's Hugging Face files. It is written
under a temporary name and renamed into place, so a failed export leaves nothing half-written.

What Llama cannot represent is refused with the reason: biases, LayerNorm, learned absolute
positions, MoE, QK-norm, partial or scaled RoPE, unknown model tensors.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import torch

from megatron_ext.convert import llama
from megatron_ext.convert.dist_reader import DistCheckpointReader, resolve_checkpoint_dir
from megatron_ext.convert.hf_files import ShardedSafetensorsWriter, parse_size
from megatron_ext.convert.run_files import (
    RunModel,
    find_tokenizer_dir,
    read_config,
    run_model,
    write_hf_tokenizer,
)
from megatron_ext.models.config import TORCH_DTYPES, ModelConfig

logger = logging.getLogger(__name__)

_HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_MODEL_ROOTS = ("embedding.", "decoder.", "output_layer.")
_UNREPRESENTABLE = {
    ".bias": "linear biases",
    "position_embeddings": "learned absolute position embeddings",
    "experts": "mixture-of-experts layers",
    "router": "mixture-of-experts layers",
    "q_layernorm": "QK layer norm",
    "k_layernorm": "QK layer norm",
}


def convert_to_hf(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    iteration: int | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``checkpoint`` (run dir, its ``checkpoints/`` or an ``iter_*`` dir) to ``output_dir``.

    ``tokenizer_dir`` overrides the tokenizer named by the run (a directory with the Hugging Face
    files or ``tokenizer.model``, or a SentencePiece ``.model`` file). Returns the output path.
    Raises ValueError for anything that cannot be exported exactly.
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(max_shard_size)
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"{output} exists and is not empty (pass --overwrite / overwrite=True to replace it)"
        )
    ckpt_dir = resolve_checkpoint_dir(checkpoint, iteration)
    config, config_path = read_config(ckpt_dir)
    model = run_model(config, config_path)
    reader = DistCheckpointReader(ckpt_dir)
    prefix = find_model_prefix(reader)
    check_tensors(reader, prefix, model.config)
    tokenizer_source = find_tokenizer_dir(ckpt_dir, config, tokenizer_dir)
    logger.info("exporting %s (%d layers) to %s", ckpt_dir, model.config.num_layers, output)

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        special = _export_tokenizer(tokenizer_source, work, model.config)
        _write_configs(work, model.config, dtype, special)
        _write_weights(reader, prefix, model, work, TORCH_DTYPES[dtype], shard_bytes)
        _give_default_permissions(work)
        _move_into_place(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _give_default_permissions(directory: Path) -> None:
    """The permissions the user's umask gives new files and directories, and the parent's
    set-group-ID bit (a group-shared directory): ``mkdtemp`` makes its directory 0700 and
    safetensors writes 0600, which would hide the model from the team. A filesystem that
    refuses the change leaves the export as written, with a warning."""
    umask = _umask()
    setgid = directory.parent.stat().st_mode & stat.S_ISGID
    try:
        directory.chmod((0o777 & ~umask) | setgid)
        for path in directory.rglob("*"):
            path.chmod((0o777 & ~umask) | setgid if path.is_dir() else 0o666 & ~umask)
    except OSError as error:
        logger.warning("the export keeps the permissions it was written with: %s", error)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def find_model_prefix(reader: DistCheckpointReader) -> str:
    """The key prefix of the model tensors ("" for ``chunk.sharded_state_dict()`` keys)."""
    prefixes = {
        key[: -len(llama.EMBEDDING)]
        for key in reader.keys()
        if key.endswith(llama.EMBEDDING) and "optimizer" not in key
    }
    if "" in prefixes:
        return ""
    if len(prefixes) != 1:
        raise ValueError(
            f"{reader.path}: cannot find the model tensors (keys ending in {llama.EMBEDDING}: "
            f"{sorted(prefixes) or 'none'})"
        )
    return prefixes.pop()


def check_tensors(reader: DistCheckpointReader, prefix: str, model: ModelConfig) -> None:
    """Refuse unrepresentable or unknown model tensors and shapes that contradict the config."""
    model_keys = [
        key[len(prefix) :]
        for key in reader.keys()
        if key.startswith(prefix) and key[len(prefix) :].startswith(_MODEL_ROOTS)
    ]
    reasons = sorted(
        {why for key in model_keys for part, why in _UNREPRESENTABLE.items() if part in key}
    )
    if reasons:
        raise ValueError(
            f"{reader.path} cannot be represented as Llama: it has {', '.join(reasons)}"
        )
    expected = {llama.EMBEDDING, llama.FINAL_NORM, *llama.LAYER_KEYS}
    optional = {llama.OUTPUT_LAYER, llama.FC1 + "_w", llama.FC1 + "_v"}
    unknown = sorted(set(model_keys) - expected - optional)
    if unknown:
        raise ValueError(f"{reader.path} has model tensors this converter does not know: {unknown}")
    if llama.FC1 not in model_keys and {llama.FC1 + "_w", llama.FC1 + "_v"} <= set(model_keys):
        expected = (expected - {llama.FC1}) | {llama.FC1 + "_w", llama.FC1 + "_v"}
    missing = sorted(expected - set(model_keys))
    if model.untie_embeddings_and_output_weights and llama.OUTPUT_LAYER not in model_keys:
        missing.append(llama.OUTPUT_LAYER)
    if missing:
        raise ValueError(f"{reader.path} lacks model tensors {missing}")

    m, a = model, llama.AttentionShape.of(model)
    want = {
        llama.QKV: (m.num_layers, a.qkv_rows, m.hidden_size),
        llama.PROJ: (m.num_layers, m.hidden_size, m.num_attention_heads * m.head_dim),
        llama.FC2: (m.num_layers, m.hidden_size, m.ffn_hidden_size),
        llama.QKV_NORM: (m.num_layers, m.hidden_size),
        llama.FC1_NORM: (m.num_layers, m.hidden_size),
        llama.FINAL_NORM: (m.hidden_size,),
    }
    if llama.FC1 in model_keys:
        want[llama.FC1] = (m.num_layers, 2 * m.ffn_hidden_size, m.hidden_size)
    problems = [
        f"{key} is {reader.shape(prefix + key)}, the config gives {shape}"
        for key, shape in want.items()
        if reader.shape(prefix + key) != shape
    ]
    for key in (llama.EMBEDDING, llama.OUTPUT_LAYER):
        if key in model_keys:
            rows, hidden = reader.shape(prefix + key)
            if rows < m.vocab_size or hidden != m.hidden_size:
                problems.append(
                    f"{key} is {(rows, hidden)}, expected at least {m.vocab_size} rows of "
                    f"{m.hidden_size}"
                )
    if problems:
        raise ValueError(f"{reader.path} does not match its config.yaml: " + "; ".join(problems))


def read_layer(reader: DistCheckpointReader, prefix: str, layer: int) -> dict[str, torch.Tensor]:
    """The stored tensors of one decoder layer (``llama.LAYER_KEYS``, layer axis removed)."""
    stored = {}
    for key in llama.LAYER_KEYS:
        if key == llama.FC1 and not reader.has(prefix + key):
            # Saved with singleton local shards: gate and up halves under separate keys.
            stored[key] = torch.cat(
                [
                    reader.read(prefix + key + "_w", index=layer),
                    reader.read(prefix + key + "_v", index=layer),
                ]
            )
        else:
            stored[key] = reader.read(prefix + key, index=layer)
    return stored


def _write_weights(
    reader: DistCheckpointReader,
    prefix: str,
    model: RunModel,
    output: Path,
    dtype: torch.dtype,
    shard_bytes: int,
) -> None:
    cfg = model.config
    writer = ShardedSafetensorsWriter(output, llama.hf_tensor_shapes(cfg), dtype, shard_bytes)
    # Padded vocabulary rows are never read: only the first vocab_size rows are loaded.
    writer.add(llama.HF_EMBEDDING, reader.read(prefix + llama.EMBEDDING, rows=cfg.vocab_size))
    for layer in range(cfg.num_layers):
        stored = read_layer(reader, prefix, layer)
        for name, tensor in llama.megatron_layer_to_hf(
            stored, layer, cfg, model.norm_offset
        ).items():
            writer.add(name, tensor)
        logger.info("layer %d/%d written", layer + 1, cfg.num_layers)
    final_norm = reader.read(prefix + llama.FINAL_NORM)
    writer.add(llama.HF_FINAL_NORM, final_norm + model.norm_offset)
    if cfg.untie_embeddings_and_output_weights:
        writer.add(llama.HF_LM_HEAD, reader.read(prefix + llama.OUTPUT_LAYER, rows=cfg.vocab_size))
    elif reader.has(prefix + llama.OUTPUT_LAYER):
        embedding = reader.read(prefix + llama.EMBEDDING, rows=cfg.vocab_size)
        if not torch.equal(
            reader.read(prefix + llama.OUTPUT_LAYER, rows=cfg.vocab_size), embedding
        ):
            raise ValueError(
                f"{reader.path}: the config ties embeddings, but output_layer.weight differs from "
                "the embedding"
            )
    writer.finish()


def _export_tokenizer(
    source: Path | None, output: Path, model: ModelConfig
) -> dict[str, int | None]:
    if source is None:
        logger.warning(
            "the run names no tokenizer and none was given: the export has no tokenizer files"
        )
        return {}
    write_hf_tokenizer(source, output)
    from megatron_ext.tokenizer.loading import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(output)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"the tokenizer at {source} has {tokenizer.vocab_size} ids but the model only "
            f"{model.vocab_size}: it is not this model's tokenizer"
        )
    if tokenizer.vocab_size < model.vocab_size:
        logger.warning(
            "tokenizer has %d ids, model vocabulary %d", tokenizer.vocab_size, model.vocab_size
        )
    return {
        "bos_token_id": tokenizer.bos,
        "eos_token_id": tokenizer.eod,
        "pad_token_id": tokenizer.pad,
    }


def _write_configs(output: Path, model: ModelConfig, dtype: str, special: dict) -> None:
    from transformers import GenerationConfig, LlamaConfig

    hf_config = LlamaConfig(**llama.hf_config_dict(model, _HF_DTYPE_NAMES[dtype], **special))
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(output)
    GenerationConfig.from_model_config(hf_config).save_pretrained(output)


def _move_into_place(work: Path, output: Path) -> None:
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(work, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, output)
