"""Figures of a training run from its own log, ``<workdir>/metrics.jsonl`` (see
:class:`dsv3_jax.trainer.MetricsLog` for its format).

python -m dsv3_jax.plot --workdir=runs/shakespeare [--out=DIR]   (DIR defaults to <workdir>/plots)

Writes three PNGs (the two expert figures only for a run whose log holds expert loads):
  training.png       train loss (total and main CE) with the validation loss, the MTP CE, the
                     schedules (learning rate; MTP weight lambda and 1000 x bias update speed
                     gamma on a second axis; the batch size when it ramps), the gradient norm,
                     tokens/s, max/mean expert load per MoE layer
  expert_load.png    one heatmap per MoE layer (MTP layers too): experts x steps, each expert's
                     load over the mean load of its layer (1 = balanced)
  load_balance.png   max/mean expert load per MoE layer over steps, and its running mean

The figures are built by :func:`figures` from the arrays :func:`series` and :func:`expert_loads`
return, so what is drawn is what was logged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SCALARS = (
    "loss",
    "ce",
    "mtp_ce",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mtp_lambda",
    "bias_gamma",
    "batch_size",
)
FILES = ("training.png", "expert_load.png", "load_balance.png")


class NoLogError(FileNotFoundError):
    """The workdir holds no metrics.jsonl with any step."""


def read_log(workdir: str) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl``, one per step, in step order.

    A line cut short (a run killed while writing it) is skipped. If a step appears more than
    once (a log written before resumed runs dropped stale lines) the last record wins.

    Raises:
      NoLogError: no metrics.jsonl in ``workdir``, or no step in it.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.isdir(workdir) else "has no metrics.jsonl"
        raise NoLogError(
            f"--workdir {workdir} {what}: nothing to plot (train.py writes metrics.jsonl there "
            "as it trains)"
        )
    by_step = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
            except (ValueError, KeyError, TypeError):
                continue
    if not by_step:
        raise NoLogError(f"--workdir {workdir}: {path} holds no logged step yet")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (steps int [n], values float [n])} for each of :data:`SCALARS` logged at least once,
    over the steps that logged it (null, i.e. non-finite, as NaN)."""
    out = {}
    for name in SCALARS:
        rows = [(r["step"], r[name]) for r in records if name in r]
        if rows:
            steps, values = zip(*rows, strict=True)
            values = [np.nan if v is None else v for v in values]
            out[name] = (np.asarray(steps), np.asarray(values, np.float64))
    return out


def expert_loads(records: list[dict], first_moe_layer: int = 0):
    """Routed assignments per expert, per MoE layer and step.

    Args:
      records: :func:`read_log` output.
      first_moe_layer: index of the first MoE decoder layer (``first_k_dense_replace``), for
        the layer names.

    Returns:
      (steps int [n], loads float [layers, n, e], names [layers]): the steps holding loads; the
      main model's MoE layers first, then the MTP depths.
    """
    rows = [r for r in records if r.get("expert_load") or r.get("mtp_expert_load")]
    if not rows:
        return np.zeros((0,), int), np.zeros((0, 0, 0)), []
    steps = np.asarray([r["step"] for r in rows])
    stacked = [r.get("expert_load", []) + r.get("mtp_expert_load", []) for r in rows]
    loads = np.asarray(stacked, np.float64).transpose(1, 0, 2)  # [l, n, e]
    n_main = len(rows[0].get("expert_load", []))
    names = [f"layer {first_moe_layer + i}" for i in range(n_main)]
    names += [f"MTP {k + 1}" for k in range(loads.shape[0] - n_main)]
    return steps, loads, names


def max_over_mean(loads: np.ndarray) -> np.ndarray:
    """Max over the experts of load / mean load: loads [..., e] -> [...] (1 = balanced)."""
    if not loads.size:  # no MoE layer logged
        return np.zeros(loads.shape[:-1])
    return loads.max(-1) / loads.mean(-1)


