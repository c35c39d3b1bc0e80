"""Several processes (hosts) in one job: start-up, agreement on the config, shared failure.

Every process runs the same program (train.py, sample.py) over a global mesh; each one first calls
:func:`initialize` (``jax.distributed.initialize``), before anything touches a device. Process 0
hosts the coordinator at ``--coordinator_address``; a process that stops sending heartbeats for
``--heartbeat_timeout`` seconds is taken as dead and every other process then stops with an error
(JAX's coordination service aborts it), instead of waiting forever in a collective.

Mismatches fail at start, on every process, with a message naming them: processes started with
different configs (:func:`check_same`), and an error in one process's setup that the others did
not hit (:func:`agree`), which would otherwise leave them waiting in the first collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import jax
import numpy as np
from absl import flags


class PeerFailure(RuntimeError):
    """Another process of the job stopped with an error (its own log says which)."""


class PeerLost(RuntimeError):
    """A collective failed because another process of the job died or cannot be reached."""


def lost_peer(err: Exception) -> PeerLost | None:
    """A PeerLost for ``err`` if it is a collective that failed on a lost peer in a job of
    several processes (gloo's 'Connection reset by peer', ...), else None."""
    text = str(err)
    if jax.process_count() == 1 or not re.search(r"gloo|connection|peer|unavailable", text, re.I):
        return None
    first = (text.strip().splitlines() or [type(err).__name__])[0][:300]
    return PeerLost(
        f"lost contact with another process of the job ({first}); it died or cannot be "
        "reached, its log says why"
    )


def define_flags() -> None:
    """Defines the launch flags shared by train.py and sample.py (call once, at import time)."""
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0, for a job of several processes (default: "
        "$JAX_COORDINATOR_ADDRESS; none: one process).",
    )
    flags.DEFINE_integer(
        "num_processes", None, "Processes in the job (default: $JAX_NUM_PROCESSES, else 1)."
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index in [0, num_processes) (default: $JAX_PROCESS_ID)."
    )
    flags.DEFINE_integer(
        "initialization_timeout", 300, "Seconds to wait for every process to join the job."
    )
    flags.DEFINE_integer(
        "heartbeat_timeout",
        60,
        "Seconds of silence after which a process is taken as dead: the others then stop with an "
        "error. Also the longest a finished process waits for the others at exit.",
    )


def initialize_from_flags() -> bool:
    """:func:`initialize` with the values of :func:`define_flags`' flags."""
    f = flags.FLAGS
    return initialize(
        f.coordinator_address,
        f.num_processes,
        f.process_id,
        f.initialization_timeout,
        f.heartbeat_timeout,
    )


def _from_env(value, flag: str, env: str, kind=str):
    """(value, its name for messages): the flag's value, else the environment variable's."""
    if value is not None:
        return value, f"--{flag}"
    text = os.environ.get(env)
    if text is None or not text.strip():
        return None, f"--{flag}"
    try:
        return kind(text.strip()), f"{env}"
    except ValueError:
        raise ValueError(f"{env}={text!r} must be an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 60,
) -> bool:
    """Joins a job of several processes (``jax.distributed.initialize``); call before any device use.

    Arguments left None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    Without a coordinator and with at most one process nothing happens (a one-process run).

    Returns:
      True if this process joined a job of several processes.

    Raises:
      ValueError: a missing or inconsistent argument (named, with the flag or variable it came
        from). A job not joined within ``initialization_timeout`` seconds ends in JAX's own
        abort (DEADLINE_EXCEEDED), not an exception: a line printed first says what was awaited.
    """
    address, address_name = _from_env(
        coordinator_address, "coordinator_address", "JAX_COORDINATOR_ADDRESS"
    )
    count, count_name = _from_env(num_processes, "num_processes", "JAX_NUM_PROCESSES", int)
    index, index_name = _from_env(process_id, "process_id", "JAX_PROCESS_ID", int)
    if count is not None and count < 1:
        raise ValueError(f"{count_name} must be >= 1, got {count}")
    if address is None and (count or 1) == 1:
        if index not in (None, 0):
            raise ValueError(f"{index_name}={index} needs --num_processes > {index}")
        return False
    if address is None:
        raise ValueError(
            f"{count_name}={count} needs --coordinator_address (host:port of process 0)"
        )
    if count is None:
        raise ValueError(f"{address_name}={address} needs --num_processes")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address_name} must be host:port, got {address!r}")
    if index is None:
        raise ValueError(f"a job of {count} processes needs --process_id in [0, {count})")
    if not 0 <= index < count:
        raise ValueError(f"{index_name} must be in [0, {count}), got {index}")
    for name, seconds in (
        ("--initialization_timeout", initialization_timeout),
        ("--heartbeat_timeout", heartbeat_timeout),
    ):
        if seconds < 1:
            raise ValueError(f"{name} must be >= 1 second, got {seconds}")
    # A coordinator that never answers ends in JAX's own abort (DEADLINE_EXCEEDED, RegisterTask)
    # after the timeout, not in an exception: this line says what was being waited for.
    print(
        f"[process {index}] joining a job of {count} processes at {address} (waiting up to "
        f"{initialization_timeout} s for all of them: --initialization_timeout)",
        file=sys.stderr,
        flush=True,
    )
    try:
        jax.distributed.initialize(
            address,
            count,
            index,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=heartbeat_timeout,
        )
    except Exception as err:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"process {index} of {count} could not join the job at {address} within "
            f"{initialization_timeout} s (--initialization_timeout): {first[:300]}"
        ) from None
    return True


