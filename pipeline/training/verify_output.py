"""What `thresher verify` writes into OUT, and the guard over it: verify.json, verify.md (the
comparison table, with the paired-bootstrap table when several seeds ran) and verify.png (when
matplotlib is installed); `pipeline/training/verify.py` runs the comparison.
"""

from __future__ import annotations

from pathlib import Path

from thresher.pipeline.artifacts import atomic_path, write_json_atomic

VERIFY_FILES = ("verify.json", "verify.md", "verify.png", "report.html")


def check_verify_outputs(out: Path, subsets: list[Path], evals: list[Path], the_pool) -> None:
    """The output guard for OUT: never an input, never in a pool or a cache, and fixed file
    names written into an existing folder only when it is an earlier verify's (verify.json)."""
    from thresher.pipeline.io.guard import check_outputs, check_writes_into

    inputs = [*subsets, *(Path(f"{s}.manifest.json") for s in subsets), *evals, the_pool.path,
              *the_pool.input_files()]
    check_outputs([out / f for f in VERIFY_FILES], inputs, [out / "runs"])
    check_writes_into(out, [*VERIFY_FILES, "runs"], "verify.json")


def write_results(report: dict, out: Path) -> dict:
    """OUT/verify.json, verify.md (the comparison table) and verify.png (when matplotlib is there)."""
    table = comparison_table(report)
    plot = _plot(report, out / "verify.png")
    table += ("\n" + (f"Plot: {plot.name}" if plot else
                      "Plot skipped: matplotlib is not installed (`pip install matplotlib`).") + "\n")
    report["table"] = str(out / "verify.md")
    write_json_atomic(out / "verify.json", report)
    with atomic_path(out / "verify.md") as tmp:
        tmp.write_text(table)
    report["markdown"] = table
    return report


def _significance_table(report: dict) -> str:
    comps = report.get("comparisons") or {}
    if not comps:
        return ""
    k = len(report.get("seeds", [report["seed"]]))
    title = (f"Subset minus random (mean over {k} seed(s) per eval row; paired bootstrap, "
             "95% interval over eval rows; 'better' only when the interval excludes 0):")
    lines = ["", title, "",
             "| subset | eval | Δ loss [95% CI] | loss verdict | Δ EM [95% CI] | EM verdict |",
             "|---|---|---|---|---|---|"]
    for name, per_eval in comps.items():
        for e, r in per_eval.items():
            lo = r["loss"]
            cells = [name, e, f"{lo['diff']:+.4f} [{lo['lo']:+.4f}, {lo['hi']:+.4f}]", lo["verdict"]]
            em = r.get("exact_match")
            cells += ([f"{em['diff']:+.3f} [{em['lo']:+.3f}, {em['hi']:+.3f}]", em["verdict"]]
                      if em else ["-", "-"])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(report: dict) -> str:
    evals = list(next(iter(report["runs"].values()))["evals"])
    head = ["run", "rows"]
    for e in evals:
        head += [f"{e} loss", f"{e} ppl"]
        if any("exact_match" in r["evals"][e] for r in report["runs"].values()):
            head.append(f"{e} EM")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["runs"].items():
        cells = [name, str(r["rows"])]
        for e in evals:
            ev = r["evals"][e]
            sd = f" ± {ev['loss_sd']:.4f}" if "loss_sd" in ev else ""
            cells += [f"{ev['loss']:.4f}{sd}", f"{ev['ppl']:.2f}"]
            if f"{e} EM" in head:
                em_sd = f" ± {ev['exact_match_sd']:.3f}" if "exact_match_sd" in ev else ""
                cells.append(f"{ev['exact_match']:.3f}{em_sd} ({ev['correct']}/{ev['n']})"
                             if "exact_match" in ev else "-")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = report.get("seeds", [report["seed"]])
    seed_text = (f"seed {report['seed']}" if len(seeds) == 1 else
                 f"seeds {seeds[0]}..{seeds[-1]} (mean ± sd over {len(seeds)} runs; a fresh random "
                 "subset per seed)")
    note = (f"\nTrained with LoRA r={report['config']['lora_r']}, lr={report['config']['lr']}, "
            f"{report['config']['epochs']} epoch(s), {seed_text}; eval on the first "
            f"{report['max_eval']} rows of each set; base = {report['config']['model']} with no "
            "training; original = the untrained model it was pruned from; random = seeded random "
            f"{report['subset_rows']} rows of {report['pool']}.\n")
    return "\n".join(lines) + "\n" + note + _significance_table(report)


def _plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = list(report["runs"])
    evals = list(report["runs"][runs[0]]["evals"])
    fig, axes = plt.subplots(1, len(evals), figsize=(4 * len(evals), 3), squeeze=False)
    for ax, e in zip(axes[0], evals):
        ax.bar(runs, [report["runs"][r]["evals"][e]["loss"] for r in runs])
        ax.set_title(f"{e}: held-out loss")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
