"""CLI of the devices stage: `roofline`, `plan` (memory), and `devices list|show|probe|calibrate` (heavy imports inside)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from recover_lora.errors import RecoverLoraError

DEFAULT_CONTEXTS = "0,1024,4096,16384,32768"

devices_app = typer.Typer(help="Device profiles: list, show, probe this machine, calibrate the roofline.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("roofline")(roofline_command)
    app.command("plan")(plan_command)
    app.add_typer(devices_app, name="devices")


def parse_contexts(text: str) -> list[int]:
    """'0,1024, 4096' -> [0, 1024, 4096]; anything else is a one-line error."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise RecoverLoraError(f"--ctx {text!r} must be comma-separated non-negative integers, e.g. 0,1024,4096")
    return sorted(set(values))


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _adapter(rank: int, modules: str, ggml_type: str):
    from recover_lora.devices.roofline import AdapterSpec
    from recover_lora.export.policy import parse_ggml_type

    if rank == 0:
        return None
    if rank < 0:
        raise RecoverLoraError(f"--adapter-rank {rank} must be >= 0 (0 = no adapter)")
    # Short names as in `recover-lora recover` (gate, up, ...) or llama.cpp names (ffn_gate, ...).
    short = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
             "down": "ffn_down"}
    names = tuple(short.get(m, m) for m in _split(modules))
    return AdapterSpec(rank=rank, modules=names, ggml_type=parse_ggml_type(ggml_type))


def format_table(rows, shape, profile) -> str:
    """The roofline table as text: one line per (context, policy)."""
    config = shape.config
    lines = [
        f"{shape.name}: {config.model_type}, {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_heads}/{config.num_kv_heads} heads x {config.head_dim}",
        f"{profile.key} ({profile.name}, {profile.backend}): {profile.bandwidth_bytes_per_s / 1e9:.2f} GB/s "
        f"({profile.bandwidth_kind} bandwidth), {profile.compute_flop_per_s / 1e12:.3f} TFLOP/s{profile.matvec_text()}{profile.attention_text()}",
        "",
        f"{'ctx':>7}  {'policy':<8} {'weights MB/tok':>14} {'KV MB/tok':>10} {'decode tok/s':>12} {'x w4':>7} {'prefill tok/s':>13}  bound",
    ]
    for r in rows:
        lines.append(
            f"{r.ctx:>7}  {r.policy:<8} {r.weight_bytes_per_token / 1e6:>14.1f} {r.kv_bytes_per_token / 1e6:>10.1f} "
            f"{r.decode_tokens_per_s:>12.2f} {r.ratio_to_w4:>7.3f} {r.prefill_tokens_per_s:>13.1f}  {r.decode_bound}"
        )
    return "\n".join(lines)


