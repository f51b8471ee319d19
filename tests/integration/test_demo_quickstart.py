"""The README's main job, shortened: built-in corpus -> curation -> tokenizer -> .bin/.idx ->
training under torchrun on 2 CPU processes; the loss must fall well below its start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_chain_trains_and_loss_falls(tmp_path):
    work = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [
            sys.executable,
            "examples/quickstart.py",
            "--work-dir",
            str(work),
            "--nproc",
            "2",
            "--steps",
            "60",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.8 * first, (first, last)
    assert (work / "tokenizer/tokenizer.json").exists()
    assert list((work / "run/checkpoints").glob("iter_0000060"))
    assert "=== 6. summary" in result.stdout
    # The checkpoint knows its tokenizer by content: a copied work directory resumes.
    from megatron_ext.tokenizer import load_tokenizer

    state = json.loads((work / "run/checkpoints/iter_0000060/run_state.json").read_text())
    tokenizer = load_tokenizer("SentencePieceTokenizer", str(work / "tokenizer"))
    assert state["tokenizer"] == tokenizer.fingerprint()
