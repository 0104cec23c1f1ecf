"""Quality parity: did an optimisation change what the model learned? Pure arithmetic on held-out losses.

Start with ``compare``. Two runs (A, the reference, and B, the variant) are scored on the same held-out documents,
grouped by category. Per category and overall this gives each run's token-weighted mean loss and perplexity, and a
SuperCLUE-style head-to-head: every document is a "question" won by the run with the lower mean loss per token,
tied when the two are within ``margin``; a side's win+tie rate is (win + tie) / (win + tie + loss) x 100.

Verdict: "parity" when each side wins or ties at least ``min_rate`` percent of all documents; otherwise the side
below it is behind. The two rates always add up to 100 plus the tie percentage, so at most one side can fall
below 50, and runs of equal quality sit at about 50/50 (noise) or near 100/100 (mostly ties).

Inputs are per-document (summed loss, token count) pairs; nothing here imports training code.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

# Tie margin, in nats per token, on the difference of two documents' mean losses. A difference of mean log-losses
# is a log perplexity ratio, so an absolute margin already is a relative one: 0.01 means "perplexities within 1%"
# (exp(0.01) = 1.01) at any loss level. That is far above the drift of numerically equivalent fp32 variants
# (chunked CE, fused kernels: ~1e-4 nats after tens of steps) and well below the gap a real change in learning
# leaves (a few training steps more or less move the loss by 0.1-1 nats on the tiny model).
DEFAULT_MARGIN = 0.01
# Each side must win or tie at least this share of documents for "parity". Equal runs whose differences exceed the
# margin split the documents about 50/50; with a few hundred documents the binomial spread is ~3 points, so 40
# leaves room for noise while a run that is consistently worse (it loses most documents) falls far below it.
DEFAULT_MIN_RATE = 40.0


@dataclass(frozen=True)
class DocLoss:
    nll: float  # summed next-token loss over the document's predicted tokens, nats
    tokens: int  # predicted tokens

    @property
    def mean(self) -> float:
        return self.nll / self.tokens


@dataclass(frozen=True)
class Tally:
    documents: int  # questions compared
    tokens: int  # predicted tokens over those documents (the same for both runs)
    loss_a: float  # token-weighted mean loss of run A, nats/token
    loss_b: float
    ppl_a: float  # exp(loss_a)
    ppl_b: float
    wins_a: int  # documents where A's mean loss is lower by more than the margin
    ties: int
    wins_b: int
    rate_a: float  # A's win+tie rate, percent
    rate_b: float
    max_abs_diff: float  # largest |mean loss A - mean loss B| of one document: how close the ties are


@dataclass(frozen=True)
class Report:
    margin: float  # tie margin, nats/token
    min_rate: float  # win+tie rate each side needs for parity, percent
    categories: dict[str, Tally]
    overall: Tally
    verdict: str  # "parity", "A behind" or "B behind"


def win_tie_rate(wins: int, ties: int, losses: int) -> float:
    """(wins + ties) / (wins + ties + losses) x 100, the SuperCLUE win+tie rate."""
    total = wins + ties + losses
    if min(wins, ties, losses) < 0 or total == 0:
        raise ValueError(f"win+tie rate needs non-negative counts and at least one question, got "
                         f"{wins} wins, {ties} ties, {losses} losses")
    return 100.0 * (wins + ties) / total


def judge(loss_a: float, loss_b: float, margin: float = DEFAULT_MARGIN) -> str:
    """Who wins one question: "a" (lower loss by more than margin), "b", or "tie" (|difference| <= margin)."""
    if abs(loss_a - loss_b) <= margin:
        return "tie"
    return "a" if loss_a < loss_b else "b"


def tally(docs_a: Sequence[DocLoss], docs_b: Sequence[DocLoss], margin: float = DEFAULT_MARGIN) -> Tally:
    """Mean losses and the head-to-head over paired documents (docs_a[i] and docs_b[i] are the same text)."""
    if not docs_a:
        raise ValueError("no documents to compare")
    if len(docs_a) != len(docs_b):
        raise ValueError(f"run A has {len(docs_a)} documents and run B {len(docs_b)}; they must be paired")
    for i, (a, b) in enumerate(zip(docs_a, docs_b)):
        if a.tokens != b.tokens or a.tokens < 1:
            raise ValueError(f"document {i} has {a.tokens} tokens in run A and {b.tokens} in run B; both must "
                             "score the same (non-empty) token sequence")
    outcomes = [judge(a.mean, b.mean, margin) for a, b in zip(docs_a, docs_b)]
    wins_a, ties, wins_b = (outcomes.count(k) for k in ("a", "tie", "b"))
    tokens = sum(d.tokens for d in docs_a)
    loss_a, loss_b = sum(d.nll for d in docs_a) / tokens, sum(d.nll for d in docs_b) / tokens
    return Tally(documents=len(docs_a), tokens=tokens, loss_a=loss_a, loss_b=loss_b, ppl_a=math.exp(loss_a),
                 ppl_b=math.exp(loss_b), wins_a=wins_a, ties=ties, wins_b=wins_b,
                 rate_a=win_tie_rate(wins_a, ties, wins_b), rate_b=win_tie_rate(wins_b, ties, wins_a),
                 max_abs_diff=max(abs(a.mean - b.mean) for a, b in zip(docs_a, docs_b)))


def compare(docs_a: Mapping[str, Sequence[DocLoss]], docs_b: Mapping[str, Sequence[DocLoss]], *,
            margin: float = DEFAULT_MARGIN, min_rate: float = DEFAULT_MIN_RATE) -> Report:
    """Per-category and overall tallies of run A against run B, and the verdict."""
    if margin < 0 or not 0 <= min_rate <= 100:
        raise ValueError(f"margin ({margin}) must be >= 0 and min_rate ({min_rate}) within 0..100")
    if not docs_a:
        raise ValueError("no categories to compare")
    if docs_a.keys() != docs_b.keys():
        raise ValueError(f"runs A and B were scored on different categories: {sorted(docs_a)} vs {sorted(docs_b)}")
    categories = {}
    for name in docs_a:
        if not docs_a[name]:
            raise ValueError(f"category {name} has no documents; every category needs at least one")
        categories[name] = tally(docs_a[name], docs_b[name], margin)
    overall = tally([d for v in docs_a.values() for d in v], [d for v in docs_b.values() for d in v], margin)
    verdict = ("A behind" if overall.rate_a < min_rate else
               "B behind" if overall.rate_b < min_rate else "parity")
    return Report(margin=margin, min_rate=min_rate, categories=categories, overall=overall, verdict=verdict)


def to_json(report: Report, **context) -> str:
    """The report (plus context such as run paths) as indented JSON."""
    return json.dumps({**context, **asdict(report)}, indent=1, ensure_ascii=False)


_HEADER = ("| category | docs | tokens | loss A | ppl A | loss B | ppl B | A wins | ties | B wins | win+tie A % "
           "| win+tie B % |")


def _row(name: str, t: Tally) -> str:
    return (f"| {name} | {t.documents} | {t.tokens} | {t.loss_a:.4f} | {t.ppl_a:.2f} | {t.loss_b:.4f} | "
            f"{t.ppl_b:.2f} | {t.wins_a} | {t.ties} | {t.wins_b} | {t.rate_a:.1f} | {t.rate_b:.1f} |")


def to_markdown(report: Report, label_a: str = "A", label_b: str = "B") -> str:
    """One table: a row per category and an overall row, then the verdict in a sentence."""
    o = report.overall
    lines = [f"A: {label_a}", f"B: {label_b}", "",
             f"Loss in nats/token (token-weighted), ppl = exp(loss). A document is a tie when the runs' mean losses "
             f"differ by at most {report.margin:g} nats/token.", "",
             _HEADER, "|" + "---|" * _HEADER.count(" | ") + "---|"]
    lines += [_row(name, t) for name, t in report.categories.items()]
    lines += [_row("**overall**", o), ""]
    lines.append(f"Verdict: **{report.verdict}** (parity needs each side's overall win+tie rate >= "
                 f"{report.min_rate:g}%; A {o.rate_a:.1f}%, B {o.rate_b:.1f}%). Mean loss B - A = "
                 f"{o.loss_b - o.loss_a:+.3g} nats/token; largest difference on one document {o.max_abs_diff:.3g}.")
    return "\n".join(lines) + "\n"
