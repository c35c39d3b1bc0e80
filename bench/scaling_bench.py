"""Train-step cost per device mesh: compile time, step time, tokens/s and the collectives XLA adds.

For each mesh shape (and a single-device baseline) a child process with 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``) builds the same small DeepSeek-V3, places it
(``shard_model``), compiles ``train_lib.train_step`` (AdamW, MTP, bias update) and measures:

  compile s      wall time of ``train_step.lower(...).compile()``
  step ms        median wall time of ``--steps`` steps after ``--warmup`` steps
  tokens/s       batch * seq_len / step time
  state MB/dev   parameters + AdamW moments held by one device
  loss           the loss of the last step (the same model, data and steps on every mesh)
  collectives    per kind (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute):
                 how many run in one train step and the MB of their results, read from the
                 compiled HLO text (:func:`collectives`). Shapes in the partitioned HLO are
                 per-device, so MB is what one device receives (all-gather: the gathered array,
                 reduce-scatter: its shard). A collective inside a while loop (the layer scans)
                 counts once per iteration (``known_trip_count``).
  MoE MB         the part of those bytes whose op names lie in the routed experts' named scopes
                 (expert_parallel, or dispatch / experts / combine for the GSPMD path).

A mesh may end in ``/gspmd`` (``moe_dispatch="gspmd"``: one global sort that XLA partitions, the
reference) or ``/cf=X`` (the all-to-all path with ``moe_capacity_factor=X``); otherwise meshes with
an expert axis take the default all-to-all dispatch (``shard_map`` + ``lax.all_to_all``).

The baseline uses one device of the same 8-device process, without a mesh. Fake CPU devices
share this machine's cores, so the times show the overhead of partitioning, not a speed-up.

Model: the demo's architecture (configs/shakespeare.py: d 128, 4 layers of which 1 dense,
8 routed experts + 1 shared, top-2, MLA, 1 MTP depth), float32, with a --vocab vocabulary.

Usage: python bench/scaling_bench.py [--steps 5] [--batch 16] [--seq_len 128] [--out table.md]
       python bench/scaling_bench.py --mesh data=8 --mesh single --top 8   # some meshes, details
"""

import argparse
import contextlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import shakespeare  # noqa: E402
from dsv3_jax import sharding, train_lib  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.model import DeepseekV3  # noqa: E402

DEVICES = 8
MESHES = (
    "single", "data=8", "fsdp=2,tensor=4", "data=2,expert=4", "data=2,expert=4/gspmd",
    "data=2,expert=4/cf=1.25",
    "fsdp=2,expert=2,tensor=2", "fsdp=2,expert=2,tensor=2/gspmd", "expert=8", "expert=8/gspmd",
)  # fmt: skip
# Named scopes of the routed-expert path (dsv3_jax.moe): the MoE's share of the collectives.
_MOE_SCOPES = re.compile(r"[/(](expert_parallel|dispatch|experts|combine)[/)]")
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_ALIASES = {"ragged-all-to-all": "all-to-all", "collective-broadcast": "collective-permute"}


# ----------------------------------------------------------------------------- HLO collectives
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEES = re.compile(r"\b(branch_computations|calls)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: ``f32[8,16]{1,0}``, a tuple ``(bf16[4], s32[])``, ``pred[]``."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype == "token":
            continue
        bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d+)", dtype).group(1))
        total += math.prod(int(d) for d in dims.split(",") if d) * bits / 8
    return int(total)


