"""`devices calibrate`: the roofline's predictions against measured llama.cpp decode speed.

Data flows one way: `recover-lora bench` (runtime/) writes JSON records into the results folder;
this module reads them through runtime/records.py, which owns their schema and the machine
identity. For every decode measurement whose GGUF is still on disk it prints predicted vs
measured tokens/s, the bytes/s the run sustained (roofline bytes per token of that file x
measured tokens/s) as a fraction of the profile's bandwidth, and, for same-shape files exported
with `w4` and `gateup` at the same depth, the measured GateUp/W4 ratio next to the predicted one.

A record is compared only with a profile of the back end it ran on (the first word of the
profile's `backend`: a probed profile is "CPU (N threads)"), so GPU-offloaded runs never meet a
CPU-probed profile; and, unless asked otherwise, only with a profile of the machine it ran on
(`runtime.records.same_machine`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

from recover_lora.devices.profiles import GB, DeviceProfile
from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.records import BenchRecord, read_results, same_machine


def ran_on_profile_backend(record: BenchRecord, profile: DeviceProfile) -> bool:
    """The record ran on the back end the profile describes ("CPU (2 threads)" -> CPU, "Metal GPU" -> Metal)."""
    return record.backend.lower() == (profile.backend.split() or [""])[0].lower()


@dataclass
class CalibrationRow:
    model: str
    policy: str | None
    adapter: str | None
    depth: int
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    bytes_per_token: float
    measured_GB_per_s: float
    fraction_of_bandwidth: float
    threads: int | None = None
    load_1min: float | None = None

    @property
    def measured_over_predicted(self) -> float:
        return self.measured_tokens_per_s / self.predicted_tokens_per_s


@dataclass
class PolicyRatio:
    shape: str
    depth: int
    measured: float
    predicted: float
    # "interleaved": median of per-repeat ratios from one `bench --compare w4 gateup` run;
    # "medians": ratio of median tokens/s across separate runs.
    method: str


@dataclass
class CalibrationReport:
    rows: list[CalibrationRow] = field(default_factory=list)
    ratios: list[PolicyRatio] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "rows": [{**asdict(r), "measured_over_predicted": r.measured_over_predicted} for r in self.rows],
            "gateup_over_w4": [asdict(r) for r in self.ratios],
            "skipped": self.skipped,
        }


def calibrate(folder: Path, profile: DeviceProfile, same_machine_only: bool = True) -> CalibrationReport:
    """Compare every usable bench record in `folder` with the roofline on `profile`.

    Example:
        report = calibrate(results_dir(), get_profile("host"))
        report.rows[0].measured_over_predicted   # e.g. 0.7: llama.cpp reaches 70 % of the roofline
    """
    from recover_lora.devices.roofline import AdapterFile, estimate, token_cost
    from recover_lora.devices.shapes import FILE_POLICY, identify_policy, load_model_shape

    report = CalibrationReport()
    records = read_results(folder)
    if not records:
        raise RecoverLoraError(f"no decode records in {folder}; run `recover-lora bench MODEL.gguf` first")
    shapes: dict = {}
    pairs: dict[tuple, dict[str, list]] = {}
    for record in records:
        if not ran_on_profile_backend(record, profile):
            report.skipped.append(f"{record.origin}: ran on {record.backend} (gpu_layers {record.gpu_layers}), profile {profile.key} is {profile.backend}")
            continue
        if same_machine_only and profile.fingerprint and not same_machine(record.fingerprint, profile.fingerprint):
            report.skipped.append(f"{record.origin}: measured on another machine ({(record.fingerprint or {}).get('cpu_model', '?')})")
            continue
        if not Path(record.model_path).is_file() or (record.adapter_path and not Path(record.adapter_path).is_file()):
            report.skipped.append(f"{record.origin}: {record.model_path} (or its adapter) is no longer on disk")
            continue
        shape = shapes.get(record.model_path) or load_model_shape(record.model_path)
        shapes[record.model_path] = shape
        adapter = AdapterFile.read(record.adapter_path) if record.adapter_path else None
        cost = token_cost(shape, FILE_POLICY, record.depth, adapter=adapter)
        predicted = estimate(cost, profile, adapter is not None)
        measured_bytes_per_s = cost.bytes * record.decode_tokens_per_s
        policy = identify_policy(shape)
        report.rows.append(
            CalibrationRow(
                model=Path(record.model_path).name,
                policy=policy,
                adapter=None if adapter is None else Path(adapter.path).name,
                depth=record.depth,
                measured_tokens_per_s=record.decode_tokens_per_s,
                predicted_tokens_per_s=predicted.decode_tokens_per_s,
                bytes_per_token=cost.bytes,
                measured_GB_per_s=measured_bytes_per_s / GB,
                fraction_of_bandwidth=measured_bytes_per_s / profile.bandwidth_bytes_per_s,
                threads=record.threads,
                load_1min=record.load_1min,
            )
        )
        if policy in ("w4", "gateup") and adapter is None:
            c = cost.config  # same geometry = same model shape, padded alike
            dims = (c.model_type, c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.vocab_size)
            pairs.setdefault((dims, record.depth), {}).setdefault(policy, []).append((record, predicted.decode_tokens_per_s))
    for (dims, depth), by_policy in pairs.items():
        if "w4" not in by_policy or "gateup" not in by_policy:
            continue
        w4, gateup = by_policy["w4"], by_policy["gateup"]
        w4_variants = {(r.run_id, r.variant) for r, _ in w4}
        interleaved = [
            r.decode_ratio_vs_baseline
            for r, _ in gateup
            if r.decode_ratio_vs_baseline is not None and (r.run_id, r.baseline_variant) in w4_variants
        ]
        if interleaved:
            measured, method = median(interleaved), "interleaved"
        else:
            measured = median(r.decode_tokens_per_s for r, _ in gateup) / median(r.decode_tokens_per_s for r, _ in w4)
            method = "medians"
        report.ratios.append(
            PolicyRatio(f"{dims[0]} {dims[1]} layers, hidden {dims[2]}", depth, measured, gateup[0][1] / w4[0][1], method)
        )
    return report


def format_calibration(report: CalibrationReport, profile: DeviceProfile) -> str:
    lines = [
        f"roofline on {profile.key}: {profile.bandwidth_bytes_per_s / GB:.2f} GB/s ({profile.bandwidth_kind}), "
        f"{profile.compute_flop_per_s / 1e12:.3f} TFLOP/s{profile.matvec_text()}{profile.attention_text()}",
        "",
        f"{'model':<32} {'policy':<7} {'adapter':<10} {'depth':>6} {'measured':>9} {'predicted':>9} {'meas/pred':>9} "
        f"{'GB/s':>7} {'of BW':>6} {'thr':>4} {'load':>5}",
    ]
    for r in report.rows:
        lines.append(
            f"{r.model[:32]:<32} {r.policy or '-':<7} {(r.adapter or '-')[:10]:<10} {r.depth:>6} {r.measured_tokens_per_s:>9.2f} "
            f"{r.predicted_tokens_per_s:>9.2f} {r.measured_over_predicted:>9.3f} {r.measured_GB_per_s:>7.2f} {r.fraction_of_bandwidth:>6.0%} "
            f"{r.threads if r.threads is not None else '-':>4} {r.load_1min if r.load_1min is not None else '-':>5}"
        )
    if report.ratios:
        lines += ["", "GateUp/W4 decode ratio (same shape, same depth, no adapter):"]
        for q in report.ratios:
            lines.append(f"  {q.shape} depth {q.depth}: measured {q.measured:.3f} ({q.method}), predicted {q.predicted:.3f}")
    if report.skipped:
        lines += ["", f"skipped {len(report.skipped)} record(s): " + "; ".join(report.skipped[:3]) + (" ..." if len(report.skipped) > 3 else "")]
    if not report.rows:
        lines += ["", "no record could be compared (see skipped); pass --all-machines to use other machines' records"]
    return "\n".join(lines)
