"""The fine-tuning report: JSON (for machines), Markdown (for people), two PNG plots.

Validation scores are the heads' own (``heads.evaluate``): accuracy, balanced accuracy, ROC-AUC,
per-class precision / recall / F1 and the confusion matrix, beside the majority class of the
training split. The learning curve shows loss and accuracy per epoch, train against validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from heads.evaluate import baseline_metrics, classification_metrics
from heads.report import plot_confusion_matrix

SUMMARY = ("accuracy", "balanced_accuracy", "roc_auc", "macro_f1")


def validation_scores(proba: np.ndarray, y_val: np.ndarray, y_train: np.ndarray, classes: list[str]) -> dict:
    """Metrics of the net's probabilities on the validation rows, and the majority baseline's."""
    names = np.asarray(classes, dtype=object)
    pred = names[np.argmax(proba, axis=1)]
    metrics = classification_metrics(names[y_val], pred, proba, names)
    base = baseline_metrics("classification", names[y_train], names[y_val], names)
    return {"metrics": metrics, "baseline": base, "n_val": int(len(y_val))}


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def to_markdown(rep: dict) -> str:
    t, d, n, s, v = rep["task"], rep["data"], rep["net"], rep["solver"], rep["validation"]
    lines = [
        f"# Fine-tuned `{rep['name']}`",
        "",
        f"From model `{rep['base_model']['name']}`, cut at blob `{n['from_blob']}`, new InnerProduct `{n['new_layer']}` "
        f"({len(rep['classes'])} classes: {', '.join(rep['classes'])}) + Softmax `prob`. Task **{t['name']}** on column "
        f"`{t['label_column']}`.",
        "",
        "## Data",
        "",
        f"- train {d['n_train']} images, validation {d['n_val']}; split: {d['split']}",
    ]
    for side, counts in d["class_counts"].items():
        lines.append(f"- {side}: " + ", ".join(f"{k} {c}" for k, c in counts.items()))
    for k, c in (d.get("dropped") or {}).items():
        lines.append(f"- dropped, {k.replace('_', ' ')}: {c}")
    if rep.get("skipped_images"):
        lines.append(f"- images that failed to decode and were skipped: {len(rep['skipped_images'])}")
    lines += [
        "",
        "## Training",
        "",
        f"{rep['epochs']} epochs, {rep['iterations']} iterations of batch {rep['batch_size']} on {rep['device']} ({rep['precision']}); "
        f"SGD momentum {s['momentum']}, weight decay {s['weight_decay']} ({s['regularization_type']}), base_lr {s['base_lr']}, "
        f"lr_policy {s['lr_policy']}" + (f" (solver {rep['solver_file']})" if rep.get("solver_file") else "") + ".",
        f"Augmentation: {', '.join(rep['augmentation']) or 'none'}."
        + (f" BatchNorm ({len(n['batch_norm_global_stats'])} layers): Caffe's global statistics, not updated (use_global_stats)."
           if n.get("batch_norm_global_stats") else "") + f" Seed {rep['seed']}.",
        "",
        "| layer | type | lr_mult | decay_mult | from |",
        "|---|---|---|---|---|",
    ]
    for lm in n["multipliers"]:
        lines.append(f"| {lm['layer']} | {lm['type']} | {', '.join(f'{m:g}' for m in lm['lr_mult'])} | "
                     f"{', '.join(f'{m:g}' for m in lm['decay_mult'])} | {lm['from']} |")
    lines += ["", "| epoch | lr | train loss | train acc | val loss | val acc | val bal. acc | img/s |", "|---" * 8 + "|"]
    for h in rep["history"]:
        lines.append(f"| {h['epoch']} | {h['lr']:.4g} | {h['train_loss']:.4f} | {h['train_accuracy']:.4f} | {h['val_loss']:.4f} | "
                     f"{h['val_accuracy']:.4f} | {h['val_balanced_accuracy']:.4f} | {h['images_per_s']:.1f} |")
    lines += ["", f"## Validation ({v['n_val']} images, final weights)", "", "| metric | fine-tuned | baseline |", "|---|---|---|"]
    for m in SUMMARY:
        lines.append(f"| {m} | {_fmt(v['metrics'].get(m))} | {_fmt(v['baseline'].get(m))} |")
    lines.append(f"\nBaseline: always predicts {v['baseline']['predicts']} (the training split's majority).")
    cm = v["metrics"]["confusion_matrix"]
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", "", "| | " + " | ".join(cm["labels"]) + " |",
              "|---" * (len(cm["labels"]) + 1) + "|"]
    for lab, row in zip(cm["labels"], cm["matrix"]):
        lines.append(f"| **{lab}** | " + " | ".join(str(x) for x in row) + " |")
    lines += ["", "## Outputs", "", f"- model package: `{rep['package']}`",
              f"- Caffe: `{rep['caffe']['prototxt']}`, `{rep['caffe']['caffemodel']}`"]
    if rep.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in rep["plots"]]
    lines.append("")
    return "\n".join(lines)


def write_plots(out: Path, rep: dict) -> list[str]:
    """``learning_curve.png`` (loss and accuracy by epoch) and ``confusion_matrix.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    hist = rep["history"]
    ep = [h["epoch"] for h in hist]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.plot(ep, [h["train_loss"] for h in hist], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in hist], "s--", label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy loss")
    a1.legend()
    a2.plot(ep, [h["train_accuracy"] for h in hist], "o-", label="train accuracy")
    a2.plot(ep, [h["val_accuracy"] for h in hist], "s--", label="validation accuracy")
    a2.plot(ep, [h["val_balanced_accuracy"] for h in hist], "^:", label="validation balanced accuracy")
    a2.axhline(rep["validation"]["baseline"]["balanced_accuracy"], color="grey", lw=1, label="baseline balanced accuracy (majority)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.legend(fontsize="small")
    fig.suptitle(f"{rep['name']}: learning curve")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=100)
    plt.close(fig)

    cm = rep["validation"]["metrics"]["confusion_matrix"]
    plot_confusion_matrix(out / "confusion_matrix.png", cm["matrix"], cm["labels"], f"{rep['name']}\nconfusion matrix (validation)")
    return ["learning_curve.png", "confusion_matrix.png"]


def write_report(out: Path, rep: dict, *, plots: bool = True) -> list[str]:
    """report.json, report.md and (``plots``) the PNGs into ``out``; the names written."""
    out = Path(out)
    rep["plots"] = write_plots(out, rep) if plots else []
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(to_markdown(rep))
    return ["report.json", "report.md", *rep["plots"]]


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