def _split_shape(rest: str) -> tuple[str, str]:
    """'(f32[2], s32[]) all-reduce(...)' -> ('(f32[2], s32[])', ' all-reduce(...)')."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, " " + tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :]
    return rest, ""


def collectives(hlo: str) -> dict:
    """The collectives one run of a compiled HLO module executes.

    Counts each collective once: a synchronous op by itself, an async pair by its ``*-done``
    (whose result is the output; the ``*-start`` tuple also holds the operand), an op wrapped by
    ``async-start``/``async-done`` inside its wrapped computation. Ops in a while body count
    ``known_trip_count`` times (1 where XLA does not know it: then ``unknown_trips`` is True);
    each branch of a conditional counts as if it ran.

    Args:
      hlo: ``jax.jit(f).lower(...).compile().as_text()`` (or any HLO module text).
    Returns:
      {"kinds": {kind: {"count", "bytes", "static"}} for each of :data:`KINDS` (count and bytes per
      run, static: ops in the text), "ops": [{"kind", "shape", "bytes", "times", "op_name"}],
      "unknown_trips": bool}.
    """
    comps: dict[str, list] = {}
    edges: dict[str, list] = defaultdict(list)
    entry, current, unknown = None, None, False
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        shape, tail = _split_shape(m.group(2))
        op = _OPCODE.match(tail)
        if not op:
            continue
        opcode = op.group(1)
        attrs = re.sub(r'metadata=\{[^}]*\}|op_name="[^"]*"', "", tail)
        if opcode not in ("async-done", "async-update") and not opcode.endswith("-done"):
            times = 1
            if opcode == "while":
                trip = _TRIP.search(attrs)
                unknown |= trip is None
                times = int(trip.group(1)) if trip else 1
            for key, name in _CALLEE.findall(attrs):
                edges[current].append((name, times if key == "body" else 1))
            for _, names in _CALLEES.findall(attrs):
                for name in re.findall(r"%?([\w.\-]+)", names):
                    edges[current].append((name, 1))
        base = opcode[: -len("-done")] if opcode.endswith("-done") else opcode
        base = _ALIASES.get(base, base)
        if base in KINDS:
            op_name = _OP_NAME.search(tail)
            comps[current].append((base, shape, op_name.group(1) if op_name else ""))

    times: dict[str, int] = defaultdict(int)

    def visit(name: str, n: int) -> None:
        times[name] += n
        for callee, k in edges.get(name, ()):
            visit(callee, n * k)

    if entry is not None:
        visit(entry, 1)
    kinds = {k: {"count": 0, "bytes": 0, "static": 0} for k in KINDS}
    ops = []
    for name, found in comps.items():
        for kind, shape, op_name in found:
            n, size = times.get(name, 0), shape_bytes(shape)
            kinds[kind]["count"] += n
            kinds[kind]["bytes"] += n * size
            kinds[kind]["static"] += 1
            ops.append(dict(kind=kind, shape=shape, bytes=size, times=n, op_name=op_name))
    ops.sort(key=lambda o: -o["bytes"] * o["times"])
    return {"kinds": kinds, "ops": ops, "unknown_trips": unknown}


# ----------------------------------------------------------------------------- one mesh (child)
def parse_mesh(spec: str) -> dict[str, int] | None:
    """'fsdp=2,tensor=4' -> {'fsdp': 2, 'tensor': 4}; 'single' -> None (any /variant ignored)."""
    spec = spec.split("/")[0]
    if spec == "single":
        return None
    return {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}


def parse_variant(spec: str) -> dict:
    """The ModelConfig overrides of a mesh spec's ``/variant``: '/gspmd', '/cf=1.25' or none."""
    if "/" not in spec:
        return {}
    variant = spec.split("/", 1)[1]
    if variant == "gspmd":
        return {"moe_dispatch": "gspmd"}
    if variant.startswith("cf="):
        return {"moe_dispatch": "all_to_all", "moe_capacity_factor": float(variant[3:])}
    raise ValueError(f"unknown variant {variant!r}")


def model_fields(vocab: int) -> dict:
    fields = dict(shakespeare.get_config().model)
    fields.update(vocab_size=vocab)
    return fields


def run_mesh(spec: str, args) -> dict:
    """Builds, places, compiles and times the train step on one mesh; returns the measurements."""
    if jax.device_count() != DEVICES:
        sys.exit(
            f"error: expected {DEVICES} devices, got {jax.device_count()}; run without --child"
        )
    axes = parse_mesh(spec)
    mesh = sharding.make_mesh(axes) if axes else None
    fields = dict(model_fields(args.vocab), **parse_variant(spec))
    model = DeepseekV3(ModelConfig(**fields), rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
        if mesh:
            sharding.shard_model(model, mesh)
        rules = model.config.sharding_rules
        graphdef, params, biases = train_lib.split_model(model)
        schedule = train_lib.lr_schedule(1e-3, 1e-4, 2, 50, 100)
        tx = train_lib.make_optimizer(schedule, mask=train_lib.decay_mask(params))
        opt_state = train_lib.init_opt_state(tx, params, rules)
        weights = train_lib.LossWeights()
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len + 1), dtype=np.int32)
        if mesh:
            spec_ = sharding.logical_to_spec(("batch", None), rules, tokens.shape, mesh)
            tokens = jax.device_put(tokens, NamedSharding(mesh, spec_))
        else:
            tokens = jax.device_put(tokens, jax.devices()[0])
        state_bytes = sum(
            x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((params, opt_state))
        )
        start = time.perf_counter()
        compiled = train_lib.train_step.lower(
            graphdef, tx, weights, params, biases, opt_state, tokens
        ).compile()
        compile_s = time.perf_counter() - start
        hlo = compiled.as_text()
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            params, biases, opt_state, metrics = compiled(params, biases, opt_state, tokens)
            jax.block_until_ready((params, biases, opt_state, metrics))
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        loss = float(metrics["loss"])
        dropped = float(metrics["dropped"])
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        name = spec.replace(",", "_").replace("=", "")
        (pathlib.Path(args.hlo_dir) / f"{name}.hlo").write_text(hlo)
    step_s = float(np.median(times))
    return {
        "mesh": spec,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": args.batch * args.seq_len / step_s,
        "state_mb": state_bytes / 1e6,
        "loss": loss,
        "dropped": dropped,
        "collectives": collectives(hlo),
    }


