"""Reliability table: bad inputs to train.py, sample.py, convert.py and the Python API.

Every case runs in its own subprocess and is classified by what a user sees:
  clear      non-zero exit, no traceback, and the fault (a field, flag, file or argument name)
             named in the last lines of stderr;
  unclear    non-zero exit and no traceback, but the fault is not named;
  traceback  a Python traceback (the user is shown our internals instead of a sentence);
  exit 0     the bad input was accepted silently.
Python API cases run a snippet that prints ``error: <Type>: <message>`` for the documented error
types (ValueError and its subclasses such as CheckpointError, TypeError, FileNotFoundError,
FileExistsError) and lets anything else escape as a traceback.

    python bench/bad_inputs.py [--workdir=<a finished training run>] [--jobs=2] [--json=out.json]

Without ``--workdir`` it first trains a tiny run (configs/tiny.py, 4 steps, about a minute on a
2-core CPU); the token cache comes from ``--cache_dir`` (default: .cache/tokens, built if absent).
Exit status 1 unless every case is clear. tests/test_bad_inputs.py runs it on the test session's
tiny run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "goldens" / "a_qlora_yarn_sharded_mtp"  # sharded, MTP, YaRN
TIMEOUT = 300


@dataclasses.dataclass
class Case:
    name: str
    argv: list[str]  # a script and its arguments, or ["-c", code] for API cases
    fault: str  # text the error must contain (the thing at fault)
    setup: object = None  # optional callable(tmp: Path) run before the case


@dataclasses.dataclass
class Result:
    case: str
    verdict: str
    returncode: int
    last: str
    seconds: float


_API_PRELUDE = """
import sys
import numpy as np
import jax.numpy as jnp
import dsv3_jax
from dsv3_jax import ModelConfig

def _main():
{body}

try:
    _main()
except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
    sys.exit(f"error: {{type(err).__name__}}: {{err}}")