def roofline_command(
    model: Optional[str] = typer.Option(None, "--model", help="Bundled shape (qwen3-4b, llama-3.1-8b, qwen3-14b, mistral-small-22b, phi-3-mini, phi-4-mini), a config.json or folder, or a .gguf [default: qwen3-4b]"),
    device: Optional[str] = typer.Option(None, "--device", help="Device profile (see `recover-lora devices list`) [default: m2]"),
    ctx: str = typer.Option(DEFAULT_CONTEXTS, "--ctx", help="Comma-separated context depths (tokens already in the KV cache)"),
    policy: str = typer.Option("w4,gateup", "--policy", help="Comma-separated policies (w4, gateup, gate, up, down, mlp, w2; 'file' = a GGUF's own types)"),
    adapter_rank: int = typer.Option(0, "--adapter-rank", help="LoRA rank to add (0 = no adapter)"),
    adapter_modules: str = typer.Option("gate,up", "--adapter-modules", help="Adapted linears: q,k,v,qkv,o,gate,up,down (Phi-3: qkv fused, up = gate+up)"),
    adapter_type: str = typer.Option("F16", "--adapter-type", help="Adapter tensor type: F16, BF16 or F32"),
    kv_type: str = typer.Option("F16", "--kv-type", help="KV-cache type (llama.cpp default F16; Q8_0 with -ctk/-ctv q8_0)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of tokens/s vs context"),
    reproduce: bool = typer.Option(False, "--reproduce", help="Print the GateUp/W4 reproduction table (models x devices x contexts) next to the paper's range"),
    out: Optional[Path] = typer.Option(None, "--out", help="With --reproduce: write the markdown table here"),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs"),
) -> None:
    """Predict decode and prefill tokens/s per quantization policy on a device (roofline model)."""
    from gguf import GGMLQuantizationType as T

    from recover_lora.export.policy import parse_ggml_type

    contexts = parse_contexts(ctx)
    kv = parse_ggml_type(kv_type)
    if reproduce:
        _reproduce(model, device, contexts, out, json_out, force)
        return
    if out is not None:
        raise RecoverLoraError("--out is for --reproduce; use --json or --plot for a single roofline")
    import json

    from recover_lora.devices.profiles import get_profile
    from recover_lora.devices.roofline import roofline_table
    from recover_lora.devices.shapes import load_model_shape, padded_shape, resolve_policy
    from recover_lora.export.policy import Policy
    from recover_lora.fileio import atomic_output, check_output

    for path in (json_out, plot):
        if path is not None:
            check_output(path, force)  # fail before any work
    shape = load_model_shape(model or "qwen3-4b")
    profile = get_profile(device or "m2")
    policies = [resolve_policy(p, shape) for p in _split(policy)]
    if not policies:
        raise RecoverLoraError("--policy is empty; give e.g. w4,gateup")
    adapter = _adapter(adapter_rank, adapter_modules, adapter_type)
    rows = roofline_table(shape, profile, policies, contexts, adapter=adapter, kv_type=kv)
    typer.echo(format_table(rows, shape, profile))
    padded = []  # ModelConfig holds a dict (rope scaling): not hashable, so no set
    for config in (padded_shape(shape, p).config for p in policies if isinstance(p, Policy)):
        if config != shape.config and config not in padded:
            padded.append(config)
    for config in padded:  # what `recover-lora export` would write, and what the rows assume
        typer.echo(
            f"(exported widths padded for K-quants: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
            f"{config.num_heads}/{config.num_kv_heads} heads)"
        )
    if adapter is not None:
        typer.echo(f"(adapter: rank {adapter.rank} on {', '.join(adapter.modules)}, {adapter.ggml_type.name}, included in weights)")
    if kv != T.F16:
        typer.echo(f"(KV cache stored as {kv.name})")
    if json_out is not None:
        payload = {
            "model": shape.name,
            "model_source": shape.source,
            "device": {"key": profile.key, **profile.to_table()},
            "bandwidth_kind": profile.bandwidth_kind,
            "kv_type": kv.name,
            "adapter": None if adapter is None else {"rank": adapter.rank, "modules": list(adapter.modules), "type": adapter.ggml_type.name},
            "rows": [r.to_dict() for r in rows],
        }
        with atomic_output(json_out, force=force) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")
    if plot is not None:
        from recover_lora.devices.plot import plot_tokens_per_s

        plot_tokens_per_s(rows, f"{shape.name} on {profile.key} (roofline)", plot, force=force)
        typer.echo(f"wrote {plot}")


def _reproduce(model: str | None, device: str | None, contexts: list[int], out: Path | None, json_out: Path | None, force: bool) -> None:
    from recover_lora.devices import reproduce as rep
    from recover_lora.fileio import check_output

    for path in (out, json_out):
        if path is not None:
            check_output(path, force)
    models = tuple(_split(model)) if model else rep.DEFAULT_MODELS
    devices = tuple(_split(device)) if device else rep.DEFAULT_DEVICES
    rows = rep.reproduction_rows(models, devices, tuple(contexts))
    typer.echo(rep.reproduction_markdown(rows))
    rep.write_reproduction(rows, out, json_out, force)
    for path in (out, json_out):
        if path is not None:
            typer.echo(f"wrote {path}")


@devices_app.command("list")
def list_command() -> None:
    """List device profiles: curated ones and those `devices probe` wrote."""
    from recover_lora.devices.profiles import load_profiles

    profiles = load_profiles()
    typer.echo(f"{'device':<24} {'class':<7} {'backend':<12} {'GB/s':>8} {'kind':<9} {'TFLOP/s':>8}  name")
    for key in sorted(profiles):
        p = profiles[key]
        typer.echo(
            f"{key:<24} {p.device_class:<7} {p.backend:<12} {p.bandwidth_bytes_per_s / 1e9:>8.2f} {p.bandwidth_kind:<9} "
            f"{p.peak_compute_TFLOP_per_s:>8.3f}  {p.name}"
        )