def _first_moe_layer(workdir: str) -> int:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return int(json.load(f)["model_config"]["first_k_dense_replace"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def figures(workdir: str) -> dict:
    """{file name: matplotlib Figure} of the run in ``workdir`` (see the module docstring).

    Raises:
      NoLogError: nothing logged in ``workdir``.
    """
    import matplotlib  # noqa: PLC0415 (a plotting dependency only here)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = read_log(workdir)
    s = series(records)
    steps, loads, names = expert_loads(records, _first_moe_layer(workdir))
    title = os.path.basename(os.path.normpath(workdir))

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    fig.suptitle(f"{title}: training")
    panels = [
        ("loss (nats/token)", [("loss", "train loss"), ("ce", "train CE"), ("val_loss", "val")]),
        ("MTP CE (nats/token)", [("mtp_ce", "MTP CE")]),
        ("schedules", [("lr", "lr")]),
        ("gradient norm (before clipping)", [("grad_norm", "grad norm")]),
        ("tokens/s", [("tokens_per_s", "tokens/s")]),
    ]
    for ax, (label, lines) in zip(axes.flat, panels, strict=False):
        for key, name in lines:
            if key in s:
                marker = "o" if key in ("val_loss", "tokens_per_s") else None
                ax.plot(*s[key], marker=marker, label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        if len(lines) > 1:
            ax.legend()
    _schedules(axes.flat[2], s)
    ax = axes.flat[5]
    for name, ratio in zip(names, max_over_mean(loads), strict=True):
        ax.plot(steps, ratio, label=name, linewidth=0.8)
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_title("expert load max/mean per MoE layer")
    ax.set_xlabel("step")
    if names:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no routed experts logged", ha="center", transform=ax.transAxes)
    out = {"training.png": fig}
    if not names:  # a dense model (or a log without loads): no expert figures
        return out

    n = max(len(names), 1)
    fig, axes = plt.subplots(
        n, 1, figsize=(12, 1.2 + 1.6 * n), squeeze=False, constrained_layout=True
    )
    fig.suptitle(f"{title}: expert load / mean load of its layer, per step")
    relative = loads / loads.mean(-1, keepdims=True)  # [l, n, e]
    top = float(np.nanmax(relative)) if relative.size else 1.0  # one colour scale for all
    for ax, name, layer in zip(axes[:, 0], names, relative, strict=False):
        extent = (steps[0] - 0.5, steps[-1] + 0.5, layer.shape[1] - 0.5, -0.5)
        img = ax.imshow(
            layer.T,
            aspect="auto",
            interpolation="nearest",
            cmap="magma",
            extent=extent,
            vmin=0.0,
            vmax=top,
        )  # [e, n]
        ax.set_ylabel(f"{name}\nexpert")
        fig.colorbar(img, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    out["expert_load.png"] = fig

    fig, ax = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
    for name, ratio in zip(names, max_over_mean(loads), strict=True):
        (line,) = ax.plot(steps, ratio, alpha=0.35, linewidth=0.8)
        window = min(20, len(ratio))
        smooth = np.convolve(ratio, np.ones(window) / window, mode="valid")
        ax.plot(
            steps[window - 1 :], smooth, color=line.get_color(), label=f"{name} (mean of {window})"
        )
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_title(f"{title}: expert load max/mean per MoE layer (1 = balanced)")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean load")
    if names:
        ax.legend()
    out["load_balance.png"] = fig
    return out


def _schedules(ax, s: dict) -> None:
    """The report's step schedules beside the learning rate (V3 section 4.2) on a second axis:
    lambda as logged, gamma x 1000 (so the report's 0.001 reads 1), the batch size over its
    final value if it changes."""
    twin, drawn = ax.twinx(), []
    if "mtp_lambda" in s:
        drawn += twin.plot(*s["mtp_lambda"], color="C1", linestyle="--", label="MTP lambda")
    if "bias_gamma" in s:
        steps, gamma = s["bias_gamma"]
        drawn += twin.plot(steps, gamma * 1000, color="C2", linestyle=":", label="gamma x 1000")
    if "batch_size" in s and len(np.unique(s["batch_size"][1])) > 1:
        steps, rows = s["batch_size"]
        drawn += twin.plot(steps, rows / rows[-1], color="C3", label="batch / final batch")
    twin.set_ylim(bottom=0)
    lines = ax.get_lines() + drawn
    ax.legend(lines, [x.get_label() for x in lines], loc="center right")


class OutputError(OSError):
    """The plots cannot be written to the output folder."""


def plot_run(workdir: str, out: str | None = None) -> list[str]:
    """Writes :data:`FILES` into ``out`` (default ``<workdir>/plots``; the two expert figures
    only when the log holds expert loads); returns their paths.

    Raises:
      NoLogError: nothing logged in ``workdir``.
      OutputError: ``out`` cannot be created or written.
    """
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out = out or os.path.join(workdir, "plots")
    figs = figures(workdir)
    paths = []
    try:
        os.makedirs(out, exist_ok=True)
        for name, fig in figs.items():
            paths.append(os.path.join(out, name))
            fig.savefig(paths[-1], dpi=110)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write the plots there ({err})") from err
    finally:
        for fig in figs.values():
            plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsv3_jax.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="the run's folder (train.py --workdir)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default <workdir>/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.workdir, args.out)
    except (NoLogError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
