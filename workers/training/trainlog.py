"""What a training run reports from Trainer's log: progress, a stop on divergence, and at the
end metrics.json with training_curve.png."""

from __future__ import annotations

import io
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable

from transformers import TrainerCallback

from orchestrator.jobspec.checks.training import trained_images
from orchestrator.store.storage import ObjectStore, join
from workers.errors import TrainingDiverged


class StopOnDivergence(TrainerCallback):
    """A NaN/inf loss stops the job before anything is saved from it."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = control.should_log or state.global_step >= state.max_steps
        return control  # the final step is logged, so it is checked before the final save

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss", "train_loss", "eval_loss") + (() if args.fp16 else ("grad_norm",))
        for key in keys:  # fp16's loss scaler skips inf gradients by design
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingDiverged(
                    f"training diverged at step {state.global_step} (epoch {state.epoch or 0:.2f}): {key} is "
                    f"{value}; lower --lr (now {args.learning_rate:g}) or train in fp32"
                )


class ReportProgress(TrainerCallback):
    """`report` gets step progress on every log, the val accuracy on every evaluation, and the
    end of training.

    done and total count trained images (orchestrator.jobspec.checks.training.trained_images): each
    training image once per epoch, so a run's total is its training images x epochs and its
    rate is the images/s the device trains at. The job's commit reports the same total, so a
    finished run shows done == total.
    """

    def __init__(self, report: Callable[[dict], None], n_train: int, epochs: float) -> None:
        self.report, self.n_train, self.total = report, n_train, trained_images(n_train, epochs)
        self.t0, self.step0 = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.perf_counter(), state.global_step

    def images_per_s(self, args, state) -> float:
        images = (state.global_step - self.step0) * args.per_device_train_batch_size
        return round(images / max(time.perf_counter() - self.t0, 1e-9), 2)

    def position(self, state) -> dict:
        done = min(round((state.epoch or 0) * self.n_train), self.total)
        return {"step": state.global_step, "epoch": round(state.epoch or 0, 3), "done": done, "total": self.total}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.report({**self.position(state), "loss": logs["loss"], "images_per_s": self.images_per_s(args, state)})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.report({**self.position(state), "val_accuracy": (metrics or {}).get("eval_accuracy")})

    def on_train_end(self, args, state, control, **kwargs):
        # Trainer rounds fractional epochs up to whole steps; a resume may have had no step left to log.
        self.report({**self.position(state), "done": self.total})


def epoch_metrics(log_history: list[dict]) -> list[dict]:
    """Mean logged train loss and the val accuracy of each epoch, from Trainer's log (which survives resume)."""
    losses, accuracy = defaultdict(list), {}
    for entry in log_history:
        epoch = max(1, math.ceil(entry.get("epoch", 0) - 1e-6))  # a step logged at epoch 1.4 is in epoch 2
        if "loss" in entry:
            losses[epoch].append(entry["loss"])
        if "eval_accuracy" in entry:
            accuracy[epoch] = entry["eval_accuracy"]
    return [{"epoch": e, "train_loss": sum(losses[e]) / len(losses[e]) if losses[e] else None,
             "val_accuracy": accuracy.get(e)} for e in sorted(set(losses) | set(accuracy))]


def write_metrics(store: ObjectStore, output: str, log_history: list[dict], extra: dict) -> dict:
    """metrics.json (per-epoch loss and accuracy, the final val accuracy, `extra`) and training_curve.png."""
    epochs = epoch_metrics(log_history)
    final = next((e["val_accuracy"] for e in reversed(epochs) if e["val_accuracy"] is not None), None)
    metrics = {"val_accuracy": final, "epochs": epochs, **extra}
    store.write(join(output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    store.write(join(output, "training_curve.png"), curve_png(log_history))
    return metrics


def curve_png(log_history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    loss_ax = fig.subplots()
    steps = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["epoch"], e["eval_accuracy"]) for e in log_history if "eval_accuracy" in e]
    loss_ax.plot(*zip(*steps) if steps else ([], []), color="tab:blue", label="train loss")
    loss_ax.set(xlabel="epoch", ylabel="train loss")
    acc_ax = loss_ax.twinx()
    acc_ax.plot(*zip(*evals) if evals else ([], []), "o-", color="tab:orange", label="val accuracy")
    acc_ax.set(ylabel="val accuracy", ylim=(0, 1))
    fig.legend(loc="upper center", ncols=2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
