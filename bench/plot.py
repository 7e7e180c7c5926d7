"""Plot serving-benchmark result JSONs: throughput and latency percentiles against concurrency.

    python bench/plot.py bench/results/serving/*.json -o bench/results/serving_cpu.png \
        --title "demo model, CPU"

Input: result files written by `python -m atom_stream.benchmarks.benchmark_serving --save-result`
(ATOM/vLLM keys: backend, max_concurrency, output_throughput, request_throughput,
median_*_ms = p50, p99_*_ms). Runs are grouped into one line per transport: `atom-ws` is
"WebSocket", the HTTP backends (vllm, openai, openai-chat) are "SSE (<backend>)"; a `label` key
(e.g. from `--metadata label=...`) overrides that. The figure has four panels side by side:
output throughput, TTFT, TPOT and ITL; latency panels draw p50 solid and p99 dashed, so the SSE
and WebSocket lines of each percentile sit on the same axes. A run without --max-concurrency is
plotted at x = num_prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"))
COLORS = {"WebSocket": "tab:orange"}


def transport_label(result: dict) -> str:
    if result.get("label"):
        return str(result["label"])
    backend = result.get("backend", "?")
    return "WebSocket" if backend == "atom-ws" else f"SSE ({backend})"


def load_results(paths: list[str]) -> dict[str, list[dict]]:
    """label -> results sorted by concurrency. Files that are not result JSONs are skipped."""
    series: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if not isinstance(result, dict) or "output_throughput" not in result:
            print(f"skipping {path}: not a serving-benchmark result", file=sys.stderr)
            continue
        result["_x"] = result.get("max_concurrency") or result.get("num_prompts")
        series[transport_label(result)].append(result)
    for runs in series.values():
        runs.sort(key=lambda r: r["_x"])
    return dict(series)


def plot(series: dict[str, list[dict]], out: str, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    palette = iter(["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    colors = {lab: COLORS.get(lab) or next(palette) for lab in sorted(series)}
    xs_all = sorted({r["_x"] for runs in series.values() for r in runs})

    ax = axes[0]
    for lab, runs in sorted(series.items()):
        ax.plot([r["_x"] for r in runs], [r["output_throughput"] for r in runs], "o-",
                color=colors[lab], label=lab)
    ax.set_title("Output throughput")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)

    for ax, (key, name) in zip(axes[1:], LATENCIES):
        for lab, runs in sorted(series.items()):
            x = [r["_x"] for r in runs]
            ax.plot(x, [r.get(f"median_{key}_ms") for r in runs], "o-", color=colors[lab],
                    label=f"{lab} p50")
            if all(f"p99_{key}_ms" in r for r in runs):
                ax.plot(x, [r[f"p99_{key}_ms"] for r in runs], "s--", color=colors[lab],
                        label=f"{lab} p99")
        ax.set_title(f"{name} p50 / p99")
        ax.set_ylabel("ms (log)")
        ax.set_yscale("log")
        # plain 1-2-5 labels instead of matplotlib's "2x10^1" minor labels
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())

    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_xlabel("max concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files")
    p.add_argument("-o", "--output", default="bench/results/serving.png")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    series = load_results(args.results)
    if not series:
        raise SystemExit("no serving-benchmark results among the inputs")
    path = plot(series, args.output, args.title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
