"""The run's own log (<workdir>/metrics.jsonl) and the figures ``python -m dsv3_jax.plot`` draws.

The log is checked against what else the run wrote (TensorBoard events, final_metrics.json,
the learning-rate schedule of its config), the figures against the log.
"""

import json
import os
import shutil
import struct

import numpy as np
import pytest
from conftest import run_script, train_args

from dsv3_jax import plot, train_lib
from dsv3_jax.trainer import MetricsLog

STEPS, BATCH, SEQ, K = 8, 4, 32, 2  # configs/tiny.py: train.batch_size, data.seq_len, top-k


def _log(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} read from the TFRecord event files (each record: length uint64,
    its crc uint32, an Event protocol buffer, its crc uint32)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def _tiny_schedule():
    from configs import tiny

    t = tiny.get_config().train
    return train_lib.lr_schedule(
        t.lr, t.min_lr, t.warmup_steps, int(t.steps * t.decay_start_fraction), t.steps
    )


def test_metrics_log_has_every_step_once_matching_tensorboard(tiny_run):
    workdir, _ = tiny_run
    log = _log(workdir)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    tb = _tensorboard_scalars(workdir / "tb")
    by_step = {r["step"]: r for r in log}
    log_points = sorted(tb["train/loss"])
    assert log_points == [1, 2, 4, 6, 8]  # log_every=2 and the first step
    for tag, values in tb.items():
        key = "val_loss" if tag == "val/loss" else tag.removeprefix("train/")
        for step, value in values.items():  # TensorBoard stores float32
            assert by_step[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    assert [r["step"] for r in log if "tokens_per_s" in r] == [2, 4, 6, 8]  # not the compile
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert [r["step"] for r in log if "val_loss" in r] == [8]
    assert log[-1]["val_loss"] == final["val_loss"]
    schedule = _tiny_schedule()
    for r in log:
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)

    # Expert loads: 2 MoE layers and the MTP block, 8 experts; each step's batch routes every
    # token (every token but the last of each row for MTP depth 1) to K experts.
    for r in log:
        main, mtp = np.asarray(r["expert_load"]), np.asarray(r["mtp_expert_load"])
        assert main.shape == (2, 8) and mtp.shape == (1, 8)
        assert np.all(main.sum(-1) == BATCH * SEQ * K) and np.all(
            mtp.sum(-1) == BATCH * (SEQ - 1) * K
        )
        assert r["load_max_over_mean"] == pytest.approx((main.max(-1) / main.mean(-1)).max())


def test_plot_draws_the_logged_values(tiny_run, tmp_path):
    workdir, _ = tiny_run
    log = _log(workdir)
    figs = plot.figures(str(workdir))
    assert sorted(figs) == sorted(plot.FILES)

    drawn = {
        line.get_label(): (line.get_xdata(), line.get_ydata())
        for ax in figs["training.png"].axes
        for line in ax.get_lines()
    }
    for label, key in [("train loss", "loss"), ("train CE", "ce"), ("val", "val_loss"),
                       ("MTP CE", "mtp_ce"), ("lr", "lr"), ("grad norm", "grad_norm"),
                       ("tokens/s", "tokens_per_s")]:  # fmt: skip
        rows = [(r["step"], r[key]) for r in log if key in r]
        np.testing.assert_array_equal(drawn[label][0], [s for s, _ in rows])
        np.testing.assert_array_equal(drawn[label][1], [v for _, v in rows])
    for label, key, scale in [
        ("MTP lambda", "mtp_lambda", 1),
        ("gamma x 1000", "bias_gamma", 1000),
    ]:
        np.testing.assert_array_equal(drawn[label][0], [r["step"] for r in log])
        np.testing.assert_allclose(drawn[label][1], [scale * r[key] for r in log], rtol=1e-12)
    steps = [r["step"] for r in log]
    loads = np.asarray([r["expert_load"] + r["mtp_expert_load"] for r in log], float)  # [n, l, e]
    ratios = loads.max(-1) / loads.mean(-1)  # [n, l]
    for i, name in enumerate(["layer 1", "layer 2", "MTP 1"]):  # first_k_dense_replace=1
        np.testing.assert_array_equal(drawn[name][0], steps)
        np.testing.assert_allclose(drawn[name][1], ratios[:, i], rtol=1e-12)

    images = [ax.images[0] for ax in figs["expert_load.png"].axes if ax.images]
    assert len(images) == 3
    for i, img in enumerate(images):  # experts x steps, each load over its layer's mean
        relative = loads[:, i] / loads[:, i].mean(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(img.get_array()), relative.T, rtol=1e-12)

    r = run_script(["-m", "dsv3_jax.plot", f"--workdir={workdir}", f"--out={tmp_path}"], os.environ)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in plot.FILES:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(tmp_path / name) in r.stdout


