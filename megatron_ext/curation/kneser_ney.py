"""Interpolated modified Kneser-Ney n-gram language models, written as standard ARPA files.

The estimate follows Chen & Goodman (1998) as KenLM's ``lmplz`` implements it:

- Each sentence is ``<s> w1 .. wk </s>``. The highest order keeps raw counts; a lower-order n-gram
  gets its *continuation* count (how many distinct words precede it), except n-grams starting
  with ``<s>``, which nothing can precede and which keep raw counts.
- Per order, three discounts come from the counts-of-counts t1..t4 of those adjusted counts:
  Y = t1 / (t1 + 2 t2), D1 = 1 - 2Y t2/t1, D2 = 2 - 3Y t3/t2, D3+ = 3 - 4Y t4/t3. Tiny corpora
  can make them undefined or out of range; then (0.5, 1.0, 1.5) is used and recorded.
- p(w | h) = (a(hw) - D(a(hw))) / sum_v a(hv) + gamma(h) p(w | h'), with h' = h minus its first
  word, gamma(h) = (D1 N1(h) + D2 N2(h) + D3+ N3+(h)) / sum_v a(hv), and at the bottom the uniform
  distribution over the vocabulary (including ``<unk>``).

In ARPA back-off form the stored probability of a seen n-gram is the interpolated one and the
back-off weight of a context is gamma(h), so that every conditional distribution sums to one.
All counts are held in memory (dicts): meant for reference corpora of up to tens of millions of
tokens, like CCNet's per-language Wikipedia models.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
_BOS_LOG10 = -99.0


@dataclass
class NgramModel:
    """A back-off n-gram model: log10 probabilities and log10 back-off weights per order."""

    order: int
    log10_probs: list[dict[tuple[str, ...], float]]
    """Index n-1 holds the n-grams of order n."""
    log10_backoffs: list[dict[tuple[str, ...], float]]
    """Index n-1 holds back-off weights of order-n contexts (absent means 0.0)."""
    discounts: list[tuple[float, float, float]] = field(default_factory=list)
    """(D1, D2, D3+) per order."""
    discount_fallback: list[bool] = field(default_factory=list)
    """Per order: whether the counts could not define discounts and the fallback was used."""

    def word_log10_prob(self, word: str, context: Sequence[str]) -> float:
        """log10 p(word | context) by back-off, as an ARPA query library computes it."""
        unigrams = self.log10_probs[0]
        word = word if (word,) in unigrams else UNK
        ctx: tuple[str, ...] = ()
        if self.order > 1:
            ctx = tuple(w if (w,) in unigrams else UNK for w in context[-(self.order - 1) :])
        total = 0.0
        while True:
            gram = ctx + (word,)
            prob = self.log10_probs[len(gram) - 1].get(gram)
            if prob is not None:
                return total + prob
            total += self.log10_backoffs[len(ctx) - 1].get(ctx, 0.0)
            ctx = ctx[1:]

    def sentence_log10_prob(self, words: Sequence[str]) -> float:
        """log10 p(words </s> | <s>)."""
        history: list[str] = [BOS]
        total = 0.0
        for word in list(words) + [EOS]:
            total += self.word_log10_prob(word, history)
            history.append(word)
        return total


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter]:
    """Raw counts per order of all n-grams of ``<s> sentence </s>`` (none ends at ``<s>``)."""
    counts: list[Counter] = [Counter() for _ in range(order)]
    for words in sentences:
        seq = (BOS, *words, EOS)
        for end in range(1, len(seq)):
            for n in range(1, min(order, end + 1) + 1):
                counts[n - 1][seq[end - n + 1 : end + 1]] += 1
    return counts


def adjusted_counts(raw: list[Counter]) -> list[Counter]:
    """Kneser-Ney counts: raw at the top order and for n-grams starting with <s>, otherwise
    the number of distinct words seen before the n-gram."""
    order = len(raw)
    adjusted = [Counter() for _ in range(order)]
    adjusted[order - 1] = Counter(raw[order - 1])
    for n in range(order - 1, 0, -1):
        left = Counter(gram[1:] for gram in raw[n])
        for gram, count in raw[n - 1].items():
            adjusted[n - 1][gram] = count if gram[0] == BOS else left[gram]
    return adjusted


def compute_discounts(counts: Counter) -> tuple[tuple[float, float, float], bool]:
    """Modified Kneser-Ney discounts from counts-of-counts; (discounts, used_fallback)."""
    t = Counter(c for c in counts.values() if c <= 4)
    t1, t2, t3, t4 = (t.get(k, 0) for k in (1, 2, 3, 4))
    if min(t1, t2, t3, t4) == 0:
        return FALLBACK_DISCOUNTS, True
    y = t1 / (t1 + 2 * t2)
    discounts = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    if not all(0 < d < k + 1 for k, d in enumerate(discounts)):
        return FALLBACK_DISCOUNTS, True
    return discounts, False


def train_kneser_ney(sentences: Iterable[Sequence[str]], order: int) -> NgramModel:
    """Estimate an interpolated modified Kneser-Ney model of the given order."""
    if order < 2:
        raise ValueError(f"order must be >= 2 (ARPA query libraries need bigrams), got {order}")
    raw = count_ngrams(sentences, order)
    if not raw[0]:
        raise ValueError("cannot train an n-gram model on an empty corpus")
    adjusted = adjusted_counts(raw)
    probs: list[dict[tuple[str, ...], float]] = []
    backoffs: list[dict[tuple[str, ...], float]] = [{} for _ in range(order)]
    discounts, fallbacks = [], []
    lower: dict[tuple[str, ...], float] = {}
    for n in range(1, order + 1):
        d, fallback = compute_discounts(adjusted[n - 1])
        discounts.append(d)
        fallbacks.append(fallback)
        current, gammas = _interpolate_order(adjusted[n - 1], d, lower, n)
        if n > 1:
            backoffs[n - 2] = {ctx: math.log10(g) for ctx, g in gammas.items() if g > 0}
        probs.append(current)
        lower = current
    log_probs = [{gram: math.log10(p) for gram, p in level.items()} for level in probs]
    log_probs[0][(BOS,)] = _BOS_LOG10
    return NgramModel(order, log_probs, backoffs, discounts, fallbacks)


def _interpolate_order(
    counts: Counter, d: tuple[float, float, float], lower: dict, n: int
) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float]]:
    denom: dict[tuple[str, ...], int] = defaultdict(int)
    mass: dict[tuple[str, ...], float] = defaultdict(float)
    for gram, count in counts.items():
        ctx = gram[:-1]
        denom[ctx] += count
        mass[ctx] += d[min(count, 3) - 1]
    gammas = {ctx: mass[ctx] / denom[ctx] for ctx in denom}
    probs: dict[tuple[str, ...], float] = {}
    if n == 1:
        vocab = {gram for gram in counts} | {(UNK,)}
        uniform = gammas[()] / len(vocab)
        for gram in vocab:
            count = counts.get(gram, 0)
            discounted = (count - d[min(count, 3) - 1]) / denom[()] if count else 0.0
            probs[gram] = discounted + uniform
        return probs, gammas
    for gram, count in counts.items():
        ctx = gram[:-1]
        discounted = (count - d[min(count, 3) - 1]) / denom[ctx]
        probs[gram] = discounted + gammas[ctx] * lower[gram[1:]]
    return probs, gammas


def write_arpa(model: NgramModel, path: str | os.PathLike) -> None:
    """Write the model as an ARPA file (temp name, then renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as out:
        out.write("\n\\data\\\n")
        for n, level in enumerate(model.log10_probs, start=1):
            out.write(f"ngram {n}={len(level)}\n")
        for n, level in enumerate(model.log10_probs, start=1):
            out.write(f"\n\\{n}-grams:\n")
            bows = model.log10_backoffs[n - 1] if n < model.order else {}
            for gram in sorted(level):
                line = f"{level[gram]:.7g}\t{' '.join(gram)}"
                if n < model.order:
                    line += f"\t{bows.get(gram, 0.0):.7g}"
                out.write(line + "\n")
        out.write("\n\\end\\\n")
    os.replace(tmp, path)


def read_arpa(path: str | os.PathLike) -> NgramModel:
    """Read an ARPA file back (for checks and for scoring without a query library)."""
    probs: list[dict[tuple[str, ...], float]] = []
    backoffs: list[dict[tuple[str, ...], float]] = []
    current = 0
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line == "\\data\\" or line.startswith("ngram "):
                continue
            if line == "\\end\\":
                break
            if line.startswith("\\") and line.endswith("-grams:"):
                current = int(line[1 : line.index("-")])
                probs.append({})
                backoffs.append({})
                continue
            fields = line.split("\t")
            if len(fields) < 2 or current == 0:
                raise ValueError(f"{path}: not an ARPA n-gram line: {line[:80]!r}")
            gram = tuple(fields[1].split(" "))
            probs[current - 1][gram] = float(fields[0])
            if len(fields) > 2:
                backoffs[current - 1][gram] = float(fields[2])
    return NgramModel(len(probs), probs, backoffs)
