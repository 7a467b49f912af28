"""`outliertune quantize --report DIR`: report.json, report.md and PNG plots of what the calibration chose.

- ranges_layer{i}_{group}.png: per-channel calibration range of an input before symmetrization (original units) and
  after (integer units: x / s - shift), for the first, middle and last layer;
- layer_error.png: relative output error of each group's quantized linears per layer (calibration sample), with
  the simple per-channel rule for comparison where the search ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_outliertune.offline.calibrate import InputStats
from vllm_outliertune.offline.symmetrize import ChannelPlan

PLOTTED_GROUPS = ("qkv", "down")


def plotted_layers(num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({0, num_layers // 2, num_layers - 1}))


def range_record(stats: InputStats, plan: ChannelPlan) -> dict:
    """Per-channel [min, max] before, and after symmetrization in integer units."""
    shift = torch.zeros_like(plan.step) if plan.shift is None else plan.shift
    return {"before": [stats.min.tolist(), stats.max.tolist()],
            "after": [(stats.min / plan.step - shift).tolist(), (stats.max / plan.step - shift).tolist()]}


def _plot_ranges(path: Path, title: str, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6))
    for axis, key, label in ((axes[0], "before", "activation value"), (axes[1], "after", "integer units")):
        low, high = record[key]
        channels = range(len(low))
        axis.fill_between(channels, low, high, step="mid", alpha=0.6)
        axis.set_ylabel(label)
        axis.set_title(f"{title}: {key} symmetrization")
    axes[1].set_xlabel("input channel")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_errors(path: Path, layers: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(10, 4))
    for group in layers[0]["groups"]:
        line = axis.semilogy([layer["groups"][group]["error"] for layer in layers], marker="o", label=group)
        simple = [layer["groups"][group].get("simple_rule_error") for layer in layers]
        if all(value is not None for value in simple):
            axis.semilogy(simple, linestyle=":", color=line[0].get_color(), label=f"{group} (simple rule)")
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("relative output error")
    axis.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(report_dir: Path, summary: dict, layers: list[dict], ranges: dict[str, dict]) -> None:
    """``layers``: per decoder layer {"groups": {group: {"error", chosen parameters...}}}; ``ranges``:
    {"layer{i}_{group}": range_record(...)}."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps({"summary": summary, "layers": layers}, indent=1))
    _plot_errors(report_dir / "layer_error.png", layers)
    for name, record in ranges.items():
        _plot_ranges(report_dir / f"ranges_{name}.png", name, record)
    groups = list(layers[0]["groups"])
    lines = ["# OutlierTune quantization report", "",
             *(f"- {key}: {value}" for key, value in summary.items()), "",
             "Relative output error of each input group's quantized linears on the calibration sample "
             "(chosen plan; simple per-channel rule in brackets where the search ran; dynamic per-token "
             "quantization of the same linears in parentheses; groups left unquantized by --keep-fp16 marked).", "",
             "| layer | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for index, layer in enumerate(layers):
        cells = []
        for group in groups:
            info = layer["groups"][group]
            cell = f"{info['error']:.2e}"
            if info.get("simple_rule_error") is not None:
                steps = f"e={info['evenness']}" if "evenness" in info else f"s={info['strength']}"
                cell += f" [{info['simple_rule_error']:.2e}] {steps} c={info['clip']} " \
                        f"{'shift' if info['shift'] else 'no shift'}"
            cell += f" (dyn {info['dynamic_error']:.2e})" + (" **kept fp16**" if info.get("kept_fp16") else "")
            cells.append(cell)
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    lines += ["", "![per-layer error](layer_error.png)", "",
              *(f"![{name}](ranges_{name}.png)" for name in ranges)]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
