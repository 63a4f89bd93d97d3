"""ROC curves of every hallucination detector under every correctness label of one predictions file, as a PNG:
``neurolight-qa-scores FILE.json --plot`` (docs/send.md, Evaluating hallucination detection)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from neurolight.lightning_modules.send.detection_eval import (
    LABELS,
    METHODS,
    Settings,
    detection_table,
    interval_text,
    labelled_answers,
    oriented_scores,
    roc_curve,
)


def plot_roc_curves(rows: Sequence[dict], target: Path, title: str, settings: Settings | None = None) -> Path:
    """One panel per label the answers have, one curve per method with an AUROC there (legend: AUROC and its
    interval); a label without enough answers of a class shows the reason instead of curves."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    table = detection_table(rows, settings)
    labels = [label for label in LABELS if any(label in cells for cells in table.values())]
    if not labels:
        raise ValueError(f"no answer in {target.stem} has a detection score and a label: nothing to plot")
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 4.4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        ax.set(title=LABELS[label].title, xlabel="false-positive rate", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        for method, cells in table.items():
            cell = cells[label]
            if cell["auroc"] is None:
                continue
            usable = labelled_answers(rows, [method], label)
            fpr, tpr = roc_curve(oriented_scores(usable, method), [row["hallucinated"][label] for row in usable])
            name = f"{METHODS[method].title} {cell['auroc']:.2f} {interval_text(cell)}"
            ax.plot(fpr, tpr, lw=1.5, label=name)  # straight segments: a run of tied scores is a diagonal
        some = next(iter(table.values()))[label]
        if some["auroc"] is None:
            ax.text(0.5, 0.5, some["note"].replace(" (", "\n("), ha="center", va="center", wrap=True, fontsize=9)
        else:
            ax.legend(loc="lower right", fontsize=7, title=f"{some['n_correct']} correct, "
                      f"{some['n_hallucinated']} hallucinated", title_fontsize=7)  # fmt: skip
    axes[0][0].set_ylabel("true-positive rate (hallucinations caught)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target
