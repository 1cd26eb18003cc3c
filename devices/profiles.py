"""Device profiles: memory bandwidth and compute rate of a device, each number with unit and source.

The curated profiles live in `devices/profiles.toml`. `recover-lora devices probe` writes measured
profiles (e.g. `host`) as TOML files under the results folder; `load_profiles` merges those over
the curated ones, so a probe never edits the curated file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType as T

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.records import results_dir  # probe profiles live beside the bench records

CURATED_PROFILES = Path(__file__).with_name("profiles.toml")

GB = 1e9  # bytes: bandwidths are in decimal GB/s, as vendors quote them
TFLOP = 1e12
# Every number in a profile table ends with one of these units and has `<stem>_source` beside it.
UNIT_SUFFIXES = ("_GB_per_s", "_TFLOP_per_s")
DEVICE_CLASSES = ("laptop", "desktop", "phone", "sbc", "host")
_STRING_KEYS = ("name", "device_class", "backend", "date")
# Per-ggml-type matrix-vector rates: a table {TYPE = weights per second}, with `matvec_source`.
MATVEC_KEY, MATVEC_STEM = "matvec_weights_per_s", "matvec"


def _unit_stem(key: str) -> str | None:
    for suffix in UNIT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


@dataclass(frozen=True)
class DeviceProfile:
    """One device: peak (and, where known, effective) bandwidth and a compute peak, with sources.

    Example:
        m2 = get_profile("m2"); m2.bandwidth_bytes_per_s  # 1e11
    """

    key: str
    name: str
    device_class: str
    backend: str
    peak_compute_TFLOP_per_s: float
    peak_bandwidth_GB_per_s: float | None = None
    effective_bandwidth_GB_per_s: float | None = None
    # Rate of llama.cpp's quantized-weight dot products where it differs from the float peak
    # (int8 SDOT/dp4a on CPU and CUDA back ends); the weights op group uses it.
    quantized_compute_TFLOP_per_s: float | None = None
    # Rate of llama.cpp's decode attention over the KV cache (per-head F16 dot products and
    # softmax, `devices probe`), in the roofline's attention FLOPs; where present the attention
    # op group uses it instead of the float peak, which it is far below on a CPU.
    attention_compute_TFLOP_per_s: float | None = None
    # `<stem>_source` text for every number, by stem ("peak_bandwidth", ...).
    sources: dict[str, str] = field(default_factory=dict)
    # Other measured numbers (unit in the key), e.g. llama_cpp_decode_bandwidth_GB_per_s.
    extra: dict[str, float] = field(default_factory=dict)
    # Weights per second llama.cpp's matrix-vector kernel of each ggml type sustains on this
    # device (`devices probe`); where present the roofline uses it for that type's weights
    # instead of FLOPs / quantized_compute. Type names (str) are accepted and converted.
    matvec_weights_per_s: dict[T, float] = field(default_factory=dict)
    # runtime.records.machine_identity() of the probed machine; `same_machine` matches records to it.
    fingerprint: dict[str, Any] | None = None
    date: str | None = None
    origin: str = ""  # the file it came from

    def __post_init__(self) -> None:
        where = f"device profile [{self.key}] in {self.origin or 'memory'}"
        if self.device_class not in DEVICE_CLASSES:
            raise RecoverLoraError(f"{where}: device_class {self.device_class!r} must be one of {', '.join(DEVICE_CLASSES)}")
        if self.peak_bandwidth_GB_per_s is None and self.effective_bandwidth_GB_per_s is None:
            raise RecoverLoraError(f"{where}: needs peak_bandwidth_GB_per_s or effective_bandwidth_GB_per_s")
        for key, value in self.numbers().items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise RecoverLoraError(f"{where}: {key}={value!r} must be a positive number")
            stem = _unit_stem(key)
            if not self.sources.get(stem):
                raise RecoverLoraError(f"{where}: {key} has no {stem}_source; every number needs a source")
        object.__setattr__(self, "matvec_weights_per_s", _matvec_rates(self.matvec_weights_per_s, where))
        if self.fingerprint is not None:  # TOML has no null: a field the probe could not read is left out
            object.__setattr__(self, "fingerprint", {k: v for k, v in self.fingerprint.items() if v is not None})
        if self.matvec_weights_per_s and not self.sources.get(MATVEC_STEM):
            raise RecoverLoraError(f"{where}: {MATVEC_KEY} has no {MATVEC_STEM}_source; every number needs a source")

    def numbers(self) -> dict[str, float]:
        """Every number of the profile by its unit-carrying key."""
        values = {
            "peak_compute_TFLOP_per_s": self.peak_compute_TFLOP_per_s,
            "peak_bandwidth_GB_per_s": self.peak_bandwidth_GB_per_s,
            "effective_bandwidth_GB_per_s": self.effective_bandwidth_GB_per_s,
            "quantized_compute_TFLOP_per_s": self.quantized_compute_TFLOP_per_s,
            "attention_compute_TFLOP_per_s": self.attention_compute_TFLOP_per_s,
            **self.extra,
        }
        return {k: v for k, v in values.items() if v is not None}

    def matvec_text(self) -> str:
        """'; matrix-vector G weights/s: Q4_K 50.1, Q2_K 31.2' where the profile has per-type rates, else ''."""
        rates = self.matvec_weights_per_s
        return ("; matrix-vector G weights/s: " + ", ".join(f"{t.name} {r / 1e9:.1f}" for t, r in rates.items())) if rates else ""

    def attention_text(self) -> str:
        """'; attention 24.9 GFLOP/s' where the profile has a measured attention rate, else ''."""
        rate = self.attention_compute_TFLOP_per_s
        return f"; attention {rate * TFLOP / 1e9:.1f} GFLOP/s" if rate is not None else ""

    @property
    def bandwidth_kind(self) -> str:
        return "effective" if self.effective_bandwidth_GB_per_s is not None else "peak"

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """The bandwidth the roofline uses: effective where measured, else the peak."""
        value = self.effective_bandwidth_GB_per_s if self.effective_bandwidth_GB_per_s is not None else self.peak_bandwidth_GB_per_s
        return value * GB

    @property
    def compute_flop_per_s(self) -> float:
        """Float math (attention over the F16 KV cache, activations)."""
        return self.peak_compute_TFLOP_per_s * TFLOP

    @property
    def quantized_compute_flop_per_s(self) -> float:
        """Matrix products with quantized weights: the quantized rate where known, else the float peak."""
        value = self.quantized_compute_TFLOP_per_s if self.quantized_compute_TFLOP_per_s is not None else self.peak_compute_TFLOP_per_s
        return value * TFLOP

    @property
    def attention_flop_per_s(self) -> float:
        """Decode attention over the KV cache: the measured attention rate where known, else the float peak."""
        value = self.attention_compute_TFLOP_per_s if self.attention_compute_TFLOP_per_s is not None else self.peak_compute_TFLOP_per_s
        return value * TFLOP

    @classmethod
    def from_table(cls, key: str, table: dict[str, Any], origin: str = "") -> "DeviceProfile":
        where = f"device profile [{key}] in {origin or 'memory'}"
        sources, numbers, known = {}, {}, {}
        for name, value in table.items():
            if name.endswith("_source"):
                sources[name[: -len("_source")]] = str(value)
            elif name in _STRING_KEYS:
                known[name] = str(value)
            elif name == "fingerprint":
                if not isinstance(value, dict):
                    raise RecoverLoraError(f"{where}: fingerprint must be a table")
            elif name == MATVEC_KEY:
                if not isinstance(value, dict):
                    raise RecoverLoraError(f"{where}: {MATVEC_KEY} must be a table of ggml type = weights/s, e.g. {{Q4_K = 3.2e10}}")
            elif _unit_stem(name) is not None:
                numbers[name] = value
            else:
                raise RecoverLoraError(
                    f"{where}: key {name!r} is neither a known field nor a number with a unit suffix ({', '.join(UNIT_SUFFIXES)})"
                )
        for required in ("name", "device_class", "backend"):
            if required not in known:
                raise RecoverLoraError(f"{where}: missing {required!r}")
        if "peak_compute_TFLOP_per_s" not in numbers:
            raise RecoverLoraError(f"{where}: missing peak_compute_TFLOP_per_s")
        main_keys = (
            "peak_compute_TFLOP_per_s",
            "peak_bandwidth_GB_per_s",
            "effective_bandwidth_GB_per_s",
            "quantized_compute_TFLOP_per_s",
            "attention_compute_TFLOP_per_s",
        )
        return cls(
            key=key,
            name=known["name"],
            device_class=known["device_class"],
            backend=known["backend"],
            peak_compute_TFLOP_per_s=numbers["peak_compute_TFLOP_per_s"],
            peak_bandwidth_GB_per_s=numbers.get("peak_bandwidth_GB_per_s"),
            effective_bandwidth_GB_per_s=numbers.get("effective_bandwidth_GB_per_s"),
            quantized_compute_TFLOP_per_s=numbers.get("quantized_compute_TFLOP_per_s"),
            attention_compute_TFLOP_per_s=numbers.get("attention_compute_TFLOP_per_s"),
            sources=sources,
            extra={k: v for k, v in numbers.items() if k not in main_keys},
            matvec_weights_per_s=table.get(MATVEC_KEY) or {},
            fingerprint=table.get("fingerprint"),
            date=known.get("date"),
            origin=origin,
        )

    def to_table(self) -> dict[str, Any]:
        """The TOML table for this profile (inverse of `from_table`)."""
        table: dict[str, Any] = {"name": self.name, "device_class": self.device_class, "backend": self.backend}
        if self.date:
            table["date"] = self.date
        for key, value in self.numbers().items():
            table[key] = float(value)
            table[f"{_unit_stem(key)}_source"] = self.sources[_unit_stem(key)]
        if self.matvec_weights_per_s:
            table[MATVEC_KEY] = {t.name: float(rate) for t, rate in self.matvec_weights_per_s.items()}
            table[f"{MATVEC_STEM}_source"] = self.sources[MATVEC_STEM]
        if self.fingerprint:
            table["fingerprint"] = dict(self.fingerprint)
        return table


def _matvec_rates(rates: dict, where: str) -> dict[T, float]:
    """{'Q4_K' or T.Q4_K: weights/s} -> {T.Q4_K: weights/s}; unknown types and rates <= 0 are errors."""
    from recover_lora.export.policy import parse_ggml_type

    checked: dict[T, float] = {}
    for name, rate in rates.items():
        try:
            ggml_type = name if isinstance(name, T) else parse_ggml_type(str(name))
        except RecoverLoraError:
            raise RecoverLoraError(f"{where}: {MATVEC_KEY} names unknown ggml type {name!r}; use names like Q4_K, Q2_K, Q6_K, Q8_0, F16") from None
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
            raise RecoverLoraError(f"{where}: {MATVEC_KEY}[{ggml_type.name}]={rate!r} must be a positive number of weights per second")
        checked[ggml_type] = float(rate)
    return checked


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecoverLoraError(f"{path} is not valid TOML: {e}") from None


def load_profiles(extra_dirs: list[Path] | None = None) -> dict[str, DeviceProfile]:
    """Curated profiles, then every `*.toml` profile file in the results folder (later wins).

    Example:
        sorted(load_profiles())  # ['jetson-orin-nano', ..., 'm4-max', 'raspberry-pi-5', ...]
    """
    profiles: dict[str, DeviceProfile] = {}
    files = [CURATED_PROFILES]
    for folder in [results_dir(), *(extra_dirs or [])]:
        if folder.is_dir():
            files += sorted(folder.glob("*.toml"))
    for path in files:
        for key, table in _read_toml(path).items():
            if not isinstance(table, dict):
                raise RecoverLoraError(f"{path}: top-level key {key!r} must be a [profile] table")
            profiles[key.lower()] = DeviceProfile.from_table(key.lower(), table, origin=str(path))
    return profiles


def get_profile(name: str) -> DeviceProfile:
    """A profile by key (case-insensitive); the error lists the known keys."""
    profiles = load_profiles()
    profile = profiles.get(name.strip().lower())
    if profile is None:
        hint = " (run `recover-lora devices probe` to measure this machine)" if name.strip().lower() == "host" else ""
        raise RecoverLoraError(f"unknown device {name!r}{hint}; known devices: {', '.join(sorted(profiles))}")
    return profile


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):  # an inline table of bare keys (ggml type names)
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def profile_toml(profile: DeviceProfile) -> str:
    """TOML text of one profile (flat values and one `fingerprint` sub-table; tomllib reads it back)."""
    table = profile.to_table()
    fingerprint = table.pop("fingerprint", None)
    lines = [f"[{profile.key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    if fingerprint:
        lines += ["", f"[{profile.key}.fingerprint]"] + [f"{k} = {_toml_value(v)}" for k, v in fingerprint.items()]
    return "\n".join(lines) + "\n"
