"""Large-batch training with and without adaptive gradient clipping (AGC).

Claim (Brock et al., "High-Performance Large-Scale Image Recognition Without
Normalization", 2021, Figure 2): without AGC, NF-ResNets become unstable at large
batch sizes and learning rates where their batch-normalized twins still train;
AGC lets the NF-ResNet train there.

Here: Fashion-MNIST at batch 1024, one epoch (58 SGD-Nesterov steps, 0.2 epochs
of linear warmup then cosine, weight decay 1e-4, flips only), learning rate
0.1, 0.4, 1.6 per 256 examples (0.4, 1.6, 6.4 at batch 1024). Models, all with a
3x3 stride-1 stem of width 8 and three single-block bottleneck stages of widths
16/32/64 (bottleneck ratio 0.5):

- ``nf``: the NF-ResNet of ``configs/default.py`` (``nf_resnet26_small``),
  no AGC;
- ``nf_agc0.01`` / ``nf_agc0.1``: the same with AGC, clip 0.01 and 0.1
  (the classifier excluded, as in the paper);
- ``bn``: its batch-norm twin, the pre-activation bottleneck ResNet
  (``resnet50_v2_small``) with the same stages, BN over the whole batch.

A run fails when it diverges (raises, or ends with a non-finite test loss) or ends
at chance accuracy with a finite loss (the trainer skips non-finite steps, so an
unstable run may end at chance rather than at NaN; ``skipped_steps`` counts them).

``--quick``: one stage of width 4, batch 64, 2 steps.
"""

from __future__ import annotations

import sys

from experiments import grid

LRS = (0.1, 0.4, 1.6)
MODELS = {"nf": 0.0, "nf_agc0.01": 0.01, "nf_agc0.1": 0.1, "bn": 0.0}


def sizes(quick: bool) -> dict:
    shared = {
        **grid.QUIET,
        "batch_size": 64 if quick else 1024,
        "eval_batch_size": 64 if quick else 1000,
        "num_train_steps": 2 if quick else 58,
        "warmup_epochs": 0.0 if quick else 0.2,
        "log_every_steps": 1 if quick else 10,
        "checkpoint_every_steps": 0,
        "optimizer": "sgd",
        "lr_base_batch_size": 256,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "ema": "none",
        "label_smoothing": 0.0,
        "augment.crop_padding": 0,
        "augment.flip": True,
        "precise_bn_batches": 0,
        "model_kwargs.stem_width": 4 if quick else 8,
        "model_kwargs.widths": (4,) if quick else (16, 32, 64),
        "model_kwargs.depths": (1,) if quick else (1, 1, 1),
        "model_kwargs.bottleneck_ratio": 0.5,
    }
    return shared


def cells(quick: bool) -> list[grid.Cell]:
    out = []
    for model, clip in MODELS.items():
        for lr in LRS:
            overrides = {**sizes(quick), "learning_rate": lr, "agc_clip": clip}
            if model == "bn":
                config = "fashion_mnist_norms"
                overrides.update(
                    {
                        "model": "resnet50_v2_small",
                        "model_kwargs.norm": "batch_norm",
                        "model_kwargs.norm_kwargs": {},
                        "model_kwargs.ws_conv": False,
                        "sync_batch_stats": "all",
                    }
                )
            else:
                config = "default"
                overrides["model_kwargs.stem_stride"] = 1
            info = {"model": model, "lr": lr, "agc_clip": clip}
            out.append(grid.Cell(f"{model}_lr{lr}", config, overrides, 1, info))
    return out


def table(entries: list[dict]) -> str:
    by = {(e["info"]["model"], e["info"]["lr"]): e for e in entries}
    headers = ["model (test accuracy %)", *(f"lr {lr}/256 ({lr * 4:g} at 1024)" for lr in LRS)]
    rows = [[m, *(grid.pct(by.get((m, lr))) for lr in LRS)] for m in MODELS]
    text = grid.markdown_table(headers, rows)
    skipped = [f"{e['key']}: {e['skipped_steps']}" for e in entries if e.get("skipped_steps")]
    if skipped:
        text += "\n\nSkipped (non-finite) steps: " + ", ".join(skipped) + "."
    return text


def plot(entries: list[dict], path: str) -> None:
    fig, axes = grid.new_figure(width=6.5, height=4.5)
    ax = axes[0][0]
    for i, model in enumerate(MODELS):
        pts = sorted((e["info"]["lr"], e) for e in entries if e["info"]["model"] == model)
        xs = [lr for lr, _ in pts]
        ys = [100 * (e.get("test_accuracy") or 0.0) for _, e in pts]
        ax.plot(xs, ys, "o-", c=f"C{i}", label=model)
        bad = [
            (lr, y)
            for (lr, e), y in zip(pts, ys, strict=True)
            if grid.cell_status(e, e.get("error")) != "ok"
        ]
        if bad:
            ax.plot([x for x, _ in bad], [y for _, y in bad], "x", c="k", ms=10)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate per 256 examples (batch 1024)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Batch 1024: accuracy vs learning rate (x = diverged or at chance)")
    ax.legend(fontsize=8)
    grid.save_figure(fig, path)


EXPERIMENT = grid.Experiment(
    name="agc",
    description=grid.describe(__doc__),
    cells=cells,
    table=table,
    plot=plot,
)

if __name__ == "__main__":
    grid.main(EXPERIMENT, sys.argv[1:])
