"""runtime/llama_selftest.py: llama.cpp is tried in a child process before any model loads here.

The crash cases swap the child for a script that dies by a real SIGSEGV (or decodes), so the parent's
handling of a native crash is tested for real without a broken llama.cpp.
"""

from __future__ import annotations

import json
import sys

import pytest

from recover_lora.cli import main
from recover_lora.errors import RecoverLoraError
from recover_lora.runtime import llama_selftest
from recover_lora.runtime.llama_selftest import EXTRA_BUFTS_ENV, run_child, selftest

# A stand-in for `python -m recover_lora.runtime.llama_selftest --child on|off`: it logs each call, then
# segfaults (a read of address 0, as llama.cpp's AMX kernel did) for the modes in CRASH, else decodes.
FAKE_CHILD = """\
#!{python}
import ctypes, json, os, sys
mode = sys.argv[-1]
with open(os.environ["CALLS"], "a") as f:
    f.write(mode + "\\n")
if mode in os.environ["CRASH"].split(","):
    ctypes.string_at(0)
print(json.dumps({{"text": " there lived"}}))
"""


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    """Factory: fake_child("on") -> the file that logs the child's calls; the child crashes in those modes."""

    def install(crash: str):
        script = tmp_path / "fake-python"
        script.write_text(FAKE_CHILD.format(python=sys.executable))
        script.chmod(0o755)
        calls = tmp_path / "calls.txt"
        monkeypatch.setenv("CALLS", str(calls))
        monkeypatch.setenv("CRASH", crash)
        monkeypatch.setattr(llama_selftest.sys, "executable", str(script))
        monkeypatch.setattr(llama_selftest, "build_key", lambda: f"fake-{crash or 'none'}")
        return calls

    monkeypatch.setenv("RECOVER_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(EXTRA_BUFTS_ENV, raising=False)
    monkeypatch.setattr(llama_selftest, "_decided", None)
    return install


def test_llama_cpp_decodes_here_with_its_defaults():
    # The real child: the default model, a prompt batch and 4 tokens. On an AMX machine with a llama.cpp
    # whose AMX kernels crash this fails, by name: the suite's workers go on.
    on = run_child(True)
    assert on.ok, on
    assert on.text.strip()
    off = run_child(False)
    assert off.ok and off.text == on.text  # the same greedy tokens either way


def test_a_crash_with_extra_buffer_types_falls_back_without_them(fake_child, capsys):
    calls = fake_child("on")
    outcome = selftest()
    assert outcome.extra_buffer_types is False
    assert [r.signal for r in outcome.runs] == ["SIGSEGV", None]
    assert "SIGSEGV" in outcome.notice() and EXTRA_BUFTS_ENV in outcome.notice() and "make install" in outcome.notice()
    # Remembered: the next process asks no child.
    assert selftest().extra_buffer_types is False
    assert calls.read_text().split() == ["on", "off"]
    # What every load in this process then uses, with one line on stderr.
    assert llama_selftest.extra_buffer_types() is False
    assert capsys.readouterr().err.count("\n") == 1


def test_llama_cpp_that_cannot_decode_at_all_is_one_line_and_exit_2(fake_child, capsys):
    fake_child("on,off")
    with pytest.raises(RecoverLoraError, match=r"cannot decode on this machine \(with extra buffer types: SIGSEGV; without extra buffer types: SIGSEGV\).*make install"):
        selftest()
    with pytest.raises(SystemExit) as exit_info:
        main(["selftest"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SIGSEGV" in err


def test_a_build_for_another_cpu_is_named_in_the_error(fake_child, monkeypatch, tmp_path):
    fake_child("on,off")
    monkeypatch.setattr(llama_selftest, "installed_build_info", lambda: {"cpu_flags": ["avx512f", "amx_tile", "sse2"]})
    monkeypatch.setattr(llama_selftest, "cpu_flags", lambda: ["sse2"])
    with pytest.raises(RecoverLoraError, match="built on a CPU with amx_tile, avx512f that this one lacks"):
        selftest()


def test_the_setting_skips_or_forces_and_a_bad_one_is_refused(fake_child, monkeypatch):
    calls = fake_child("on")
    monkeypatch.setenv(EXTRA_BUFTS_ENV, "on")
    assert llama_selftest.extra_buffer_types() is True
    monkeypatch.setattr(llama_selftest, "_decided", None)
    monkeypatch.setenv(EXTRA_BUFTS_ENV, "off")
    assert llama_selftest.extra_buffer_types() is False
    assert not calls.exists()  # no child was asked
    monkeypatch.setattr(llama_selftest, "_decided", None)
    monkeypatch.setenv(EXTRA_BUFTS_ENV, "amx")
    with pytest.raises(RecoverLoraError, match="RECOVER_LORA_EXTRA_BUFTS='amx' is not one of auto, on, off"):
        llama_selftest.extra_buffer_types()


def test_a_child_that_fails_in_python_is_no_verdict(fake_child, tmp_path, monkeypatch):
    script = tmp_path / "broken-python"
    script.write_text(f"#!{sys.executable}\nimport sys\nprint('ModuleNotFoundError: no llama_cpp', file=sys.stderr)\nsys.exit(3)\n")
    script.chmod(0o755)
    monkeypatch.setattr(llama_selftest.sys, "executable", str(script))
    monkeypatch.setattr(llama_selftest, "build_key", lambda: "broken")
    with pytest.raises(RecoverLoraError, match="self-test could not run: ModuleNotFoundError: no llama_cpp"):
        selftest()


def test_load_llama_sets_the_choice_in_llama_cpp_model_params(stories_gateup):
    from recover_lora.runtime.llama import LlamaOptions, load_llama

    for choice in (False, True):
        loaded = load_llama(stories_gateup, options=LlamaOptions(n_ctx=64, threads=1, extra_buffer_types=choice))
        assert loaded.llm.model_params.use_extra_bufts is choice
        loaded.close()
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # put back after the load


def test_the_cached_outcome_names_the_runs(fake_child):
    fake_child("")
    outcome = selftest()
    saved = json.loads(llama_selftest.cache_path(outcome.key).read_text())
    assert saved["extra_buffer_types"] is True and [r["text"] for r in saved["runs"]] == [" there lived"]
    assert outcome.notice() is None  # llama.cpp runs as it would by default: nothing to say
