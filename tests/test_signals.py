"""A killed `recover-lora export` (SIGTERM, Ctrl-C) leaves nothing behind in the output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Big enough that each phase lasts a noticeable time on a busy 2-core machine, small enough to stay quick:
# 8 layers of 512 wide, 8k vocabulary -> ~32M weights, a 125 MB F32 work file.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
PHASE_TIMEOUT_S = 120  # the export itself takes seconds; this only bounds a hung test


def wait_for(predicate, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"export ended (exit {process.returncode}) before {what} was seen: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what} never appeared")
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase, signum, exit_code",
    [
        ("work-folder", signal.SIGTERM, 143),  # Python is writing the full-precision work file
        ("quantizer", signal.SIGTERM, 143),  # inside llama.cpp's quantizer (a C call): handled when it returns
        ("quantizer", signal.SIGINT, 130),  # Ctrl-C
    ],
)
def test_killed_export_leaves_nothing(tmp_path, phase, signum, exit_code):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.gguf"
    process = subprocess.Popen(
        [sys.executable, "-m", "recover_lora", "export", str(config), "--random-weights", "-o", str(out), "--policy", "w4",
         "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    names = lambda: [entry.name for entry in os.scandir(out_dir)]  # noqa: E731
    if phase == "work-folder":
        wait_for(lambda: any(n.startswith(".recover-lora-") for n in names()), process, "the work folder")
    else:  # llama.cpp opened the temporary output: the quantizer is running
        quantizing = lambda: any(n.startswith(".model.gguf.") and n.endswith(".tmp") for n in names())  # noqa: E731
        wait_for(quantizing, process, "the quantizer's output")
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=PHASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the export did not exit after the signal")
    assert process.returncode == exit_code, stderr
    if signum == signal.SIGTERM:
        assert stderr.strip().splitlines()[-1] == "terminated"
    assert names() == []  # no output, no .model.gguf.PID.tmp, no .recover-lora-* folder, no quantizer log
