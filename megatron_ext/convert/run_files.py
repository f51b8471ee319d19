"""What a converter needs from a run besides tensors: the model config and the training tokenizer.

A checkpoint directory ``<run>/checkpoints/iter_NNNNNNN/`` holds ``config.yaml``, the resolved
experiment config (``model`` section = ``ModelConfig`` fields). The tokenizer is found, in order,
at an explicit path, at the path named in the config (``tokenizer`` or ``data`` section, keys
``tokenizer_model``, ``tokenizer_path``, ``tokenizer_dir`` or ``model_path``), or in a
``tokenizer/`` directory next to the checkpoint or in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_ext.config.errors import ConfigError
from megatron_ext.config.loader import from_dict
from megatron_ext.models.config import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_TOKENIZER_SECTIONS = ("tokenizer", "data")
_TOKENIZER_KEYS = ("tokenizer_model", "tokenizer_path", "tokenizer_dir", "model_path")

# Megatron-LM spellings of architecture switches a config may carry. Values other than the
# Llama ones cannot be written as a LlamaForCausalLM.
_LLAMA_VALUES = {
    "normalization": ("RMSNorm",),
    "add_bias_linear": (False,),
    "add_qkv_bias": (False,),
    "qk_layernorm": (False,),
    "position_embedding_type": ("rope",),
    "rotary_percent": (1.0,),
    "gated_linear_unit": (True,),
    "swiglu": (True,),
    "num_moe_experts": (None, 0, 1),
    "rope_scaling": (None, False),
}
# Stored norm weights are gamma - 1 when one of these is true.
_NORM_OFFSET_KEYS = ("apply_layernorm_1p", "layernorm_zero_centered_gamma")


@dataclass(frozen=True)
class RunModel:
    """The model of a checkpoint: its config and how its norm weights are stored."""

    config: ModelConfig
    norm_offset: float


def checkpoint_config_file(checkpoint_dir: Path) -> Path:
    """``config.yaml`` of a checkpoint (in its directory, else in its run directory)."""
    for candidate in (
        checkpoint_dir / CONFIG_FILE,
        checkpoint_dir.parent / CONFIG_FILE,
        checkpoint_dir.parent.parent / CONFIG_FILE,
    ):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"no {CONFIG_FILE} in {checkpoint_dir} or its run directory: the model shape is unknown"
    )


def read_config(checkpoint_dir: Path) -> tuple[dict, Path]:
    path = checkpoint_config_file(checkpoint_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} has no `model` section")
    return data, path


def run_model(config: dict, source: Path) -> RunModel:
    """Parse the ``model`` section; refuse non-Llama architecture switches."""
    section = dict(config["model"])
    problems = []
    for key, allowed in _LLAMA_VALUES.items():
        if key in section:
            value = section.pop(key)
            if value not in allowed:
                problems.append(f"model.{key}={value!r} (a LlamaForCausalLM needs {allowed[0]!r})")
    if problems:
        raise ValueError(f"{source}: cannot be represented as Llama: " + "; ".join(problems))
    norm_offset = 0.0
    for key in _NORM_OFFSET_KEYS:
        if section.pop(key, False):
            norm_offset = 1.0
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(
            f"{source}: unknown model fields {unknown}; they may change the architecture, "
            "so the checkpoint is not converted"
        )
    try:
        model = from_dict(ModelConfig, section)
    except ConfigError as exc:
        raise ValueError(f"{source}: invalid model section: {exc}") from exc
    return RunModel(config=model, norm_offset=norm_offset)


def find_tokenizer_dir(
    checkpoint_dir: Path, config: dict, explicit: str | os.PathLike | None = None
) -> Path | None:
    """Directory (or file) of the training tokenizer, or None when the run names none."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise ValueError(f"tokenizer path {path} does not exist")
        return path
    for section in _TOKENIZER_SECTIONS:
        values = config.get(section)
        if not isinstance(values, dict):
            continue
        for key in _TOKENIZER_KEYS:
            value = values.get(key)
            if isinstance(value, str) and value:
                for path in _candidate_paths(value, checkpoint_dir, config):
                    if path.exists():
                        return path
                raise ValueError(
                    f"the run's {section}.{key} names {value}, which does not exist; "
                    "pass the tokenizer explicitly"
                )
    for candidate in (checkpoint_dir / TOKENIZER_DIR, checkpoint_dir.parent.parent / TOKENIZER_DIR):
        if candidate.is_dir():
            return candidate
    return None


