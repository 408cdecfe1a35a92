"""The evaluation report: report.json (all rows), report.md (the table) and ndcg_vs_dim.png (the plot)."""
import io
import json
from pathlib import Path

from twinfold.models.card import general_lines
from twinfold.models.files.atomic import atomic_write_bytes
from twinfold.models.quantize import PRECISIONS, format_megabytes
from twinfold.models.search import rescoring_note

COLUMNS = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@10", "R@10"), ("recall@100", "R@100"),
           ("map@100", "MAP@100"))
REPORT_FILES = {"json": "report.json", "md": "report.md", "png": "ndcg_vs_dim.png"}
STYLES = {"float32": ("-", "o"), "int8": ("--", "s"), "binary": (":", "^")}


def write_report(rows: list[dict], out_dir: str | Path, info: dict | None = None) -> dict[str, Path]:
    """Write the three report files into `out_dir`; returns their paths by kind."""
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    rows = sort_rows(rows)
    report = {"results": rows, "info": info or {}}
    atomic_write_bytes(paths["json"], (json.dumps(report, indent=2) + "\n").encode())
    title = _title(info)
    heading = f"# Retrieval evaluation: {title}" if title else "# Retrieval evaluation"
    notes = "".join(f"\n{line}\n" for line in notes_of(rows, info))
    atomic_write_bytes(paths["md"], f"{heading}\n\n{markdown_table(rows)}\n{notes}".encode())
    plot_ndcg_vs_dim(rows, paths["png"], title)
    return paths


def notes_of(rows: list[dict], info: dict | None) -> list[str]:
    """Lines under the table: the settings of BM25 rows, the rescoring depth of binary rows, the training data's
    overlap with the eval set and the general sets' scores (eval.general)."""
    lines = [f"BM25 settings: {r['bm25']}." for r in rows if r.get("bm25")]
    if info and "rescore_multiplier" in info and any(r["precision"] == "binary" for r in rows):
        lines.append(rescoring_note(info["rescore_multiplier"], max(info["k_values"])))
    if info and info.get("leakage"):
        from twinfold.train.data.leakage import summary_lines

        lines.append("## Training data against the eval set\n\n" + "\n".join(summary_lines(info["leakage"])))
    if info and info.get("general"):
        lines.append("\n".join(general_lines(info["general"])))
    return lines


def sort_rows(rows: list[dict]) -> list[dict]:
    """Models in order of first appearance (BM25 last), then dim descending, then float32, int8, binary."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    order = {m: (m == "bm25", i) for i, m in enumerate(models)}
    precision = {p: i for i, p in enumerate(PRECISIONS)}
    return sorted(rows, key=lambda r: (order[r["model"]], -(r["dim"] or 0),
                                       precision.get(r["precision"], len(PRECISIONS))))


def markdown_table(rows: list[dict]) -> str:
    """The report table; each model's best nDCG@10 in bold, `kept` = nDCG@10 relative to its largest float32 dim."""
    rows = sort_rows(rows)
    with_sts = any(r.get("sts_spearman") is not None for r in rows)
    header = ["model", "dim", "precision", *(label for _, label in COLUMNS), "kept", "storage / 1M docs"]
    header += ["STS ρ"] if with_sts else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        same = [s for s in rows if s["model"] == r["model"]]
        full = max((s for s in same if s["precision"] == "float32"), key=lambda s: s["dim"], default=None)
        best = max(s["ndcg@10"] for s in same)
        cells = [r["model"], str(r["dim"] or "–"), r["precision"]]
        cells += [f"{r[key]:.4f}" for key, _ in COLUMNS]
        if r["ndcg@10"] == best and len(same) > 1:
            cells[3] = f"**{cells[3]}**"
        cells.append(f"{r['ndcg@10'] / full['ndcg@10']:.1%}" if full and full["ndcg@10"] else "–")
        cells.append(format_megabytes(r["storage_mb_per_million_docs"]))
        if with_sts:
            cells.append(f"{r['sts_spearman']:.4f}" if r.get("sts_spearman") is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ndcg_vs_dim(rows: list[dict], path: str | Path, title: str = "") -> None:
    """nDCG@10 against dim: one line per model x precision (colour = model, line style = precision), BM25 flat."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    dense = [r for r in rows if r["dim"]]
    models = list(dict.fromkeys(r["model"] for r in dense))
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        for precision in dict.fromkeys(r["precision"] for r in dense if r["model"] == model):
            points = sorted((r["dim"], r["ndcg@10"]) for r in dense
                            if (r["model"], r["precision"]) == (model, precision))
            linestyle, marker = STYLES.get(precision, ("-.", "x"))
            ax.plot(*zip(*points), marker=marker, linestyle=linestyle, color=colours[i % len(colours)],
                    label=f"{model} {precision}")
    for r in rows:
        if not r["dim"]:
            ax.axhline(r["ndcg@10"], color="grey", linestyle="--", linewidth=1, label=r["model"])
    dims = sorted({r["dim"] for r in dense})
    if dims:
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.minorticks_off()
    ax.set_xlabel("embedding dimension")
    ax.set_ylabel("nDCG@10")
    ax.set_title(title or "nDCG@10 by dimension")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    atomic_write_bytes(path, png.getvalue())


def _title(info: dict | None) -> str:
    if not info or "data" not in info:
        return ""
    return (f"{Path(info['data']).name} ({info.get('split')}, {info.get('queries')} queries, "
            f"{info.get('documents')} documents)")