# ----------------------------------------------------------------------------- table (parent)
def table(results: list[dict]) -> list[str]:
    """Markdown table: one row per mesh, one 'count / MB' cell per collective kind."""
    head = ["mesh", "compile s", "step ms", "tokens/s", "state MB/dev", "loss", *KINDS, "total MB",
            "MoE MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in results:
        kinds = r["collectives"]["kinds"]
        cells = [f"{kinds[k]['count']} / {kinds[k]['bytes'] / 1e6:.2f}" for k in KINDS]
        total = sum(v["bytes"] for v in kinds.values()) / 1e6
        moe = sum(
            o["bytes"] * o["times"]
            for o in r["collectives"]["ops"]
            if _MOE_SCOPES.search(o["op_name"])
        )
        lines.append(
            f"| {r['mesh']} | {r['compile_s']:.1f} | {r['step_ms']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['state_mb']:.2f} | {r['loss']:.4f} | "
            + " | ".join(cells)
            + f" | {total:.2f} | {moe / 1e6:.2f} |"
        )
    return lines


_PASSED = ("steps", "warmup", "batch", "seq_len", "vocab", "hlo_dir")  # flags the children get


def _child(spec: str, args, out: pathlib.Path) -> dict:
    """Runs one mesh in a fresh process with 8 fake CPU devices; its result plus warning count."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="1")
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    cmd = [sys.executable, __file__, f"--child={spec}", f"--json_out={out}"]
    cmd += [f"--{k}={v}" for k, v in vars(args).items() if k in _PASSED and v is not None]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: mesh {spec} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["remat_warnings"] = proc.stderr.count("Involuntary full rematerialization")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per mesh")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=16, help="global batch (divisible by 8)")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (divisible by 4)")
    p.add_argument("--mesh", action="append", help=f"mesh(es) to run; default: {MESHES}")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--top", type=int, default=0, help="list each mesh's N largest collectives")
    p.add_argument("--hlo_dir", help="save each mesh's compiled HLO text here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = run_mesh(args.child, args)
        pathlib.Path(args.json_out).write_text(json.dumps(result))
        return
    for spec in args.mesh or MESHES:
        try:
            axes = parse_mesh(spec)
            parse_variant(spec)
        except ValueError:
            p.error(f"--mesh {spec!r}: expected 'single' or axis=size pairs like 'fsdp=2,tensor=4'"
                    ", optionally followed by /gspmd or /cf=<capacity factor>")  # fmt: skip
        if axes and math.prod(axes.values()) != DEVICES:
            p.error(f"--mesh {spec!r}: the axis sizes must multiply to {DEVICES}")

    fields = model_fields(args.vocab)
    header = [
        f"jax {jax.__version__}, {DEVICES} fake CPU devices on {os.cpu_count()} cores (one "
        "process per mesh); the single-device row uses one of them without a mesh.",
        f"model: demo architecture (d {fields['hidden_size']}, {fields['num_hidden_layers']} "
        f"layers of which {fields['first_k_dense_replace']} dense, {fields['n_routed_experts']} "
        f"routed experts top-{fields['num_experts_per_tok']} + {fields['n_shared_experts']} "
        f"shared, {fields['num_nextn_predict_layers']} MTP depth, vocab {args.vocab}), float32, "
        f"AdamW; batch {args.batch} x seq {args.seq_len}; median of {args.steps} steps after "
        f"{args.warmup} warm-up.",
        "Fake devices share the CPU cores: times show partitioning overhead, not speed-up. "
        "Collectives: count / MB per train step (per-device result bytes, scan bodies counted per "
        "layer).",
        "",
    ]
    print("\n".join(header), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.mesh or MESHES):
            results.append(_child(spec, args, pathlib.Path(tmp) / f"{i}.json"))
            print(f"  {spec}: done ({results[-1]['step_ms']:.0f} ms/step)", file=sys.stderr)
    lines = table(results)
    notes = [
        f"{r['mesh']}: {r['remat_warnings']} 'involuntary full rematerialization' warnings"
        for r in results
        if r["remat_warnings"]
    ]
    notes += [f"{r['mesh']}: {r['dropped']:.0f} routed assignments dropped in the last step"
              for r in results if r["dropped"]]  # fmt: skip
    notes += [f"{r['mesh']}: a while loop without a known trip count (counted once)"
              for r in results if r["collectives"]["unknown_trips"]]  # fmt: skip
    print("\n".join(lines + [""] + notes))
    for r in results:
        if args.top and r["collectives"]["ops"]:
            print(f"\n{r['mesh']}: largest collectives (MB per step = MB x times)")
            for o in r["collectives"]["ops"][: args.top]:
                shape = o["shape"] if len(o["shape"]) <= 40 else o["shape"][:37] + "..."
                print(f"  {o['kind']:<18} {shape:<40} {o['bytes'] / 1e6:8.3f} MB x "
                      f"{o['times']}  {o['op_name'][:160]}")  # fmt: skip
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(header + lines + [""] + notes) + "\n")


if __name__ == "__main__":
    main()
