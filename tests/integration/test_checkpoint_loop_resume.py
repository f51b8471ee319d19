"""The training loop end to end: exact resume after SIGKILL, and SIGTERM preemption.

Run A trains 30 steps with a checkpoint every 10. Run B is the same command, killed with SIGKILL
at step 24 and started again: it resumes from step 20, and its losses and gradient norms from step
21 on equal A's bit for bit. Run C gets SIGTERM during training: it saves at the step it is on,
exits 0, and the next start continues from there to the same numbers as A. Run D is B with
checkpoints written in the background (``checkpoint.async_save``). Run E stops at step 10 and its
checkpoint's config is edited to look written by an earlier megatron_ext, without two fields:
the resume is refused while the run sets one of them to a non-default value, and continues to
A's numbers once only a field at its default is missing. Run F stops at step 10; its dataset is
then rewritten in place, and the resume is refused; the original files copied to another path
resume it to A's numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
TRAIN_STEPS, INTERVAL = 30, 10


def _write_dataset(prefix: Path, seed: int = 0) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(400):
        # Ids below the tiny config's vocabulary of 2,048.
        document = rng.integers(1, 2000, size=int(rng.integers(20, 300)))
        builder.add_document(document, [len(document)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _command(run_dir: Path, data: str, extra: tuple[str, ...]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_ext.train",
        "--config",
        str(CONFIG),
        f"--run_dir={run_dir}",
        f"--checkpoint.interval={INTERVAL}",
        f"--schedule.train_steps={TRAIN_STEPS}",
        "--schedule.lr_warmup_steps=5",
        f"--data.data_path=[{data}]",
        # One process: the layout does not matter for exact resume, and it is the fastest.
        "--parallel.device=cpu",
        "--parallel.tensor_model_parallel_size=1",
        "--parallel.pipeline_model_parallel_size=1",
        "--parallel.sequence_parallel=false",
        "--tokenizer.tokenizer_type=none",
        "--monitoring.wandb=false",
        "--monitoring.tensorboard=false",
        *extra,
    ]


def _start(run_dir: Path, data: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    with open(run_dir.with_suffix(".log"), "a") as log:
        return subprocess.Popen(
            _command(run_dir, data, extra), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _log(run_dir: Path) -> str:
    path = run_dir.with_suffix(".log")
    return path.read_text()[-6000:] if path.exists() else ""


def _metrics(run_dir: Path) -> dict[int, dict]:
    """The last record of every step (a resumed run logs the steps after its checkpoint again)."""
    path = run_dir / "metrics.jsonl"
    rows: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by SIGKILL
                if "step" in row and "loss" in row:
                    rows[row["step"]] = row
    return rows


def _run_to_end(
    run_dir: Path, data: str, extra: tuple[str, ...] = (), timeout: float = 400
) -> None:
    proc = _start(run_dir, data, extra)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        proc.kill()
    assert code == 0, _log(run_dir)


def _signal_at(proc: subprocess.Popen, run_dir: Path, step: int, sig: int) -> None:
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}:\n{_log(run_dir)}")
        if max(_metrics(run_dir), default=0) >= step:
            proc.send_signal(sig)
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"step {step} not reached:\n{_log(run_dir)}")


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    data = _write_dataset(root / "tokens")
    run_a = root / "A"
    _run_to_end(run_a, data)
    metrics = _metrics(run_a)
    assert sorted(metrics) == list(range(1, TRAIN_STEPS + 1))
    return root, data, metrics


@pytest.mark.timeout(900)
def test_checkpoint_exact_resume_after_sigkill(reference):
    root, data, expected = reference
    run_b = root / "B"
    proc = _start(run_b, data)
    _signal_at(proc, run_b, 24, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = max(_metrics(run_b))
    assert 24 <= killed_at < TRAIN_STEPS
    assert _latest(run_b) == "iter_0000020"

    _run_to_end(run_b, data)
    resumed = _metrics(run_b)
    for step in range(21, TRAIN_STEPS + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step
        assert resumed[step]["consumed_tokens"] == expected[step]["consumed_tokens"], step
    assert _latest(run_b) == f"iter_{TRAIN_STEPS:07d}"


@pytest.mark.timeout(900)
def test_checkpoint_sigterm_saves_and_resumes(reference):
    root, data, expected = reference
    run_c = root / "C"
    proc = _start(run_c, data)
    _signal_at(proc, run_c, 5, signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, _log(run_c)
    stopped_at = max(_metrics(run_c))
    assert stopped_at < TRAIN_STEPS
    assert _latest(run_c) == f"iter_{stopped_at:07d}"
    run_state = json.loads((run_c / "checkpoints" / _latest(run_c) / "run_state.json").read_text())
    assert run_state["step"] == stopped_at

    _run_to_end(run_c, data)
    resumed = _metrics(run_c)
    assert sorted(resumed) == list(range(1, TRAIN_STEPS + 1))
    for step in range(stopped_at + 1, TRAIN_STEPS + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step


@pytest.mark.timeout(900)
def test_async_checkpoint_exact_resume_after_sigkill(reference):
    root, data, expected = reference
    run_d = root / "D"
    background = ("--checkpoint.async_save=true",)
    proc = _start(run_d, data, background)
    _signal_at(proc, run_d, 24, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # The save of step 20 is published at the first step boundary after its writer finished.
    resumed_from = _latest(run_d)
    assert resumed_from in ("iter_0000010", "iter_0000020")

    _run_to_end(run_d, data, background)
    resumed = _metrics(run_d)
    for step in range(int(resumed_from.removeprefix("iter_")) + 1, TRAIN_STEPS + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step
        assert resumed[step]["consumed_tokens"] == expected[step]["consumed_tokens"], step
    # The last save is published before the run exits; retention (keep_last: 2) ran on publishing
    # and no unpublished directory is left.
    assert _latest(run_d) == f"iter_{TRAIN_STEPS:07d}"
    saved = sorted(p.name for p in (run_d / "checkpoints").iterdir() if p.is_dir())
    assert saved == ["iter_0000020", "iter_0000030"]


@pytest.mark.timeout(900)
def test_checkpoint_of_an_earlier_version_resumes_with_added_fields_at_their_defaults(reference):
    root, data, expected = reference
    run_e = root / "E"
    _run_to_end(run_e, data, ("--training.exit_after_steps=10",))
    assert _latest(run_e) == "iter_0000010"
    config_file = run_e / "checkpoints" / "iter_0000010" / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    # As if both fields were added after the checkpoint was written: the run keeps adam_eps at its
    # default and sets lr_warmup_steps (to 5, the default is 20).
    del saved["optimizer"]["adam_eps"]
    warmup = saved["schedule"].pop("lr_warmup_steps")
    config_file.write_text(yaml.safe_dump(saved))
    # Nor did checkpoint.json record the padded vocabulary: it is read from the stored tensors.
    from megatron_ext.checkpoint.manager import _stored_vocab_rows

    meta_file = config_file.with_name("checkpoint.json")
    meta = json.loads(meta_file.read_text())
    assert meta.pop("padded_vocab_size") == _stored_vocab_rows(str(config_file.parent)) == 2048
    meta_file.write_text(json.dumps(meta))

    proc = _start(run_e, data)
    assert proc.wait(timeout=300) != 0
    log = _log(run_e)
    assert "schedule.lr_warmup_steps=5: differs from '<absent>'" in log, log
    assert "optimizer.adam_eps=" not in log, log

    saved["schedule"]["lr_warmup_steps"] = warmup
    config_file.write_text(yaml.safe_dump(saved))
    _run_to_end(run_e, data)
    full_log = run_e.with_suffix(".log").read_text()
    assert "optimizer.adam_eps: '<absent>' -> 1e-08 (a field added after" in full_log
    resumed = _metrics(run_e)
    for step in range(11, TRAIN_STEPS + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step


def _copy_dataset(prefix: str, to: Path) -> str:
    to.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, str(to) + suffix)
    return str(to)


@pytest.mark.timeout(900)
def test_resume_follows_the_data_by_content_not_by_path(reference):
    from megatron_ext.data.fingerprint import dataset_fingerprint

    root, data, expected = reference
    run_f = root / "F"
    first_place = _copy_dataset(data, root / "F_scratch" / "tokens")
    _run_to_end(run_f, first_place, ("--training.exit_after_steps=10",))
    assert _latest(run_f) == "iter_0000010"
    run_state = json.loads((run_f / "checkpoints" / _latest(run_f) / "run_state.json").read_text())
    assert run_state["data"] == [dataset_fingerprint(data)]

    # Preprocessed again into the same place: same path, other tokens.
    _write_dataset(Path(first_place), seed=1)
    proc = _start(run_f, first_place)
    assert proc.wait(timeout=300) != 0
    log = _log(run_f)
    assert "data.data_path=" in log and "dataset 0 holds other data" in log, log
    assert "allow_changes='[data.data_path]'" in log, log

    # The files trained on, copied to another filesystem: the run goes on as if never moved.
    second_place = _copy_dataset(data, root / "F_nvme" / "tokens")
    _run_to_end(run_f, second_place)
    full_log = run_f.with_suffix(".log").read_text()
    assert "resume reads the same datasets from another place" in full_log
    resumed = _metrics(run_f)
    for step in range(11, TRAIN_STEPS + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step


@pytest.mark.timeout(900)
def test_an_allowed_change_of_learning_rate_and_adam_settings_takes_effect(reference):
    """The optimizer's param groups come back from the checkpoint with the saving run's
    settings; a resume that allows changing them trains with the new ones."""
    root, data, expected = reference
    run_g = root / "G"
    _run_to_end(run_g, data, ("--training.exit_after_steps=10",))
    lr = yaml.safe_load(CONFIG.read_text())["schedule"]["lr"]
    changes = (
        f"--schedule.lr={lr / 2}",
        "--optimizer.adam_beta2=0.5",
        "--checkpoint.allow_changes=[schedule.lr,optimizer.adam_beta2]",
        "--training.exit_after_steps=3",
    )
    _run_to_end(run_g, data, changes)
    resumed = _metrics(run_g)
    # Peak and floor halved: the whole cosine curve is halved.
    for step in (11, 12, 13):
        assert resumed[step]["lr"] == pytest.approx(expected[step]["lr"] / 2, rel=1e-6), step
    # Step 11 ran on the weights of step 10 either way; its update (half the LR, beta2 = 0.5)
    # makes step 12 differ from the uninterrupted run.
    assert resumed[11]["loss"] == expected[11]["loss"]
    assert resumed[12]["loss"] != expected[12]["loss"]