"""


def api(body: str) -> list[str]:
    return ["-c", _API_PRELUDE.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    "))]


def cases(f: dict) -> list[Case]:
    """The table. ``f`` holds fixture paths: run (a training workdir), cache, hf, tmp."""
    run, cache, hf, tmp = f["run"], f["cache"], f["hf"], f["tmp"]
    a_file = tmp / "a_file"

    def train(*args, workdir=None):
        if workdir is None:
            workdir = str(tmp / f"w{len(args)}_{abs(hash(args)) % 10**8}")
        return [
            "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.cache_dir={cache}", *args,
        ]  # fmt: skip

    def sample(*args, workdir=run):
        return ["sample.py", f"--workdir={workdir}", "--prompt=ROMEO:", "--max_new_tokens=4", *args]

    def hf_copy(name):
        def make(_tmp):
            dst = tmp / name
            if not dst.exists():
                shutil.copytree(hf, dst)
            return dst

        return make

    out = []
    T = out.append  # noqa: N806
    # ------------------------------------------------------------------ train.py: run settings
    for field, value in [
        ("train.steps", 0), ("train.steps", -5), ("train.batch_size", 0), ("train.clip", -1.0),
        ("train.mtp_lambda", -0.1), ("train.b1", 1.0), ("train.b2", -0.5),
        ("train.weight_decay", -0.1), ("train.seed", -1), ("train.lr", -1e-3),
        ("train.warmup_steps", -1), ("train.keep", 0), ("data.seq_len", 100000),
        ("data.seq_len", 0), ("model.n_group", 3), ("model.hidden_size", 0),
        ("model.topk_group", 9), ("model.dtype", "float8"), ("model.moe_impl", "fast"),
        ("model.num_experts_per_tok", 0), ("train.lr", "inf"), ("model.initializer_range", -1.0),
        ("model.routed_scaling_factor", "nan"),
    ]:  # fmt: skip
        T(Case(f"train {field}={value}", train(f"--config.{field}={value}"), field.split(".")[1]))
    T(Case("train unknown field", train("--config.train.foo=1"), "foo"))
    T(Case("train unknown config file", [
        "train.py", "--config=configs/nope.py", f"--workdir={tmp / 'nope'}"], "nope.py"))  # fmt: skip
    T(Case("train no --workdir", ["train.py", "--config=configs/tiny.py"], "workdir"))
    T(Case("train empty --workdir", train(workdir=""), "--workdir is empty"))
    T(Case("train workdir under a file", train(workdir=str(a_file / "run")), "workdir"))
    T(Case("train cache_dir is a file", [
        *train()[:3], f"--config.data.cache_dir={a_file}"], "cache_dir"))  # fmt: skip
    T(
        Case(
            "train vocab_size below data ids",
            train("--config.data.compact_vocab=False", "--config.model.vocab_size=1000"),
            "vocab_size",
        )
    )
    T(Case("train init_from missing", train("--config.init_from=/nonexistent/ckpt"), "init_from"))
    T(Case("train init_from empty dir", train(f"--config.init_from={tmp / 'empty'}"), "init_from"))
    T(
        Case(
            "train workdir of another model",
            train("--config.model.hidden_size=64", workdir=str(run)),
            "hidden_size",
        )
    )
    T(Case("train stray argument", [*train(), "extra"], "extra"))
    T(Case("train resume damaged checkpoint", train(workdir=str(tmp / "damaged")), "delete",
           setup=lambda t: _damaged_copy(run, t / "damaged")))  # fmt: skip
    T(Case("train diverging lr", train("--config.train.lr=1e6", "--config.train.steps=3",
           "--config.train.log_every=1"), "not finite"))  # fmt: skip
    # ------------------------------------------------------------------ mesh and processes
    T(Case("train mesh not the device count", train("--config.mesh.expert=3"), "config.mesh"))
    T(Case("train mesh axis of 0", train("--config.mesh.data=0"), "'data'"))
    T(Case("train processes without coordinator", train("--num_processes=2",
           "--process_id=0"), "--coordinator_address"))  # fmt: skip
    T(Case("train process_id out of range", train("--coordinator_address=127.0.0.1:1",
           "--num_processes=2", "--process_id=2"), "--process_id"))  # fmt: skip
    # ------------------------------------------------------------------ sample.py
    for flag, fault in [
        ("--temperature=-1", "temperature"), ("--temperature=nan", "temperature"),
        ("--top_k=-3", "top_k"), ("--top_p=1.5", "top_p"), ("--top_p=0", "top_p"),
        ("--max_new_tokens=-1", "max_new_tokens"), ("--max_new_tokens=100000", "max_position"),
        ("--step=999", "999"), ("--mla_decode=fast", "mla_decode"),
        ("--attention_kernel=cuda", "attention_kernel"), ("--prompt=\U0001f99c", "never saw"),
        ("--step=-1", "step"), ("--seed=99999999999999999999", "seed"),
    ]:  # fmt: skip
        T(Case(f"sample {flag}", sample(flag), fault))
    T(Case("sample missing workdir", sample(workdir="/nonexistent/run"), "/nonexistent/run"))
    T(Case("sample workdir without checkpoints", sample(workdir=str(tmp / "empty")), "empty"))
    T(Case("sample workdir and checkpoint", [*sample(), f"--checkpoint={run}"], "--checkpoint"))
    T(Case("sample neither workdir nor checkpoint", ["sample.py", "--prompt=x"], "--workdir"))
    T(Case("sample damaged latest checkpoint", sample(workdir=str(tmp / "damaged")), "--step",
           setup=lambda t: _damaged_copy(run, t / "damaged")))  # fmt: skip
    T(Case("sample chat on compact vocabulary", sample("--chat"), "--chat"))
    T(Case("sample mesh not the device count", sample("--mesh=expert:2"), "--mesh"))
    T(Case("sample mesh syntax", sample("--mesh=expert=2"), "--mesh"))
    T(Case("sample mesh unknown axis", sample("--mesh=gpu:2"), "gpu"))
    T(Case("sample processes without coordinator", sample("--num_processes=2"),
           "--coordinator_address"))  # fmt: skip
    # ------------------------------------------------------------------ convert.py
    h2o = ["convert.py", "hf_to_orbax"]
    T(Case("convert missing hf_dir", [*h2o, "--hf_dir=/nonexistent/hf",
           f"--output_dir={tmp / 'c0'}"], "/nonexistent/hf"))  # fmt: skip
    T(Case("convert onto itself", [*h2o, f"--hf_dir={tmp / 'self'}", f"--output_dir={tmp / 'self'}",
           "--overwrite"], "self", setup=hf_copy("self")))  # fmt: skip
    T(Case("convert into its input", [*h2o, f"--hf_dir={tmp / 'inner'}",
           f"--output_dir={tmp / 'inner' / 'out'}", "--overwrite"], "inner",
           setup=hf_copy("inner")))  # fmt: skip
    T(Case("convert onto its parent", [*h2o, f"--hf_dir={tmp / 'par' / 'hf'}",
           f"--output_dir={tmp / 'par'}", "--overwrite"], "par",
           setup=lambda t: shutil.copytree(hf, t / "par" / "hf")))  # fmt: skip
    T(Case("convert two copies of a shard", [*h2o, f"--hf_dir={tmp / 'twice'}",
           f"--output_dir={tmp / 'c1'}"], "mtp-copy.safetensors",
           setup=lambda t: _second_copy(hf_copy("twice")(t))))  # fmt: skip
    T(Case("convert broken index", [*h2o, f"--hf_dir={tmp / 'badidx'}",
           f"--output_dir={tmp / 'c2'}"], "model.safetensors.index.json",
           setup=lambda t: _write(hf_copy("badidx")(t) / "model.safetensors.index.json",
                                  '{"weight_map": ')))  # fmt: skip
    T(Case("convert index without weight_map", [*h2o, f"--hf_dir={tmp / 'nowm'}",
           f"--output_dir={tmp / 'c3'}"], "weight_map",
           setup=lambda t: _write(hf_copy("nowm")(t) / "model.safetensors.index.json",
                                  '{"metadata": {}}')))  # fmt: skip
    T(
        Case(
            "convert broken config.json",
            [*h2o, f"--hf_dir={tmp / 'badcfg'}", f"--output_dir={tmp / 'c4'}"],
            "config.json",
            setup=lambda t: _write(hf_copy("badcfg")(t) / "config.json", '{"hidden_size": '),
        )
    )
    T(Case("convert int32 weight", [*h2o, f"--hf_dir={tmp / 'int'}",
           f"--output_dir={tmp / 'c5'}"], "model.norm.weight",
           setup=lambda t: _retype(hf_copy("int")(t), "model.norm.weight")))  # fmt: skip
    T(
        Case(
            "convert missing shard",
            [*h2o, f"--hf_dir={tmp / 'noshard'}", f"--output_dir={tmp / 'c6'}"],
            "model-00002-of-00005.safetensors",
            setup=lambda t: os.remove(hf_copy("noshard")(t) / "model-00002-of-00005.safetensors"),
        )
    )
    T(
        Case(
            "convert truncated shard",
            [*h2o, f"--hf_dir={tmp / 'trunc'}", f"--output_dir={tmp / 'c7'}"],
            "model-00003-of-00005.safetensors",
            setup=lambda t: _truncate(hf_copy("trunc")(t) / "model-00003-of-00005.safetensors"),
        )
    )
    T(Case("convert existing output", [*h2o, f"--hf_dir={hf}", f"--output_dir={tmp / 'empty'}"],
           "--overwrite"))  # fmt: skip
    T(Case("convert bad dtype", [*h2o, f"--hf_dir={hf}", f"--output_dir={tmp / 'c8'}",
           "--dtype=float8"], "dtype"))  # fmt: skip
    T(Case("convert no output_dir", [*h2o, f"--hf_dir={hf}"], "output_dir"))
    T(Case("convert empty output_dir", [*h2o, f"--hf_dir={hf}", "--output_dir="], "output_dir"))
    T(Case("convert overwrite a user folder", [*h2o, f"--hf_dir={hf}",
           f"--output_dir={tmp / 'mine'}", "--overwrite"], "not a hf_to_orbax output",
           setup=lambda t: _write(_mkdir(t / "mine") / "keep.txt", "precious")))  # fmt: skip
    T(Case("convert unknown command", ["convert.py", "hf2orbax", f"--hf_dir={hf}"], "hf2orbax"))
    o2h = ["convert.py", "orbax_to_hf"]
    T(Case("convert back missing checkpoint", [*o2h, "--checkpoint_dir=/nonexistent/ck",
           f"--output_dir={tmp / 'c9'}"], "/nonexistent/ck"))  # fmt: skip
    T(Case("convert back onto itself", [*o2h, f"--checkpoint_dir={tmp / 'selfrun'}",
           f"--output_dir={tmp / 'selfrun'}", "--overwrite"], "selfrun",
           setup=lambda t: shutil.copytree(run, t / "selfrun")))  # fmt: skip
    T(
        Case(
            "convert back bad shard size",
            [
                *o2h,
                f"--checkpoint_dir={run}",
                f"--output_dir={tmp / 'c10'}",
                "--max_shard_size=lots",
            ],
            "max_shard_size",
        )
    )
    T(
        Case(
            "convert back zero shard size",
            [*o2h, f"--checkpoint_dir={run}", f"--output_dir={tmp / 'c11'}", "--max_shard_size=0"],
            "max_shard_size",
        )
    )
    # ------------------------------------------------------------------ Python API
    load = f"model = dsv3_jax.load_hf_checkpoint({str(hf)!r})"
    for arg, fault in [
        ('temperature="0.8"', "temperature"), ('top_k="5"', "top_k"), ("top_p=2.0", "top_p"),
        ("seed=1.5", "seed"), ("eos_id=10**9", "eos_id"),
    ]:  # fmt: skip
        T(Case(f"api generate {arg}", api(f"""
            {load}
            dsv3_jax.generate(model, np.zeros((1, 3), np.int32), 4, {arg})
        """), fault))  # fmt: skip
    T(Case("api generate max_new_tokens=-1", api(f"""
        {load}
        dsv3_jax.generate(model, np.zeros((1, 3), np.int32), -1)
    """), "max_new_tokens"))  # fmt: skip
    T(Case("api ids beyond vocab", api(f"""
        {load}
        model(np.full((1, 3), 10**6, np.int32))
    """), "vocab_size"))  # fmt: skip
    T(Case("api float ids", api(f"""
        {load}
        model(np.zeros((1, 3), np.float32))
    """), "input_ids"))  # fmt: skip
    T(Case("api generate batch of 0", api(f"""
        {load}
        dsv3_jax.generate(model, np.zeros((0, 3), np.int32), 4)
    """), "batch of 0"))  # fmt: skip
    T(
        Case(
            "api load_checkpoint step '6'",
            api(f"dsv3_jax.load_checkpoint({str(run)!r}, '6')"),
            "step must be an int",
        )
    )
    T(
        Case(
            "api load_hf_checkpoint dtype fp32",
            api(f"dsv3_jax.load_hf_checkpoint({str(hf)!r}, dtype='fp32')"),
            "dtype",
        )
    )
    T(Case("api with_implementation not a model", api("""
        from dsv3_jax.model import with_implementation
        with_implementation("model", dtype="bfloat16")
    """), "DeepseekV3"))  # fmt: skip
    T(Case("api StreamDecoder negative id", api("""
        from dsv3_jax import data
        data.StreamDecoder(data.load_tokenizer()).push([-1])
    """), "vocabulary"))  # fmt: skip
    T(Case("api ModelConfig rms_norm_eps str", api("ModelConfig(rms_norm_eps='1e-6')"),
           "rms_norm_eps"))  # fmt: skip
    T(Case("api count_params(int)", api("dsv3_jax.count_params(3)"), "ModelConfig"))
    T(Case("api count_params(unknown field)",
           api("dsv3_jax.count_params({'hiden_size': 8})"), "hiden_size"))  # fmt: skip
    T(Case("api ModelConfig n_group", api("ModelConfig(n_group=3)"), "n_group"))
    T(
        Case(
            "api rope_scaling typo",
            api("ModelConfig(rope_scaling={'type': 'yarn', 'factr': 4.0})"),
            "factr",
        )
    )
    T(
        Case(
            "api load_hf_checkpoint missing",
            api("dsv3_jax.load_hf_checkpoint('/nonexistent/hf')"),
            "/nonexistent/hf",
        )
    )
    T(
        Case(
            "api load_checkpoint missing",
            api("dsv3_jax.load_checkpoint('/nonexistent/run')"),
            "/nonexistent/run",
        )
    )
    T(Case("api with_implementation architecture", api(f"""
        from dsv3_jax.model import with_implementation
        {load}
        with_implementation(model, hidden_size=8)
    """), "hidden_size"))  # fmt: skip
    T(Case("api with_implementation bad kernel", api(f"""
        from dsv3_jax.model import with_implementation
        {load}
        with_implementation(model, attention_kernel="cuda")
    """), "attention_kernel"))  # fmt: skip
    T(
        Case(
            "api load_hf_checkpoint two copies",
            api(f"dsv3_jax.load_hf_checkpoint({str(tmp / 'twice')!r})"),
            "mtp-copy.safetensors",
        )
    )
    T(Case("api load_hf_checkpoint bool weight", api(
        f"dsv3_jax.load_hf_checkpoint({str(tmp / 'bool')!r})"), "lm_head.weight",
        setup=lambda t: _retype(hf_copy("bool")(t), "lm_head.weight", "bool")))  # fmt: skip
    return out


# ---------------------------------------------------------------------- fixture helpers
def _write(path: pathlib.Path, text: str) -> None:
    path.write_text(text)


def _mkdir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(exist_ok=True)
    return path


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _second_copy(folder: pathlib.Path) -> None:
    """The MTP shard un-indexed (as transformers saves) and twice: two files claim its tensors."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "mtp.safetensors"}
    index_path.write_text(json.dumps(index))
    shutil.copy(folder / "mtp.safetensors", folder / "mtp-copy.safetensors")


