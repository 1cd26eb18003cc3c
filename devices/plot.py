"""`roofline --plot`: decode tokens/s against context length, one line per policy (matplotlib PNG)."""

from __future__ import annotations

from pathlib import Path

from recover_lora.devices.roofline import Estimate
from recover_lora.fileio import atomic_output


def plot_tokens_per_s(rows: list[Estimate], title: str, out_path: Path, force: bool = False) -> Path:
    """Write a PNG of decode tokens/s vs context, one line per policy.

    Example:
        plot_tokens_per_s(roofline_table(shape, profile, ["w4", "gateup"], [0, 4096]), "qwen3-4b on m2", Path("r.png"))
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must come before pyplot
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r.policy for r in rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for policy in policies:
        points = sorted((r.ctx, r.decode_tokens_per_s) for r in rows if r.policy == policy)
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=policy)
    ax.set_xlabel("context tokens in KV cache")
    ax.set_ylabel("decode tokens/s (roofline)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(out_path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out_path)