def log_prefix() -> str:
    """'' in a one-process run, else '[process i] ' (before the lines of a log or an error)."""
    if not jax.distributed.is_initialized():  # does not start a backend
        return ""
    return f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""


# ----------------------------------------------------------------------------- agreement
def _gather_bytes(text: bytes) -> list[bytes]:
    """Every process's ``text``, in process order (a collective: every process must call it)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    lengths = multihost_utils.process_allgather(np.int32(len(text)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(text)] = np.frombuffer(text, np.uint8)
    rows = multihost_utils.process_allgather(padded)
    return [bytes(row[:n]) for row, n in zip(np.asarray(rows), np.asarray(lengths), strict=True)]


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same(what: str, tree: dict) -> None:
    """Raises ValueError on every process unless all processes pass an equal ``tree``.

    ``tree`` is a JSON-able nested dict (a config); the message names the differing entries
    (dotted keys) of each process that differs from process 0, and the hashes. A
    collective: every process must call it. Nothing happens in a one-process run.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils  # noqa: PLC0415

    text = json.dumps(tree, sort_keys=True, default=repr).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest()[:8], np.int32)  # [2]
    digests = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 2]
    if (digests == digests[0]).all():
        return
    trees = [_flat(json.loads(t)) for t in _gather_bytes(text)]
    hashes = ", ".join(
        f"process {i} {row.astype('<i4').tobytes().hex()}" for i, row in enumerate(digests)
    )
    parts = []
    for i, other in enumerate(trees[1:], start=1):
        diff = [
            f"{k} ({trees[0].get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r})"
            for k in sorted(set(trees[0]) | set(other))
            if trees[0].get(k, "<absent>") != other.get(k, "<absent>")
        ]
        if diff:
            parts.append(f"process {i} differs from process 0 in {', '.join(diff)}")
    raise ValueError(
        f"the processes were started with different {what}s ({hashes}): {'; '.join(parts)}; "
        "start every process with the same flags"
    )


def agree(failure: BaseException | None, stage: str) -> None:
    """Shares the outcome of a stage every process runs: raises ``failure`` where there is one,
    and PeerFailure naming the failed processes on the others (which would otherwise wait for
    them in the next collective). A collective; in a one-process run it only re-raises."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        failed = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None)))
        if failure is None and failed.any():
            who = ", ".join(str(i) for i in np.flatnonzero(failed))
            raise PeerFailure(f"process {who} stopped with an error while {stage}; see its log")
    if failure is not None:
        raise failure