def _retype(folder: pathlib.Path, name: str, dtype: str = "int32") -> None:
    """Rewrites the shard holding ``name`` with that tensor stored as ``dtype``."""
    from safetensors.numpy import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    shard = folder / json.loads(index_path.read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].astype(dtype)
    save_file(tensors, shard)


def _damaged_copy(run: pathlib.Path, dst: pathlib.Path) -> None:
    """A copy of a training run whose latest checkpoint has its model arrays truncated."""
    if dst.exists():
        return
    shutil.copytree(run, dst)
    steps = sorted(
        (p for p in (dst / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    for path in (steps[-1]).rglob("*"):
        if path.is_file() and "ocdbt" in str(path) and path.stat().st_size > 64:
            _truncate(path)


def _prepare(args, tmp: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    run = pathlib.Path(args.workdir) if args.workdir else None
    if run is None:
        run = tmp / "run"
        print("training a tiny run for the fixtures ...", file=sys.stderr)
        r = subprocess.run(
            [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={run}",
             "--config.train.steps=4", f"--config.data.cache_dir={args.cache_dir}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        if r.returncode:
            sys.exit(f"fixture training run failed:\n{r.stderr[-3000:]}")
    (tmp / "empty").mkdir()
    (tmp / "a_file").write_text("not a folder\n")
    return {"run": run, "cache": args.cache_dir, "hf": GOLDEN, "tmp": tmp, "env": env}


def classify(case: Case, proc: subprocess.CompletedProcess) -> tuple[str, str]:
    err = proc.stderr.strip().splitlines()
    tail = [line for line in err if line.strip()][-3:]
    last = " | ".join(tail)
    if "Traceback (most recent call last)" in proc.stderr:
        return "traceback", last
    if proc.returncode == 0:
        return "exit 0", last
    return ("clear" if case.fault in last else "unclear"), last


def run_case(case: Case, fixtures: dict) -> Result:
    start = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, *case.argv], cwd=ROOT, env=fixtures["env"], capture_output=True,
            text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        verdict, last = classify(case, proc)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        verdict, last, code = "timeout", f"no answer in {TIMEOUT} s", -1
    return Result(case.name, verdict, code, last[-400:], time.time() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a finished training run (default: train a tiny one)")
    parser.add_argument("--cache_dir", default=str(ROOT / ".cache" / "tokens"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp_name:
        fixtures = _prepare(args, pathlib.Path(tmp_name))
        table = cases(fixtures)
        names = [c.name for c in table]
        assert len(names) == len(set(names)), "case names must be distinct"
        if args.only:
            table = [c for c in table if args.only in c.name]
        for case in table:  # setups first, in order (some cases share a prepared folder)
            if case.setup is not None:
                case.setup(fixtures["tmp"])
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: run_case(c, fixtures), table))
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
        mark = "ok " if r.verdict == "clear" else "BAD"
        print(f"{mark} {r.verdict:9s} {r.seconds:5.1f}s  {r.case}: {r.last}")
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in (
        "clear", "unclear", "traceback", "exit 0", "timeout"))  # fmt: skip
    print(f"\n{len(results)} bad inputs: {summary}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": counts, "results": [dataclasses.asdict(r) for r in results]}, f)
    return 0 if counts.get("clear", 0) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
