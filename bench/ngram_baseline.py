"""Held-out cross-entropy of unigram and interpolated-bigram baselines on the Shakespeare split.

Scores exactly the targets of `data.val_batches(val, seq_len=256, ...)` (every val token but the
first), in nats/token, so the numbers compare directly with the model's validation loss.

  unigram  P(w) = (1 - eps) * c(w) / N + eps / V: the MLE over the N training tokens, with a floor
           mass eps spread uniformly over the V-id compact vocab (every id in train + val, plus
           BOS/EOS), so ids never seen in training get eps / V instead of zero.
  bigram   lambda * c(u, w) / c(u) + (1 - lambda) * P(w), counts of adjacent pairs in the training
           stream (document boundaries included: last token -> next BOS). Where the context u never
           occurs in training, the bigram term is dropped (P(w) alone). lambda is picked on a
           0.00..1.00 grid on the val set itself (fine for a baseline; it flatters it slightly).

The floor matters: 1.8% of val targets are ids absent from train (19 nats each at eps=1e-4), so
eps=1e-6..1e-2 moves the unigram from 7.33 to 7.16 and the bigram from 6.06 to 5.89 nats/token.

Usage: python bench/ngram_baseline.py [--cache_dir .cache/tokens] [--eps 1e-4]
"""

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dsv3_jax import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default=".cache/tokens")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--eps", type=float, default=1e-4, help="unigram floor mass")
    args = parser.parse_args()

    data.build_token_cache(args.cache_dir)
    train = np.asarray(data.load_tokens(args.cache_dir, "train"), np.int64)
    val = np.asarray(data.load_tokens(args.cache_dir, "val"), np.int64)
    vocab = data.CompactVocab.from_tokens(train, val)
    train, val = vocab.to_compact(train).astype(np.int64), vocab.to_compact(val).astype(np.int64)
    v = vocab.size

    # The exact targets (and their contexts) the model is scored on.
    batches = data.val_batches(val, args.seq_len, batch_size=64)
    inputs = np.concatenate([x for x, _ in batches])
    mask = np.concatenate([m for _, m in batches]).astype(bool)
    ctx, tgt = inputs[:, :-1][mask], inputs[:, 1:][mask]
    assert len(tgt) == len(val) - 1

    counts = np.bincount(train, minlength=v).astype(np.float64)
    p_uni = (1 - args.eps) * counts / counts.sum() + args.eps / v
    unseen = counts[tgt] == 0
    nll_uni = -np.log(p_uni[tgt])

    pair_codes, pair_counts = np.unique(train[:-1] * v + train[1:], return_counts=True)
    ctx_counts = np.bincount(train[:-1], minlength=v).astype(np.float64)
    pos = np.searchsorted(pair_codes, ctx * v + tgt)
    pos = np.minimum(pos, len(pair_codes) - 1)
    c_pair = np.where(pair_codes[pos] == ctx * v + tgt, pair_counts[pos], 0)
    has_ctx = ctx_counts[ctx] > 0
    p_bi = np.where(has_ctx, c_pair / np.maximum(ctx_counts[ctx], 1), 0.0)
    lambdas = np.linspace(0, 1, 101)
    nll_bi = [
        -np.log(np.where(has_ctx, lam * p_bi + (1 - lam) * p_uni[tgt], p_uni[tgt])).mean()
        for lam in lambdas[:-1]  # lambda = 1 gives zero probability to unseen pairs
    ]
    best = int(np.argmin(nll_bi))

    print(f"train tokens {len(train):,}  val tokens {len(val):,}  val targets {len(tgt):,}")
    print(f"compact vocab {v:,} ids (tokenizer has {data.load_tokenizer().get_vocab_size():,})")
    print(
        f"val targets unseen in train: {unseen.sum()} ({unseen.mean():.3%}), "
        f"each costs -log(eps/V) = {-np.log(args.eps / v):.2f} nats; contexts unseen: "
        f"{(~has_ctx).sum()}"
    )
    print(
        f"unigram (eps={args.eps:g}):      {nll_uni.mean():.4f} nats/token "
        f"({nll_uni[~unseen].mean():.4f} over the targets seen in train)"
    )
    print(f"interpolated bigram (lambda={lambdas[best]:.2f}): {nll_bi[best]:.4f} nats/token")
    print(f"uniform over compact vocab:  {np.log(v):.4f} nats/token")


if __name__ == "__main__":
    main()