@devices_app.command("show")
def show_command(device: str = typer.Argument(..., help="Device profile key")) -> None:
    """Every number of one profile with its unit and source."""
    from recover_lora.devices.profiles import get_profile

    p = get_profile(device)
    typer.echo(f"{p.key}: {p.name} [{p.device_class}, {p.backend}] from {p.origin}")
    if p.date:
        typer.echo(f"  date: {p.date}")
    for key, value in p.numbers().items():
        stem = key.rsplit("_GB_per_s", 1)[0].rsplit("_TFLOP_per_s", 1)[0]
        typer.echo(f"  {key} = {value}\n      source: {p.sources[stem]}")
    if p.matvec_weights_per_s:
        from recover_lora.devices.profiles import MATVEC_KEY, MATVEC_STEM

        rates = ", ".join(f"{t.name} = {r:.4g}" for t, r in p.matvec_weights_per_s.items())
        typer.echo(f"  {MATVEC_KEY} = {{{rates}}}\n      source: {p.sources[MATVEC_STEM]}")
    if p.fingerprint:
        typer.echo("  fingerprint: " + ", ".join(f"{k}={v}" for k, v in p.fingerprint.items()))


@devices_app.command("probe")
def probe_command(
    name: str = typer.Option("host", "--name", help="Profile key to write"),
    gguf_file: Optional[Path] = typer.Option(None, "--gguf", help="GGUF to time llama.cpp decode on [default: the default model]"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for STREAM and llama.cpp [default: all cores]"),
    stream_mib: int = typer.Option(256, "--stream-mib", help="Size of each STREAM array in MiB (must dwarf the caches)"),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Time llama.cpp at all: decode on a GGUF, the matrix-vector and attention rates"),
    matvec: bool = typer.Option(True, "--matvec/--no-matvec", help="Measure llama.cpp's matrix-vector rate per ggml type (about 20-40 s per type on 2 cores)"),
    matvec_types: str = typer.Option("Q4_K,Q2_K,Q6_K", "--matvec-types", help="Comma-separated ggml types for the matrix-vector rates (Q8_0, F16, ... too)"),
    matvec_shape: str = typer.Option("qwen3-4b", "--matvec-shape", help="Bundled shape or config.json whose widths the probe models (matvec and attention) have"),
    matvec_layers: int = typer.Option(2, "--matvec-layers", help="Layers of that shape in each probe model (the file must exceed the caches)"),
    attention: bool = typer.Option(True, "--attention/--no-attention", help="Measure llama.cpp's decode attention rate over a deep KV cache (about 40 s on 2 cores)"),
    attention_depth: int = typer.Option(2048, "--attention-depth", help="KV-cache depth N the attention rate is measured at, a multiple of 512 (N/2 is timed too)"),
    attention_layers: int = typer.Option(8, "--attention-layers", help="Layers of that shape in the attention probe model (its KV cache must exceed the caches)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Profile TOML to write [default: <results>/<name>.toml]"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing profile file"),
) -> None:
    """Measure this machine (bandwidth, compute, llama.cpp decode, per-type matrix-vector and attention rates) and write a device profile."""
    from recover_lora.devices.matvec import parse_matvec_types
    from recover_lora.devices.probe import check_probe_settings, probe_device
    from recover_lora.devices.profiles import profile_toml
    from recover_lora.fileio import atomic_output, check_output
    from recover_lora.runtime.records import results_dir

    if threads is not None and threads < 1:
        raise RecoverLoraError(f"--threads {threads} must be >= 1")
    key = name.strip().lower()
    if not key or not all(c.isalnum() or c in "-_" for c in key):
        raise RecoverLoraError(f"--name {name!r} must be letters, digits, '-' or '_'")
    types = parse_matvec_types(matvec_types) if decode and matvec else ()
    steps = dict(matvec_types=types, shape=matvec_shape, matvec_layers=matvec_layers, attention=decode and attention,
                 attention_layers=attention_layers, attention_depth=attention_depth)
    check_probe_settings(**steps)  # a bad shape fails here, before the output check and minutes of measuring
    out = out or results_dir() / f"{key}.toml"
    check_output(out, force)
    load_1min = os.getloadavg()[0]
    if load_1min > 0.5:
        typer.echo(f"warning: 1-min load average is {load_1min:.2f}; other work skews these timings (llama.cpp's badly): probe a quiet machine", err=True)
    measured = probe_device(key, gguf_file, threads, stream_mib, decode, **steps)
    profile, stream, decode_result = measured.profile, measured.stream, measured.decode
    matvec_results, attention_result = measured.matvec, measured.attention
    typer.echo(
        f"STREAM read {stream.read_GB_per_s:8.2f} GB/s   copy {stream.copy_GB_per_s:8.2f} GB/s   triad {stream.triad_GB_per_s:8.2f} GB/s  "
        f"({stream.threads} threads, {stream.array_MiB} MiB arrays; read is the effective bandwidth)"
    )
    typer.echo(f"numpy matmul {profile.peak_compute_TFLOP_per_s * 1e3:8.1f} GFLOP/s")
    if decode_result is not None:
        typer.echo(
            f"llama.cpp prompt {decode_result.prompt_tokens_per_s:8.2f} tok/s x {decode_result.prompt_flops_per_token / 1e9:.3f} GFLOP/token "
            f"= {decode_result.prompt_flop_per_s / 1e9:.1f} GFLOP/s"
        )
        typer.echo(
            f"llama.cpp decode {decode_result.decode_tokens_per_s:8.2f} tok/s on {Path(decode_result.gguf).name} x "
            f"{decode_result.bytes_per_token / 1e6:.1f} MB/token = {decode_result.bytes_per_s / 1e9:.2f} GB/s "
            f"({decode_result.bytes_per_s / 1e9 / stream.read_GB_per_s:.0%} of read)"
        )
    for r in matvec_results:
        typer.echo(
            f"llama.cpp matvec {r.ggml_type.name:<5} {r.weights_per_s / 1e9:7.2f} G weights/s ({r.seconds_per_token * 1e3:.2f} ms/token, median of "
            f"{r.tokens}; {r.bytes_per_token / 1e6:.0f} MB/token = {r.bytes_per_s / 1e9:.2f} GB/s, {r.bytes_per_s / 1e9 / stream.read_GB_per_s:.0%} of read)"
        )
    if attention_result is not None:
        r = attention_result
        extra_s = r.seconds_per_token[-1] - r.seconds_per_token[0]
        typer.echo(
            f"llama.cpp attention {r.flop_per_s / 1e9:7.2f} GFLOP/s at depth {r.depths[-1]} ({r.flop_per_s_at(1) / 1e9:.2f} from depth "
            f"{r.depths[1]}): +{extra_s * 1e3:.2f} ms/token over depth 0 ({r.seconds_per_token[0] * 1e3:.2f} ms; medians of >= {r.tokens} steps); "
            f"{r.kv_bytes[-1] / 1e6:.1f} MB KV/token = {r.kv_bytes[-1] / extra_s / 1e9:.2f} GB/s"
        )
    with atomic_output(out, force=force) as tmp:
        tmp.write_text(f"# written by `recover-lora devices probe` on {profile.date}\n" + profile_toml(profile))
    typer.echo(f"wrote profile [{key}] to {out}")


@devices_app.command("calibrate")
def calibrate_command(
    results: Optional[Path] = typer.Option(None, "--results", help="Folder of bench records [default: devices/results or $RECOVER_LORA_RESULTS]"),
    device: str = typer.Option("host", "--device", help="Profile to predict with (normally the probed host)"),
    all_machines: bool = typer.Option(False, "--all-machines", help="Also use records whose fingerprint differs from the profile's"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the comparison as JSON"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --json output"),
) -> None:
    """Predicted vs measured decode tokens/s for the bench records, and bytes/s vs probed bandwidth."""
    import json

    from recover_lora.devices.calibrate import calibrate, format_calibration
    from recover_lora.devices.profiles import get_profile
    from recover_lora.fileio import atomic_output, check_output
    from recover_lora.runtime.records import results_dir

    if json_out is not None:
        check_output(json_out, force)
    profile = get_profile(device)
    report = calibrate(results or results_dir(), profile, same_machine_only=not all_machines)
    typer.echo(format_calibration(report, profile))
    if json_out is not None:
        with atomic_output(json_out, force=force) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def plan_command(
    model: Optional[str] = typer.Argument(None, help="Bundled shape (qwen3-4b, llama-3.1-8b, qwen3-14b, mistral-small-22b, ...), a Hugging Face folder or config.json, or a .gguf [default: the default model]"),
    preset: str = typer.Option("cpu-demo", "--preset", help="The pipeline preset whose sizes are planned"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs the torch steps run on (0 = the CPU) [default: this machine's CUDA devices]"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GiB per GPU (a '24 GB' card has 24 GiB) [default: the first CUDA device's free memory]"),
    host_memory: Optional[float] = typer.Option(None, "--host-memory", help="GiB of host RAM [default: this machine's available RAM]"),
    disk: Optional[float] = typer.Option(None, "--disk", help="GiB of disk for the run folder [default: free space under --out]"),
    out: Path = typer.Option(Path("."), "--out", "-o", help="The run folder the disk is for"),
    policy: list[str] = typer.Option([], "--policy", help="Extra export policy besides w4 and gateup, repeatable"),
    skip: list[str] = typer.Option([], "--skip", help="Plan a run that leaves out this step (autoround, kltune), as `pipeline --skip`; repeatable"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Training weights: auto (bf16 on a GPU) | float32 | bfloat16"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Plan a top-k teacher cache instead of the teacher in training"),
    loss_chunk: Optional[int] = typer.Option(None, "--loss-chunk", help="Plan lm_head + loss over at most N positions at a time"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Plan recomputed layer activations"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training samples per step (global)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the plan as JSON"),
    grid: bool = typer.Option(False, "--grid", help="Instead: the bundled 4-22B models on one 24 / 48 / 80 GiB GPU, as markdown"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="With --grid: write the markdown table here"),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs"),
) -> None:
    """Plan each pipeline step's peak host RAM, GPU memory and disk from the model's shape, before any work."""
    from recover_lora.devices.memory_check import available_memory, checked_plan, format_plan, plan_json, projection_markdown
    from recover_lora.devices.memory_plan import plan_settings
    from recover_lora.devices.memory_sizes import model_sizes
    from recover_lora.devices.shapes import load_model_shape
    from recover_lora.export.policy import policy_names
    from recover_lora.fileio import atomic_output, check_output

    for path in (json_out, markdown):
        if path is not None:
            check_output(path, force)  # fail before any work
    overrides = {"dtype": dtype, "top_k": top_k, "loss_chunk": loss_chunk, "gradient_checkpointing": gradient_checkpointing,
                 "batch_size": batch_size, "rank": rank}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if grid:
        text = projection_markdown(preset, overrides=overrides)
        typer.echo(text, nl=False)
        if markdown is not None:
            with atomic_output(markdown, force=force) as tmp:
                tmp.write_text(text)
            typer.echo(f"wrote {markdown}")
        return
    if markdown is not None:
        raise RecoverLoraError("--markdown is for --grid; use --json for one model's plan")
    unknown = [p for p in policy if p not in policy_names()]
    if unknown:
        raise RecoverLoraError(f"unknown policy {unknown[0]!r}; choose from: {', '.join(policy_names())}")
    policies = ("w4", "gateup") + tuple(p for p in policy if p not in ("w4", "gateup"))
    if model is None:
        from recover_lora.export.sources import default_model_path

        model = str(default_model_path())
    sizes = model_sizes(load_model_shape(model), policies=policies)
    available = available_memory(out, gpus=gpus, gpu_gib=gpu_memory, host_gib=host_memory, disk_gib=disk)
    plan = checked_plan(sizes, plan_settings(preset, overrides, policies, skip=tuple(skip)), available)
    typer.echo(format_plan(plan, sizes))
    if json_out is not None:
        with atomic_output(json_out, force=force) as tmp:
            tmp.write_text(plan_json(plan, sizes))
        typer.echo(f"wrote {json_out}")
    if not plan.fits:
        raise typer.Exit(1)
