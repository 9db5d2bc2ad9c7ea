"""The fit report as JSON (for machines), Markdown (for people) and PNG plots (Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASS_SUMMARY = ("accuracy", "balanced_accuracy", "roc_auc", "macro_f1")
REG_SUMMARY = ("rmse", "mae", "r2")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def to_markdown(rep: dict) -> str:
    """A readable page: data and split, the CV choice, test scores beside the baseline, curves."""
    t, d, s, te = rep["task"], rep["data"], rep["search"], rep["test"]
    lines = [
        f"# Head `{rep['name']}`",
        "",
        f"Task **{t['name']}**: {t['kind']} on column `{t['label_column']}`; features `{rep['features']['layer']}` "
        f"of model `{rep['features']['model']}` ({rep['features']['dim']}-d).",
        "",
        "## Data",
        "",
        f"- rows with a label: {d['n_rows']}; train {d['n_train']}, test {d['n_test']}",
        f"- split: {d['split']}",
    ]
    for k, v in (d.get("dropped") or {}).items():
        lines.append(f"- dropped, {k.replace('_', ' ')}: {v}")
    if d.get("class_counts"):
        for side, counts in d["class_counts"].items():
            lines.append(f"- {side} classes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines += [
        "",
        "## Model choice (cross-validation on the training split only)",
        "",
        f"Chosen: **{s['best']['head']}**, preprocess `{s['best']['preprocess']}`, alpha {s['best']['alpha']:.4g} "
        f"({s['cv']}, scoring `{s['scoring']}`, {s['seconds']:.1f} s).",
        "",
        "| head | preprocess | alpha | CV score | ± |",
        "|---|---|---|---|---|",
    ]
    best_per = {}
    for row in s["table"]:
        if row.get("screened_out"):  # one fold's score: not comparable with the CV means
            continue
        key = (row["head"], row["preprocess"])
        if key not in best_per or row["score"] > best_per[key]["score"]:
            best_per[key] = row
    for row in sorted(best_per.values(), key=lambda r: -r["score"]):
        lines.append(f"| {row['head']} | {row['preprocess']} | {row['alpha']:.4g} | {row['score']:.4f} | {row['std']:.4f} |")
    lines += ["", f"## Test split ({te['n_test']} rows)", "", "| metric | head | baseline |", "|---|---|---|"]
    names = CLASS_SUMMARY if t["kind"] == "classification" else REG_SUMMARY
    for m in names:
        lines.append(f"| {m} | {_fmt(te['metrics'].get(m))} | {_fmt(te['baseline'].get(m))} |")
    lines.append(f"\nBaseline: always predicts {_fmt(te['baseline'].get('predicts'))} (from the training split).")
    if t["kind"] == "classification":
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for c, m in te["metrics"]["per_class"].items():
            lines.append(f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
        lines += confusion_matrix_markdown(te["metrics"]["confusion_matrix"])
    if rep.get("learning_curve"):
        lc = rep["learning_curve"]
        cols = [k for k in lc[0] if k != "n_train"]
        lines += ["", "## Learning curve (chosen hyper-parameters, scored on the test split)", "",
                  "| n_train | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for row in lc:
            lines.append(f"| {row['n_train']} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    if rep.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in rep["plots"]]
    lines += ["", f"graft {rep.get('versions', {}).get('graft', '')}; seed {rep.get('seed')}.", ""]
    return "\n".join(lines)


def confusion_matrix_markdown(cm: dict) -> list[str]:
    """Markdown lines of a ``{"labels", "matrix"}`` confusion matrix (rows true, columns predicted)."""
    lines = ["", "Confusion matrix (rows: true, columns: predicted)", "", "| | " + " | ".join(cm["labels"]) + " |",
             "|---" * (len(cm["labels"]) + 1) + "|"]
    for lab, row in zip(cm["labels"], cm["matrix"]):
        lines.append(f"| **{lab}** | " + " | ".join(str(v) for v in row) + " |")
    return lines


def plot_confusion_matrix(path: Path, matrix, labels: list, title: str) -> None:
    """Counts with their numbers written in (up to 20 classes); rows true, columns predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix)
    size = min(max(4.0, 2 + 0.5 * len(labels)), 12)  # room for the title with two classes
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(out: Path, rep: dict, curves: dict) -> list[str]:
    """Confusion matrix, learning curve, and ROC (binary) or predicted-vs-true (regression)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kind = rep["task"]["kind"]
    title = rep["name"]
    if kind == "classification":
        cm = rep["test"]["metrics"]["confusion_matrix"]
        labels = cm["labels"]
        plot_confusion_matrix(out / "confusion_matrix.png", cm["matrix"], labels, f"{title}\nconfusion matrix (test split)")
        written.append("confusion_matrix.png")
        if "roc" in curves:
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.plot(curves["roc"]["fpr"], curves["roc"]["tpr"], label=f"head (AUC {rep['test']['metrics']['roc_auc']:.3f})")
            ax.plot([0, 1], [0, 1], "--", color="grey", label="baseline (AUC 0.5)")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel(f"true positive rate ({labels[1]})")
            ax.legend(loc="lower right")
            ax.set_title(f"{title}: ROC")
            fig.tight_layout()
            fig.savefig(out / "roc.png", dpi=100)
            plt.close(fig)
            written.append("roc.png")
    else:
        yt, yp = np.asarray(curves["y_true"], float), np.asarray(curves["y_pred"], float)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(yt, yp, s=8, alpha=0.6)
        lo, hi = float(min(yt.min(), yp.min())), float(max(yt.max(), yp.max()))
        ax.plot([lo, hi], [lo, hi], "--", color="grey", label="y = x")
        ax.axhline(rep["test"]["baseline"]["predicts"], color="red", lw=1, label="baseline (train mean)")
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.legend()
        ax.set_title(f"{title}: predicted vs true")
        fig.tight_layout()
        fig.savefig(out / "pred_vs_true.png", dpi=100)
        plt.close(fig)
        written.append("pred_vs_true.png")
    lc = rep.get("learning_curve") or []
    if lc:
        fig, ax = plt.subplots(figsize=(6, 4))
        n = [r["n_train"] for r in lc]
        keys = ("test_accuracy", "train_accuracy", "baseline_accuracy") if kind == "classification" else (
            "test_rmse", "train_rmse", "baseline_rmse")
        for k, style in zip(keys, ("o-", "s--", ":")):
            ax.plot(n, [r[k] for r in lc], style, label=k.replace("_", " "))
        ax.set_xscale("log")
        ax.set_xlabel("training rows")
        ax.set_ylabel("accuracy" if kind == "classification" else "RMSE")
        ax.legend()
        ax.set_title(f"{title}: learning curve")
        fig.tight_layout()
        fig.savefig(out / "learning_curve.png", dpi=100)
        plt.close(fig)
        written.append("learning_curve.png")
    return written


def write_report(out: Path, rep: dict, curves: dict | None = None) -> list[str]:
    """Write report.json, report.md and the plots into ``out``; returns the file names written."""
    out = Path(out)
    plots = write_plots(out, rep, curves or {}) if curves is not None else []
    rep["plots"] = plots
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(to_markdown(rep))
    return ["report.json", "report.md", *plots]


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
