"""Scores: VQA accuracy (VQAv2 rule), exact match, token F1, IoU / grounding accuracy, CIDEr-D.

Accuracies are fractions in [0, 1] (published tables print them x100). CIDEr-D is on its
usual 0..10 scale (tables print x100).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# ---------------------------------------------------------------- answer normalisation

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = frozenset({"a", "an", "the"})
# Canonical contractions; the same words written without the apostrophe map onto them.
# Apostrophe-less forms that are ordinary words ("its", "lets", "well", "ill", ...) are left out.
_CONTRACTED = (
    "aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't "
    "mustn't needn't shouldn't wasn't weren't won't wouldn't could've should've would've "
    "might've must've i'm i've i'd you're you've you'll you'd he's she's we're we've "
    "they're they've they'll they'd that's there's what's where's who's how's y'all o'clock"
).split()
_CONTRACTIONS = {w.replace("'", ""): w for w in _CONTRACTED}
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT = re.compile(r"[^\w\s'.]|_")  # apostrophes kept for contractions, periods handled above


def normalize_answer(text: str) -> str:
    """VQA-style answer normalisation: lowercase; "1,000" -> "1000"; periods dropped unless
    decimal; other punctuation -> space; number words -> digits; articles dropped;
    contractions written without an apostrophe get it back ("dont" -> "don't")."""
    s = _THOUSANDS_COMMA.sub("", text.lower().strip())
    s = _PUNCT.sub(" ", _NON_DECIMAL_PERIOD.sub("", s))
    words = []
    for w in s.split():
        w = w.strip("'") or w  # quotes around a word, not contractions
        w = _CONTRACTIONS.get(w, _NUMBER_WORDS.get(w, w))
        if w not in _ARTICLES:
            words.append(w)
    return " ".join(words)


def vqa_score(pred: str, answers: Sequence[str], leave_one_out: bool = False) -> float:
    """VQAv2 accuracy of one prediction: min(#annotators who gave it / 3, 1).

    With fewer than 3 reference answers (our shards usually store one), the divisor is the
    number of references, so a single reference scores as normalised exact match.
    `leave_one_out` averages the rule over the subsets that drop one annotator (what the
    official VQAv2 tool reports for its 10 answers)."""
    if not answers:
        return 0.0
    p = normalize_answer(pred)
    hits = [normalize_answer(a) == p for a in answers]
    k = min(3, len(answers))
    if not leave_one_out or len(answers) <= k:
        return min(sum(hits) / k, 1.0)
    total = sum(hits)
    return sum(min((total - h) / 3, 1.0) for h in hits) / len(hits)


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """Harmonic mean of word precision and recall after `normalize_answer` (words counted
    with multiplicity, as SQuAD's F1); 1.0 when both are empty, 0.0 when only one is."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- boxes

def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in continuous pixel coordinates (no +1)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def grounding_hit(pred: Sequence[float] | None, targets: Sequence[Sequence[float]],
                  threshold: float = 0.5) -> tuple[bool, float]:
    """(IoU >= threshold against the best-matching target, that IoU); no prediction -> miss."""
    if pred is None or not targets:
        return False, 0.0
    best = max(iou(pred, t) for t in targets)
    return best >= threshold, best


# ---------------------------------------------------------------- CIDEr-D

def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _tokens(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def cider_d(preds: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (x10 scale): tf-idf n-gram cosine (n = 1..4) with the candidate's
    counts clipped to the reference's and a Gaussian penalty on the length difference;
    document frequencies come from the references of this corpus. Tokens: lowercase words,
    punctuation removed (no PTB tokenizer, so scores differ slightly from coco-caption)."""
    if not preds:
        return 0.0
    cand = [_tokens(p) for p in preds]
    ref_toks = [[_tokens(r) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in ref_toks:
        df.update({g for r in rs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(preds)))

    def vec(words: list[str]) -> list[tuple[dict, float]]:
        out = []
        for n in range(1, max_n + 1):
            v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()}
            out.append((v, math.sqrt(sum(x * x for x in v.values()))))
        return out

    total = 0.0
    for c, rs in zip(cand, ref_toks, strict=True):
        vc = vec(c)
        score = 0.0
        for r in rs:
            vr = vec(r)
            penalty = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma**2))
            for (a, na), (b, nb) in zip(vc, vr, strict=True):
                if na and nb:
                    dot = sum(min(x, b.get(g, 0.0)) * b.get(g, 0.0) for g, x in a.items())
                    score += penalty * dot / (na * nb)
        total += 10.0 * score / max_n / max(1, len(rs))
    return total / len(preds)
