"""The fine-tuning report: JSON (for machines), Markdown (for people), two PNG plots.

Validation scores are the heads' own (``heads.evaluate``). Classification: accuracy, balanced
accuracy, ROC-AUC, per-class precision / recall / F1 and the confusion matrix, beside the
majority class of the training split; the plots are the learning curve (loss and accuracy per
epoch, train against validation) and the confusion matrix. Regression: RMSE, MAE and R² beside
the training mean; the plots are the learning curve (EuclideanLoss and RMSE per epoch, the
baseline's RMSE as a line) and predicted against true values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from heads.evaluate import baseline_metrics, classification_metrics, regression_metrics
from heads.report import confusion_matrix_markdown, plot_confusion_matrix

SUMMARY = ("accuracy", "balanced_accuracy", "roc_auc", "macro_f1")
REGRESSION_SUMMARY = ("rmse", "mae", "r2")


def validation_scores(proba: np.ndarray, y_val: np.ndarray, y_train: np.ndarray, classes: list[str]) -> dict:
    """Metrics of the net's probabilities on the validation rows, and the majority baseline's."""
    names = np.asarray(classes, dtype=object)
    pred = names[np.argmax(proba, axis=1)]
    metrics = classification_metrics(names[y_val], pred, proba, names)
    base = baseline_metrics("classification", names[y_train], names[y_val], names)
    return {"metrics": metrics, "baseline": base, "n_val": int(len(y_val))}


def regression_scores(pred: np.ndarray, y_val: np.ndarray, y_train: np.ndarray) -> dict:
    """RMSE, MAE and R² of the net's outputs on the validation rows, and the training mean's."""
    metrics = regression_metrics(y_val, np.asarray(pred, np.float64).reshape(len(y_val)))
    base = baseline_metrics("regression", y_train, y_val)
    return {"metrics": metrics, "baseline": base, "n_val": int(len(y_val))}


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _is_regression(rep: dict) -> bool:
    return rep["task"].get("kind") == "regression"


def to_markdown(rep: dict) -> str:
    t, d, n, s, v = rep["task"], rep["data"], rep["net"], rep["solver"], rep["validation"]
    regression = _is_regression(rep)
    if regression:
        head = (f"new InnerProduct `{n['new_layer']}` (1 output, bias initialised to the training mean "
                f"{n['bias_init']:.4g}; no Softmax: `{n['output']}` is the prediction), trained with EuclideanLoss")
    else:
        head = f"new InnerProduct `{n['new_layer']}` ({len(rep['classes'])} classes: {', '.join(rep['classes'])}) + Softmax `prob`"
    lines = [
        f"# Fine-tuned `{rep['name']}`",
        "",
        f"From model `{rep['base_model']['name']}`, cut at blob `{n['from_blob']}`, {head}. Task **{t['name']}** "
        f"({t.get('kind', 'classification')}) on column `{t['label_column']}`.",
        "",
        "## Data",
        "",
        f"- train {d['n_train']} images, validation {d['n_val']}; split: {d['split']}",
    ]
    if regression:
        for side, st in d["target"].items():
            if st.get("n"):
                lines.append(f"- {side}: mean {st['mean']:.4g}, std {st['std']:.4g}, range {st['min']:.4g} to {st['max']:.4g}")
    else:
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
        f"lr_policy {s['lr_policy']}" + (f", clip_gradients {s['clip_gradients']:g}" if s.get("clip_gradients", -1) > 0 else "")
        + (f" (solver {rep['solver_file']})" if rep.get("solver_file") else "") + ".",
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
    if regression:
        lines += ["", "| epoch | lr | train loss | train RMSE | val loss | val RMSE | val MAE | val R² | img/s |", "|---" * 9 + "|"]
        for h in rep["history"]:
            lines.append(f"| {h['epoch']} | {h['lr']:.4g} | {h['train_loss']:.4g} | {h['train_rmse']:.4g} | {h['val_loss']:.4g} | "
                         f"{h['val_rmse']:.4g} | {h['val_mae']:.4g} | {h['val_r2']:.4f} | {h['images_per_s']:.1f} |")
        lines.append("\nLoss: Caffe's EuclideanLoss, sum((prediction - true)²) / (2N).")
    else:
        lines += ["", "| epoch | lr | train loss | train acc | val loss | val acc | val bal. acc | img/s |", "|---" * 8 + "|"]
        for h in rep["history"]:
            lines.append(f"| {h['epoch']} | {h['lr']:.4g} | {h['train_loss']:.4f} | {h['train_accuracy']:.4f} | {h['val_loss']:.4f} | "
                         f"{h['val_accuracy']:.4f} | {h['val_balanced_accuracy']:.4f} | {h['images_per_s']:.1f} |")
    lines += ["", f"## Validation ({v['n_val']} images, final weights)", "", "| metric | fine-tuned | baseline |", "|---|---|---|"]
    for m in REGRESSION_SUMMARY if regression else SUMMARY:
        lines.append(f"| {m} | {_fmt(v['metrics'].get(m))} | {_fmt(v['baseline'].get(m))} |")
    if regression:
        lines.append(f"\nBaseline: always predicts {v['baseline']['predicts']:.4g} (the training split's mean).")
    else:
        lines.append(f"\nBaseline: always predicts {v['baseline']['predicts']} (the training split's majority).")
        lines += confusion_matrix_markdown(v["metrics"]["confusion_matrix"])
    lines += ["", "## Outputs", "", f"- model package: `{rep['package']}`",
              f"- Caffe: `{rep['caffe']['prototxt']}`, `{rep['caffe']['caffemodel']}`"]
    if rep.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in rep["plots"]]
    lines.append("")
    return "\n".join(lines)


def write_plots(out: Path, rep: dict, val: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
    """``learning_curve.png`` (loss and accuracy by epoch) and ``confusion_matrix.png``; for a
    regressor the learning curve (loss and RMSE) and ``pred_vs_true.png`` from ``val`` = (true, predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if _is_regression(rep):
        return _regression_plots(out, rep, val, plt, MaxNLocator)
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


def _regression_plots(out: Path, rep: dict, val, plt, MaxNLocator) -> list[str]:
    hist = rep["history"]
    ep = [h["epoch"] for h in hist]
    base = rep["validation"]["baseline"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.plot(ep, [h["train_loss"] for h in hist], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in hist], "s--", label="validation")
    a1.axhline(base["rmse"] ** 2 / 2, color="grey", lw=1, label="baseline (train mean)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("EuclideanLoss (sum of squares / 2N)")
    a1.legend()
    a2.plot(ep, [h["train_rmse"] for h in hist], "o-", label="train RMSE")
    a2.plot(ep, [h["val_rmse"] for h in hist], "s--", label="validation RMSE")
    a2.axhline(base["rmse"], color="grey", lw=1, label="baseline RMSE (train mean)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("RMSE")
    a2.legend(fontsize="small")
    fig.suptitle(f"{rep['name']}: learning curve")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=100)
    plt.close(fig)
    written = ["learning_curve.png"]
    if val is not None and len(val[0]):
        yt, yp = np.asarray(val[0], float), np.asarray(val[1], float).reshape(len(val[0]))
        m = rep["validation"]["metrics"]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(yt, yp, s=10, alpha=0.6, label=f"validation (RMSE {m['rmse']:.3g}, R² {_fmt(m['r2'])})")
        lo, hi = float(min(yt.min(), yp.min())), float(max(yt.max(), yp.max()))
        ax.plot([lo, hi], [lo, hi], "--", color="grey", label="y = x")
        ax.axhline(base["predicts"], color="red", lw=1, label=f"baseline (train mean, RMSE {base['rmse']:.3g})")
        ax.set_xlabel(f"true {rep['task']['label_column']}")
        ax.set_ylabel("predicted")
        ax.legend(fontsize="small")
        ax.set_title(f"{rep['name']}: predicted vs true (validation)")
        fig.tight_layout()
        fig.savefig(out / "pred_vs_true.png", dpi=100)
        plt.close(fig)
        written.append("pred_vs_true.png")
    return written


def write_report(out: Path, rep: dict, *, plots: bool = True, val: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
    """report.json, report.md and (``plots``) the PNGs into ``out``; the names written.
    ``val`` = (true, predicted) of the validation rows, for a regressor's scatter plot."""
    out = Path(out)
    rep["plots"] = write_plots(out, rep, val) if plots else []
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(to_markdown(rep))
    return ["report.json", "report.md", *rep["plots"]]


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