def test_plot_without_a_log_names_the_workdir(tmp_path, capsys):
    for workdir in (tmp_path, tmp_path / "missing"):
        assert plot.main([f"--workdir={workdir}"]) == 1  # the CLI's exit status
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(workdir) in err and "Traceback" not in err
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(plot.NoLogError, match=str(tmp_path)):
        plot.read_log(str(tmp_path))


@pytest.mark.slow
def test_resumed_run_rewrites_the_steps_after_its_checkpoint(tiny_run, tmp_path, cli_env):
    workdir = tmp_path / "resumed"
    shutil.copytree(tiny_run[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "8")  # as if stopped after logging steps 7 and 8
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.')  # and killed while writing a line
    r = run_script(train_args(workdir, cli_env), cli_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 6" in r.stderr
    before, after = _log(tiny_run[0]), _log(workdir)
    assert [x["step"] for x in after] == list(range(1, STEPS + 1))
    # Resuming is bit-exact (test_train_faults.py): steps 7 and 8 come out the same again.
    for a, b in zip(before, after, strict=True):
        a.pop("tokens_per_s", None), b.pop("tokens_per_s", None)
        assert a == b


def test_metrics_log_keeps_the_steps_up_to_the_resumed_one(tmp_path):
    import jax.numpy as jnp

    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 7, "lo')
    schedule = _tiny_schedule()
    history = MetricsLog(str(tmp_path), 4, schedule)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:4])
    for step in (5, 6):
        history.add(step, {"loss": jnp.float32(step / 2), "main_load": jnp.ones((2, 8)) * step})
    history.flush(tokens_per_s=123.0, val_loss=float("nan"))
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[4] == {"step": 5, "loss": 2.5, "lr": pytest.approx(float(schedule(4))),
                      "expert_load": [[5] * 8] * 2}  # fmt: skip
    assert log[5]["tokens_per_s"] == 123.0 and log[5]["val_loss"] is None  # NaN as null
    MetricsLog(str(tmp_path), 0, schedule)  # a fresh run in the folder starts a new log
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_plot_of_a_dense_run_and_an_unwritable_out(tmp_path, capsys):
    """A log without expert loads (a dense model) gives the training figure alone; an --out that
    cannot be created is a one-line error naming it."""
    recs = [{"step": i, "loss": 3.0 - 0.1 * i, "ce": 2.9, "lr": 1e-3, "expert_load": []}
            for i in range(1, 6)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    figs = plot.figures(str(tmp_path))
    assert list(figs) == ["training.png"]
    drawn = {
        x.get_label(): x.get_ydata() for ax in figs["training.png"].axes for x in ax.get_lines()
    }
    np.testing.assert_allclose(drawn["train loss"], [r["loss"] for r in recs])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert plot.main([f"--workdir={tmp_path}", f"--out={blocker / 'plots'}"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: --out {blocker / 'plots'}: cannot write") and "Traceback" not in err
    )
    assert plot.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["training.png"]
