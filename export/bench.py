"""`make bench-export`: time our exporter against a direct call of llama.cpp's quantizer.

Both quantize the same full-precision (padded) GGUF of the default model to the same
per-tensor types; the exporter's extra work (reading the source, padding, writing the
full-precision file, verifying types) is what the comparison shows. Peak memory is the
process's max RSS (ru_maxrss) of each step run in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recover_lora.fileio import atomic_output


def _run_step(step: str, *args: str) -> dict:
    """Run one step in a fresh interpreter so its peak RSS is its own."""
    code = (
        "import json, resource, sys, time\n"
        "from recover_lora.export import bench\n"
        "t = time.perf_counter()\n"
        f"bench._step_{step}(*sys.argv[1:])\n"
        "print(json.dumps({'seconds': time.perf_counter() - t,"
        " 'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _step_export(out: str, policy: str) -> None:
    from recover_lora.export.quantize import export_model

    export_model(None, out, policy, force=True)


def _step_prepare(full_precision: str, policy: str, types_json: str) -> None:
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.policy import Policy
    from recover_lora.export.quantize import plan_types
    from recover_lora.export.sources import load_model

    weights, types = plan_types(load_model(None), Policy.named(policy), "auto")
    write_gguf(weights, full_precision, force=True)
    Path(types_json).write_text(json.dumps({name: int(t) for name, t in types.items()}))


def _step_llama_cpp(full_precision: str, out: str, types_json: str) -> None:
    import gguf

    from recover_lora.export.quantize import llama_cpp_quantize

    types = {name: gguf.GGMLQuantizationType(t) for name, t in json.loads(Path(types_json).read_text()).items()}
    llama_cpp_quantize(Path(full_precision), Path(out), types)


def run_benchmark(policy: str = "gateup", repeats: int = 3) -> dict:
    results = {"exporter": [], "llama_cpp_quantize": []}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        prepare = _run_step("prepare", str(work / "fp.gguf"), policy, str(work / "types.json"))
        for _ in range(repeats):  # interleaved, so a busy machine affects both alike
            results["exporter"].append(_run_step("export", str(work / "exported.gguf"), policy))
            results["llama_cpp_quantize"].append(
                _run_step("llama_cpp", str(work / "fp.gguf"), str(work / "direct.gguf"), str(work / "types.json"))
            )
    summary = {}
    for name, runs in results.items():
        seconds = sorted(r["seconds"] for r in runs)
        summary[name] = {
            "median_seconds": seconds[len(seconds) // 2],
            "min_seconds": seconds[0],
            "max_seconds": seconds[-1],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "runs": runs,
        }
    summary["exporter_over_llama_cpp"] = summary["exporter"]["median_seconds"] / summary["llama_cpp_quantize"]["median_seconds"]
    return {
        "benchmark": "export",
        "model": "default (SmolLM2-135M-Instruct)",
        "policy": policy,
        "repeats": repeats,
        "prepare_full_precision": prepare,
        "results": summary,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="gateup")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("devices/results/bench-export.json"))
    args = parser.parse_args()
    record = run_benchmark(args.policy, args.repeats)
    with atomic_output(args.out, force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    r = record["results"]
    print(
        f"export of the default model ({args.policy}), median of {args.repeats}: exporter "
        f"{r['exporter']['median_seconds']:.1f} s (peak {r['exporter']['peak_rss_mib']:.0f} MiB), llama.cpp quantizer alone "
        f"{r['llama_cpp_quantize']['median_seconds']:.1f} s (peak {r['llama_cpp_quantize']['peak_rss_mib']:.0f} MiB), "
        f"ratio {r['exporter_over_llama_cpp']:.2f}; written to {args.out}"
    )


if __name__ == "__main__":
    main()
