"""The summary of a `python -m diffkernels bench` run: a short table for stdout, PNG plots
(matplotlib: speedup per shape and provider, % of roofline) and summary.md linking every part's
full rows (<op>.md / <op>.json)."""
import os
import statistics

from . import common


def _fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def _roof(r):
    return r.pct_matmul if r.pct_matmul is not None else r.pct_copy_bw


def op_summary(op, rows):
    """(header, lines): per provider, the ratio to the op's baseline (worst / median / best)
    and the median % of roofline over its rows."""
    lines = []
    if op == "pipeline":
        for r in rows:
            e = r.extra
            lines.append([r.shape, r.provider, _fmt(e.get("it_s")), _fmt(e.get("it_s_ratio")),
                          f"{r.median_ms:.0f}", _fmt(r.ratio), _fmt(e.get("first_call_s"))])
        return ["case", "provider", "loop it/s", "it/s vs diffusers", "latency ms",
                "latency vs diffusers", "first call s"], lines
    baseline = next((r.baseline for r in rows if r.baseline), "?")
    for provider in dict.fromkeys(r.provider for r in rows):
        rs = [r for r in rows if r.provider == provider]
        ratios = [r.ratio for r in rs if r.ratio is not None]
        roofs = [_roof(r) for r in rs if _roof(r) is not None]
        lines.append([provider, str(len(rs)), _fmt(min(ratios) if ratios else None),
                      _fmt(statistics.median(ratios) if ratios else None),
                      _fmt(max(ratios) if ratios else None),
                      _fmt(statistics.median(roofs) if roofs else None, ".1f")])
    return ["provider", "rows", f"worst x {baseline}", "median x", "best x",
            "median % roofline"], lines


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def plot(op, rows, outdir):
    """<op>.png: speedup vs the baseline per shape and provider (and % of roofline), or loop
    it/s per provider for the pipeline. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shapes = list(dict.fromkeys(f"{r.shape} {r.dtype}" for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    value = {(f"{r.shape} {r.dtype}", r.provider): r for r in rows}
    panels = [("loop it/s", lambda r: r.extra.get("it_s"))] if op == "pipeline" else [
        (f"speedup vs {next((r.baseline for r in rows if r.baseline), 'baseline')}",
         lambda r: r.ratio),
        ("% of roofline (copy bandwidth; attention: matmul rate)", _roof)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.45 * len(shapes) * 1.6), 3.6 *
                                                      len(panels)), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, (title, get) in zip(axes[:, 0], panels):
        for i, p in enumerate(providers):
            ys = [get(value[(s, p)]) if (s, p) in value else None for s in shapes]
            xs = [j + i * width for j, y in enumerate(ys) if y is not None]
            ax.bar(xs, [y for y in ys if y is not None], width, label=p)
        if title.startswith("speedup"):
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{op}: {title}", fontsize=9)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=6)
        ax.legend(fontsize=6, ncol=3)
    fig.suptitle(rows[0].device if rows else "", fontsize=9)
    fig.tight_layout()
    path = os.path.join(outdir, f"{op}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results, outdir, device, quick=False, seconds=None):
    """summary.md (tables, plots, links) under outdir; returns the stdout summary."""
    os.makedirs(outdir, exist_ok=True)
    name = common.device_name(device)
    md = [f"# diffkernels bench{' --quick' if quick else ''} on {name}", ""]
    text = [f"summary ({name}{', quick' if quick else ''}"
            + (f", {seconds:.0f} s" if seconds is not None else "") + ")"]
    for op, res in results.items():
        header, lines = op_summary(op, res["rows"])
        table = _table(header, lines)
        text += ["", f"{op} ({res['seconds']:.0f} s)", table]
        md += [f"## {op}", "", f"Full rows: [{op}.md]({op}.md) ([json]({op}.json)).", "", table, ""]
        if op == "pipeline":
            md += [f"- {n}" for n in res["notes"] if "denoising step of" in n] + [""]
        png = plot(op, res["rows"], outdir)
        if png:
            md += [f"![{op}]({os.path.basename(png)})", ""]
        elif res["rows"]:
            text.append("(no plot: matplotlib is not installed; pip install matplotlib)")
    md.append(f"Each part's notes (method, baselines, roofline) are in its own markdown file; "
              f"ratios are side by side in one process on {name}.")
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return "\n".join(text)
