"""What a person reads: metrics.json, predictions.csv and one self-contained report.html with PNG
figures, from the results that `evaluate` computed (this module computes no metric)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .data import GROUP_NAMES
from .evaluate import BINARY_TASKS, CVRun, carcinoma_roc
from .outputs import spreadsheet_safe
from .stain import FALLBACK_NOTES
from .storage import write_bytes, write_text_atomic
from .version import __version__

TASK_TITLES = {
    "carcinoma": "carcinoma (1+2) vs non-carcinoma (0)",
    "0v1": "normal/benign (0) vs in situ (1)",
    "0v2": "normal/benign (0) vs invasive (2)",
    "1v2": "in situ (1) vs invasive (2)",
}
DECISIONS = {"majority_vote": "majority vote", "mean_probability": "mean probability"}
# Published 4-class BACH results beside ours, each with its protocol: never a like-for-like claim where they differ.
PUBLISHED_4CLASS = [
    (
        "Rakhlin et al. 2018, ImageNet CNN features + LightGBM (bioRxiv 10.1101/259911)",
        "accuracy 87.2% ± 2.6",
        "10-fold stratified CV on BACH's 400 training images, folds split by image (a patient's images on both sides)",
    ),
    (
        "eva leaderboard, uni2-h (best; docs/backbones.md)",
        "balanced accuracy 0.915",
        "one fixed patient-aware split (268 train / 132 validation), linear probe on whole images resized to 224 px",
    ),
    ("eva leaderboard, DINO ViT-S/16 ImageNet (baseline)", "balanced accuracy 0.675", "as above"),
]


def write_outputs(run: CVRun, out: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write config.json, cv_results.npz, metrics.json, predictions.csv, figures/ and report.html into
    `out` (a staging folder: see `outputs.staged_folder`)."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", run.config.to_json(provenance))
    run.save(out / "cv_results.npz")
    write_metrics(run, out)
    return write_report(run, out)


def write_metrics(run: CVRun, out: Path) -> None:
    metrics = {
        "histoboost": __version__,
        "split_by": run.plan.split_by,
        "folds": run.plan.n_folds,
        "warnings": list(run.plan.warnings),
        "models": {r.model: r.metrics for r in run.results},
        "split_comparison": run.split_comparison,
        "stain_fallbacks": _fallbacks(run),
        "finetuned": run.finetuned,
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "model",
            "name",
            "path",
            "image_id",
            "patient",
            "truth",
            "truth_name",
            "fold",
            "majority",
            "mean_prob_decision",
            "operating_point_decision",
            "class",
            "label",
            "group",
            *(f"p_{c}" for c in run.classes.classes),
            *(f"votes_{c}" for c in run.classes.classes),
            "agreement",
            "refer",
            "stain_fallback",
        ]
    )
    names, labels, groups = run.classes.classes, run.classes.labels, run.classes.groups
    for result in run.results:
        probs, votes, majority, mean_decision = result.mean_probs, result.votes, result.majority, result.mean_decision
        # The class column is the run's decision: the operating point where one was chosen, else majority vote.
        decision = result.decision if result.decision is not None else majority
        refer = _referred(run, result)
        for i in range(len(result.truth)):
            writer.writerow(
                map(
                    spreadsheet_safe,
                    [
                        result.model,
                        run.names[i],
                        run.paths[i],
                        run.image_ids[i],
                        run.patients[i],
                        result.truth[i],
                        names[result.truth[i]],
                        run.plan.folds[i],
                        majority[i],
                        mean_decision[i],
                        "" if result.decision is None else decision[i],
                        names[decision[i]],
                        labels[decision[i]],
                        groups[decision[i]],
                        *(f"{p:.6f}" for p in probs[i]),
                        *votes[i],
                        "" if result.agreement is None else f"{result.agreement[i]:.3f}",
                        refer[i],
                        run.stain_fallbacks[i],
                    ],
                )
            )
    write_text_atomic(out / "predictions.csv", buffer.getvalue())


def _referred(run: CVRun, result) -> list[str]:
    """Why each image would go to a pathologist: split votes (at the operating point) or a stain fallback."""
    split, failed = result.referred, run.stain_fallbacks != ""
    return [
        "; ".join(why for why, hit in (("votes split", split[i]), ("stain QC failed", failed[i])) if hit)
        for i in range(len(run.truth))
    ]


def _fallbacks(run: CVRun) -> dict[str, str]:
    return {str(run.names[i]): str(run.stain_fallbacks[i]) for i in np.flatnonzero(run.stain_fallbacks != "")}


def accuracy_table(run: CVRun) -> str:
    """The plain-text summary the command line prints."""
    lines = [f"{'model':<40} {'acc (majority)':>22} {'acc (mean prob)':>22} {'carcinoma sens':>15} {'spec':>6}"]
    for result in run.results:
        m = result.metrics
        maj, mean = m["majority_vote"], m["mean_probability"]
        carc = maj["binary"]["carcinoma"]
        lines.append(
            f"{result.model:<40} {_pct_ci(maj['accuracy'], maj['accuracy_ci']):>22} "
            f"{_pct_ci(mean['accuracy'], mean['accuracy_ci']):>22} {_pct(carc['sensitivity']):>15} "
            f"{_pct(carc['specificity']):>6}"
        )
    for result in run.results:
        if "operating_point" in result.metrics:
            op = result.metrics["operating_point"]
            carc = op["binary"]["carcinoma"]
            lines.append(
                f"{result.model + ' (operating point)':<40} {_pct_ci(op['accuracy'], op['accuracy_ci']):>22} "
                f"{'':>22} {_pct(carc['sensitivity']):>15} {_pct(carc['specificity']):>6}"
                f"  refer {_pct(op['refer_rate'])}"
            )
    for result in run.results:
        if "classes" in result.metrics:
            m = result.metrics["classes"]
            maj, mean = m["majority_vote"], m["mean_probability"]
            name = f"{result.model} ({len(m['names'])} classes)"
            lines.append(
                f"{name:<40} "
                f"{_pct_ci(maj['accuracy'], maj['accuracy_ci']):>22} "
                f"{_pct_ci(mean['accuracy'], mean['accuracy_ci']):>22}"
                f"  balanced {_pct_ci(maj['balanced_accuracy'], maj['balanced_accuracy_ci'])}"
            )
    others = [row for row in run.split_comparison if row["split_by"] != run.plan.split_by]
    for row in others:
        lines.append(
            f"{row['model'] + ' split by ' + row['split_by']:<40} {_pct_ci(row['accuracy'], row['accuracy_ci']):>22} "
            f"{'':>22} {_pct(row['carcinoma_sensitivity']):>15} {_pct(row['carcinoma_specificity']):>6}"
        )
    return "\n".join(lines)


def write_report(run: CVRun, out: Path) -> Path:
    """report.html: one file, figures embedded (and also saved under figures/)."""
    figures = {
        "confusion": _confusion_figure(run),
        "roc": _roc_figure(run),
        "folds": _folds_figure(run),
        "reliability": _reliability_figure(run),
    }
    for name, png in figures.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    class_counts = ", ".join(f"{c} {int((run.truth == k).sum())}" for k, c in enumerate(run.classes.classes))
    c = run.config
    protocol = [
        (
            "images",
            f"{len(run.truth)} ({class_counts})",
        ),
        ("split", f"{run.plan.n_folds}-fold StratifiedGroupKFold by <b>{html.escape(run.plan.split_by)}</b>"),
        (
            "preprocessing",
            f"scale {c.preprocess.scale}"
            + (f", target {c.preprocess.target_mpp} µm/px" if c.preprocess.target_mpp else "")
            + f", stain {c.preprocess.stain.method}",
        ),
        (
            "augmentation",
            f"A = {c.augment.n_augment} {c.augment.color}, C = {c.augment.n_crops} crops of "
            f"{c.augment.crop_size} px, orientation {c.augment.orientation}",
        ),
        (
            "features",
            f"{', '.join(c.features.backbones)}; {c.features.mode} mode, {c.features.crop_pooling} crop pooling, "
            f"descriptor {c.features.descriptor}",
        ),
        ("classifier", _classifier_text(c)),
        ("seed", str(c.seed)),
    ]
    if run.finetuned:
        f = c.finetune
        protocol.insert(
            -2,
            (
                "fine-tuning",
                f"inside each outer fold, on its training images only: up to {f.epochs} "
                f"epochs of {f.crops_per_image} crops of {c.finetune_crop_size} px per image, lr "
                f"{f.learning_rate:g}, label smoothing {f.label_smoothing}, "
                f"{'class-balanced, ' if f.class_balance else ''}freeze {f.freeze_stages} stage(s), "
                f"early stopping (patience {f.patience}) on {f.validation_fraction:.0%} of the training "
                "units",
            ),
        )
    honesty = (
        "Evaluated on a labelled set held out from training, with a trained bundle: this estimates "
        "accuracy on new patients if none of these patients was in the training data."
        if run.plan.split_by == "held-out set"
        else "Folds are split by image: every image of a patient can be in training while another is tested, "
        "so this <b>overstates accuracy on new patients</b>."
        if run.plan.split_by == "image"
        else f"Folds are split by <b>{html.escape(run.plan.split_by)}</b>: no {html.escape(run.plan.split_by)} is "
        "in both training and test, so this estimates accuracy on new patients"
        + (" (id_block is a proxy for patients)." if run.plan.split_by == "id_block" else ".")
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        "<title>histoboost cross-validation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>histoboost cross-validation report</h1>",
        "<p class='warn'>Research use only; not for diagnosis.</p>",
        f"<p class='honest'>{honesty}</p>",
        *(f"<p class='warn'>{html.escape(w)}</p>" for w in run.plan.warnings),
        "<h2>Protocol</h2>",
        _table([], protocol),
        "<h2>Accuracy</h2>",
        "<p>Pooled over all images (the seed study's headline: 84.5% ResNet50, 88% Xception, split by image), "
        "with a 95% bootstrap interval over split units; per-fold mean &plusmn; standard deviation beside it.</p>",
        _table(
            ["model", "majority vote", "mean probability", "folds (majority)", "balanced acc.", "carcinoma AUC"],
            [
                (
                    html.escape(r.model),
                    _pct_ci(r.metrics["majority_vote"]["accuracy"], r.metrics["majority_vote"]["accuracy_ci"]),
                    _pct_ci(r.metrics["mean_probability"]["accuracy"], r.metrics["mean_probability"]["accuracy_ci"]),
                    f"{_pct(r.metrics['majority_vote']['fold_mean'])} &plusmn; "
                    f"{_pct(r.metrics['majority_vote']['fold_std'])}",
                    _pct(r.metrics["majority_vote"]["balanced_accuracy"]),
                    _num(r.metrics["auc"]["carcinoma"]),
                )
                for r in run.results
            ],
        ),
        _classes_section(run),
        _split_comparison(run),
        _operating_point(run),
        "<h2>Confusion matrices (majority vote; rows = truth, columns = prediction)</h2>",
        _img(figures["confusion"]),
        "<h2>Binary tasks (layout of the seed study's Table 1)</h2>",
        "<p>Standard definitions: positive = carcinoma, or the higher group of a pair, computed on the pair's 2x2 "
        "sub-matrix. (The seed study's Table 1 swaps rows and columns of its own confusion matrices.)</p>",
        *(_binary_table(r) for r in run.results),
        "<h2>ROC, carcinoma vs non-carcinoma (mean probability p1 + p2)</h2>",
        _img(figures["roc"]),
        "<h2>Accuracy per fold</h2>",
        _img(figures["folds"]),
        _calibration_section(run, figures["reliability"]),
        _finetune_section(run),
        "<h2>Stain quality control</h2>",
        _stain_section(run),
        "<h2>Misclassified images</h2>",
        _misclassified(run),
        f"<footer>histoboost {__version__}</footer></body></html>",
    ]
    path = out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path


# -- pieces --------------------------------------------------------------------------------------


def _classifier_text(c) -> str:
    k = c.classifier
    text = (
        f"logistic regression on standardised features, C = {k.C}"
        if k.kind == "logistic"
        else f"XGBoost hist, {k.n_estimators} rounds"
        + (f" (early stopping after {k.early_stopping_rounds})" if k.early_stopping_rounds else "")
        + f", depth {k.max_depth}, eta {k.learning_rate}"
    )
    if k.target_sensitivity is not None:
        text += f"; decision: carcinoma threshold for sensitivity {k.target_sensitivity} on {k.inner_folds} inner folds"
    else:
        text += "; decision: argmax (majority vote over augmentations)"
    if k.calibrate:
        text += "; temperature-calibrated"
    return text


def _classes_section(run: CVRun) -> str:
    """With classes other than the 3 groups (e.g. BACH's 4): their accuracy and balanced accuracy from the same
    predictions as the 3-group tables, their confusion matrices, and published results with their protocols."""
    if run.classes.is_groups:
        return ""
    rows, matrices = [], []
    for r in run.results:
        m = r.metrics["classes"]
        for decision in ("majority_vote", "operating_point"):
            if decision in m:
                d = m[decision]
                rows.append(
                    (
                        html.escape(r.model),
                        DECISIONS.get(decision, "operating point"),
                        _pct_ci(d["accuracy"], d["accuracy_ci"]),
                        _pct_ci(d["balanced_accuracy"], d["balanced_accuracy_ci"]),
                    )
                )
        cm = m["majority_vote"]["confusion"]
        matrices.append(
            f"<h3>{html.escape(r.model)}, majority vote (rows = truth)</h3>"
            + _table(["", *run.classes.classes], [(c, *row) for c, row in zip(run.classes.classes, cm)])
        )
    published = _table(["published", "result", "protocol"], PUBLISHED_4CLASS) if run.classes.name == "bach4" else ""
    return (
        f"<h2>{len(run.classes.classes)} classes ({html.escape(', '.join(run.classes.labels))})</h2>"
        "<p>The classifier tells these classes apart; every 3-group number in this report is derived from the same "
        "predictions (probabilities summed per group; the decision is taken group first, then class).</p>"
        + _table(["model", "decision", "accuracy", "balanced accuracy"], rows)
        + "".join(matrices)
        + (
            f"<p>Published results on BACH, each with its protocol. Ours: cross-validation on these images split by "
            f"<b>{html.escape(run.plan.split_by)}</b>, crops at the working scale. <b>Where the protocols differ, "
            "the numbers are not comparable</b>: image-level folds overstate accuracy on new patients, and eva's "
            "fixed split is one draw of one split.</p>" + published
            if published
            else ""
        )
    )


def _split_comparison(run: CVRun) -> str:
    rows = run.split_comparison
    if not any(r["split_by"] != run.plan.split_by for r in rows):
        return ""
    honest = [r for r in rows if r["new_patients"]]
    by_image = {r["model"]: r for r in rows if not r["new_patients"]}
    gaps = [by_image[r["model"]]["accuracy"] - r["accuracy"] for r in honest if r["model"] in by_image]
    note = (
        f" Here grouping by image reads {100 * np.mean(gaps):+.1f} points against the split that keeps "
        f"{html.escape(honest[0]['split_by'])} units apart."
        if gaps and honest
        else ""
    )
    return (
        "<h2>Split by image vs split by patient</h2><p>The same features and classifier, folds grouped two ways. "
        "Only the split that keeps a patient's images (or a proxy unit's) on one side estimates accuracy on "
        f"<b>new patients</b>; the image split is the seed study's protocol and overstates it.{note}</p>"
        + _table(
            [
                "model",
                "split by",
                "folds",
                "estimates new patients",
                "accuracy (majority)",
                "carcinoma sensitivity",
                "specificity",
            ],
            [
                (
                    html.escape(r["model"]),
                    html.escape(r["split_by"]),
                    r["folds"],
                    "yes" if r["new_patients"] else "no",
                    _pct_ci(r["accuracy"], r["accuracy_ci"]),
                    _pct(r["carcinoma_sensitivity"]),
                    _pct(r["carcinoma_specificity"]),
                )
                for r in rows
            ],
        )
    )


def _operating_point(run: CVRun) -> str:
    rows = []
    for r in run.results:
        op = r.metrics.get("operating_point")
        if op is None:
            continue
        carc = op["binary"]["carcinoma"]
        thresholds = [t for t in op["thresholds"] if t is not None]
        rows.append(
            (
                html.escape(r.model),
                f"{min(thresholds):.3f}&ndash;{max(thresholds):.3f}" if thresholds else "majority vote",
                f"{min(op['temperatures']):.2f}&ndash;{max(op['temperatures']):.2f}",
                _pct_ci(op["accuracy"], op["accuracy_ci"]),
                _pct_ci(carc["sensitivity"], carc.get("sensitivity_ci")),
                _pct_ci(carc["specificity"], carc.get("specificity_ci")),
                _pct(op["refer_rate"]),
                _pct(op["accuracy_not_referred"]),
                f"{op['log_loss']:.3f} &rarr; {op['log_loss_calibrated']:.3f}",
            )
        )
    if not rows:
        return ""
    return (
        "<h2>Operating point</h2><p>Chosen inside each outer fold's training images by inner cross-validation "
        "grouped like the outer folds (never on the test fold): carcinoma when the mean p(in situ) + p(invasive) "
        "reaches the threshold, then the larger of the two. Images whose augmentations disagree, or whose stain "
        "normalisation failed, are referred to a pathologist.</p>"
        + _table(
            [
                "model",
                "threshold (per fold)",
                "temperature",
                "accuracy",
                "carcinoma sensitivity",
                "specificity",
                "referred",
                "accuracy not referred",
                "log loss raw &rarr; calibrated",
            ],
            rows,
        )
    )


def _finetune_section(run: CVRun) -> str:
    if not run.finetuned:
        return ""
    rows = [
        (
            r["fold"] + 1,
            html.escape(r["backbone"]),
            r["train_images"],
            r["validation_images"],
            r["test_images"],
            r["test_images_in_finetuning"],
            f"{r['best_epoch']} of {r['epochs_run']}",
            _pct(r["best_val_accuracy"]),
            f"{r['seconds']:.0f} s" + (" (reused)" if r["reused"] else ""),
            r["weights_sha256"][:12],
        )
        for r in run.finetuned
    ]
    return (
        "<h2>Fine-tuning inside the folds</h2><p>Each backbone was fine-tuned in every outer fold on that "
        "fold's training images only (its validation part split off from them by whole units), then every image "
        "was described with the fold's weights. The test images of a fold never reach its fine-tuning: the run "
        "checks each fold's fine-tuning card against its test images and stops if one is there. No split "
        "comparison is run with fine-tuning (it would fine-tune again for every fold of the other split).</p>"
        + _table(
            [
                "fold",
                "backbone",
                "train images",
                "validation images",
                "test images",
                "test images seen",
                "best epoch",
                "validation accuracy",
                "training time",
                "weights sha256",
            ],
            rows,
        )
    )


def _stain_section(run: CVRun) -> str:
    fallbacks = _fallbacks(run)
    if not fallbacks:
        return f"<p>All {len(run.truth)} images passed the stain quality check.</p>"
    items = "".join(f"<li>{html.escape(name)}: {FALLBACK_NOTES[how]}</li>" for name, how in fallbacks.items())
    return (
        f"<p class='warn'>{len(fallbacks)} image(s) failed the stain quality check after normalisation and fell "
        f"back as configured (preprocess.stain.on_failure); they are referred:</p><ul>{items}</ul>"
    )


def _binary_table(result) -> str:
    rows = []
    for decision, label in DECISIONS.items():
        binary = result.metrics[decision]["binary"]
        for task in BINARY_TASKS:
            b = binary[task]
            rows.append(
                (
                    label,
                    TASK_TITLES[task],
                    *(_pct_ci(b[m], b.get(f"{m}_ci")) for m in ("sensitivity", "specificity", "precision", "accuracy")),
                    _num(result.metrics["auc"][task]) if decision == "mean_probability" else "",
                )
            )
    return f"<h3>{html.escape(result.model)}</h3>" + _table(
        ["decision", "task", "sensitivity", "specificity", "precision", "accuracy", "ROC AUC"], rows
    )


def _misclassified(run: CVRun) -> str:
    result = run.results[0]
    wrong = np.flatnonzero(result.majority != result.truth)
    if not len(wrong):
        return "<p>None.</p>"
    cells = []
    names = result.classes.classes
    for i in wrong:
        probs = ", ".join(f"{p:.2f}" for p in result.mean_probs[i])
        cells.append(
            f"<figure>{_thumbnail(run.paths[i])}<figcaption>{html.escape(str(run.names[i]))}<br>"
            f"truth <b>{names[result.truth[i]]}</b>, predicted <b>{names[result.majority[i]]}</b>"
            f"<br>votes {result.votes[i].tolist()}, p = [{probs}]</figcaption></figure>"
        )
    return f"<p>By {html.escape(result.model)}, majority vote.</p><div class='thumbs'>{''.join(cells)}</div>"


def _thumbnail(path: str, size: int = 160) -> str:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except OSError:
        return "<div class='missing'>image not found</div>"
    return f"<img src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}' alt=''>"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _confusion_figure(run: CVRun) -> bytes:
    n = len(run.results)
    plt, fig = _figure(3.6 * n, 3.4)
    labels = ["normal/\nbenign", "in situ", "invasive"]
    for k, result in enumerate(run.results):
        ax = fig.add_subplot(1, n, k + 1)
        cm = np.asarray(result.metrics["majority_vote"]["confusion"])
        ax.imshow(cm, cmap="Blues")
        for i in range(3):
            for j in range(3):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                    fontsize=12,
                )
        ax.set_xticks(range(3), labels, fontsize=8)
        ax.set_yticks(range(3), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("truth")
        ax.set_title(result.model, fontsize=9)
    return _png(plt, fig)


def _roc_figure(run: CVRun) -> bytes:
    plt, fig = _figure(4.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for result in run.results:
        grouped = result.grouped()
        curve = carcinoma_roc(grouped.truth, grouped.mean_probs)
        if curve is not None:
            ax.plot(curve[0], curve[1], label=f"{result.model} (AUC {_num(result.metrics['auc']['carcinoma'])})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity (carcinoma)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(plt, fig)


def _folds_figure(run: CVRun) -> bytes:
    plt, fig = _figure(max(4.0, 1.2 * run.plan.n_folds), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(run.results)
    for k, result in enumerate(run.results):
        acc = result.metrics["majority_vote"]["per_fold_accuracy"]
        ax.bar(np.arange(len(acc)) + k * width, acc, width, label=result.model)
    ax.set_xticks(np.arange(run.plan.n_folds) + 0.4 - width / 2, [f"fold {k + 1}" for k in range(run.plan.n_folds)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (majority vote)")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def _reliability_figure(run: CVRun) -> bytes:
    plt, fig = _figure(4.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for result in run.results:
        for kind, style in (("raw", "-"), ("calibrated", "--")):
            curve = result.metrics["calibration"].get(kind)
            if curve:
                ax.plot(
                    [b["confidence"] for b in curve["bins"]],
                    [b["accuracy"] for b in curve["bins"]],
                    style,
                    marker="o",
                    label=f"{result.model}, {kind} (ECE {curve['ece']:.3f})",
                )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted group (mean probability)")
    ax.set_ylabel("share correct")
    ax.legend(fontsize=7, loc="upper left")
    return _png(plt, fig)


def _calibration_section(run: CVRun, figure: bytes) -> str:
    rows = [
        (
            html.escape(r.model),
            _num(r.metrics["calibration"]["raw"]["ece"]),
            _num(r.metrics["calibration"]["calibrated"]["ece"])
            if "calibrated" in r.metrics["calibration"]
            else "not calibrated (--calibrate)",
        )
        for r in run.results
    ]
    return (
        "<h2>Calibration</h2><p>Expected calibration error (ECE) of each image's mean probabilities: in 10 "
        "confidence bins, how far the share of correct decisions is from the confidence, weighted by the images "
        "in each bin (0 = probabilities mean what they say). With <code>--calibrate</code>, a temperature fitted "
        "on inner folds of each outer fold's training images is applied to its test images.</p>"
        + _table(["model", "ECE raw", "ECE calibrated"], rows)
        + _img(figure)
    )


def _img(png: bytes) -> str:
    return f"<img class='figure' src='data:image/png;base64,{base64.b64encode(png).decode()}' alt=''>"


def _table(header: list[str], rows: list[tuple]) -> str:
    head = f"<thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _pct_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return _pct(value) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f0f0f0; }
.warn { color: #a15c00; } .honest { background: #eef5ff; padding: 0.6em; border-left: 4px solid #3b7dd8; }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; width: 170px; font-size: 0.75em; }
img.figure { max-width: 100%; } footer { margin-top: 3em; color: #888; font-size: 0.8em; }
"""


OVERLAY_LEGEND_HEIGHT = 64


def write_overlay(
    image_path: str | Path,
    grid: np.ndarray,
    predicted: int,
    out: Path,
    max_side: int = 1024,
    class_name: str | None = None,
) -> Path:
    """PNG of the image with the probability of the predicted class per feature-map cell laid over the
    tissue, and a legend that says the map is exploratory. Size: the image (longest side at most
    `max_side`) plus a legend strip of OVERLAY_LEGEND_HEIGHT pixels."""
    import matplotlib
    from PIL import Image, ImageDraw

    from .stain import tissue_mask

    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
        image.thumbnail((max_side, max_side))
        base = np.asarray(image)
    h, w = base.shape[:2]
    prob = np.asarray(
        Image.fromarray(grid[..., predicted].astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    )
    colors = matplotlib.colormaps["turbo"](np.clip(prob, 0, 1))[..., :3] * 255
    alpha = 0.5 * tissue_mask(base)[..., None]
    blended = (base * (1 - alpha) + colors * alpha).astype(np.uint8)
    canvas = Image.new("RGB", (w, h + OVERLAY_LEGEND_HEIGHT), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    bar = (matplotlib.colormaps["turbo"](np.linspace(0, 1, 200))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(bar[None], 12, axis=0)), (8, h + 8))
    draw.text((8, h + 22), "0", fill="black")
    draw.text((200, h + 22), "1", fill="black")
    name = class_name or GROUP_NAMES[predicted]
    draw.text((220, h + 6), f"predicted: {name}; colour = p({name}) per feature-map cell over tissue", fill="black")
    draw.text((220, h + 24), "EXPLORATORY: the classifier was trained on vectors pooled over crops,", fill="black")
    draw.text((220, h + 40), "not on single cells. Research use only; not for diagnosis.", fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    write_bytes(out, buffer.getvalue())
    return out