def _candidate_paths(value: str, checkpoint_dir: Path, config: dict) -> list[Path]:
    """``value`` as given, and, when relative, from where training ran.

    Configs hold paths relative to the directory training was started in; that directory is the
    run directory with the config's (relative) ``run_dir`` taken off its end.
    """
    path = Path(value)
    if path.is_absolute():
        return [path]
    candidates = [path]
    run_dir = config.get("run_dir")
    actual_run = checkpoint_dir.resolve().parent.parent
    if isinstance(run_dir, str) and run_dir and not Path(run_dir).is_absolute():
        parts = Path(run_dir).parts
        if actual_run.parts[-len(parts) :] == parts:
            candidates.append(actual_run.parents[len(parts) - 1] / path)
    return candidates


def encoding_as_trained(directory: Path) -> list[str]:
    """Make the tokenizer files in ``directory`` encode text as preprocessing did; returns what
    changed.

    Preprocessing encodes every document without special tokens and reads a literal ``<s>`` in
    the text as text. A Hugging Face tokenizer whose template adds a BOS (Llama's, Mistral's)
    would put an id the model never saw in front of every prompt, and would read ``<s>`` in a
    prompt as the control token. So the template (``post_processor``) is dropped,
    ``add_bos_token`` / ``add_eos_token`` are turned off and ``split_special_tokens`` on.
    """
    changed = []
    path = directory / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer.get("post_processor") is not None:
        tokenizer["post_processor"] = None
        path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8")
        changed.append("tokenizer.json: post_processor dropped")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    wanted = {"add_bos_token": False, "add_eos_token": False, "split_special_tokens": True}
    updates = {k: v for k, v in wanted.items() if config.get(k) != v}
    if updates:
        config.update(updates)
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        changed.append(
            "tokenizer_config.json: " + ", ".join(f"{k}={v}" for k, v in updates.items())
        )
    return changed


def write_hf_tokenizer(source: Path, output_dir: Path) -> list[str]:
    """Put the Hugging Face fast-tokenizer files of ``source`` into ``output_dir``.

    ``source`` is a directory with ``tokenizer.json`` (copied with its config files and any
    ``tokenizer.model``, then set to encode as preprocessing did: ``encoding_as_trained``), or a
    SentencePiece ``.model`` file / a directory holding ``tokenizer.model`` (exported with the
    same ids by ``megatron_ext.tokenizer``).
    """
    directory = source if source.is_dir() else source.parent
    if (directory / "tokenizer.json").is_file() and source.suffix != ".model":
        written = []
        for name in (*HF_TOKENIZER_FILES, "tokenizer.model"):
            if (directory / name).is_file():
                shutil.copyfile(directory / name, output_dir / name)
                written.append(str(output_dir / name))
        for change in encoding_as_trained(output_dir):
            logger.info("exported tokenizer set to encode as preprocessing did: %s", change)
        return written
    model_file = source if source.is_file() else directory / "tokenizer.model"
    if not model_file.is_file():
        raise ValueError(f"{source} holds neither tokenizer.json nor a SentencePiece model")
    from megatron_ext.tokenizer.hf_export import export_hf_tokenizer

    written = export_hf_tokenizer(model_file, output_dir)
    shutil.copyfile(model_file, output_dir / "tokenizer.model")
    return [*written, str(output_dir / "tokenizer.model")]
