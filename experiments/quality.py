"""Quality parity of two training runs: held-out loss, perplexity and a win+tie rate per corpus category.

    python -m experiments.quality runs/baseline runs/chunked_ce               # newest checkpoint of each
    python -m experiments.quality A B --step 40 --per-category 50 --margin 0.02 --out reports/q

Each run directory must hold .hydra/config.yaml, tokenizer.model and a committed checkpoint
(train with fault/checkpoint=sync). Both runs are scored, fp32 on the CPU, on the same held-out documents of the
built-in corpus (systems.corpus.heldout_documents: the training world's facts, none of the training documents);
analysis.quality does the arithmetic. Writes quality.json and quality.md to --out (default
<run_b>/quality_vs_<name of run_a>) and prints the table. Bad input exits with code 2 and changes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from analysis.quality import DEFAULT_MARGIN, DEFAULT_MIN_RATE, DocLoss, compare, to_json, to_markdown
from experiments.config import typed
from fault import safe_load
from fault.checkpoint import file_sha256, newest_committed, verify_checkpoint
from systems.corpus import HELDOUT_SEED, heldout_documents
from systems.data import DataConfig
from systems.model import ModelConfig, build_model
from systems.tokenizer import Tokenizer, load_tokenizer

# Model fields that decide the weights' shapes: two runs must agree on them to be compared.
SHAPE_FIELDS = ("n_layers", "dim", "n_heads", "ffn_dim", "vocab_size")
# Built-in corpus parameters the held-out documents depend on (its world, and the text they must not repeat).
CORPUS_FIELDS = ("data_dir", "corpus_files", "corpus_mb", "seed")
# Windows scored per forward pass.
BATCH = 16


class QualityError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


@dataclass
class RunCheckpoint:
    path: Path  # the run directory
    model: ModelConfig
    data: DataConfig
    tokenizer_sha256: str
    checkpoint: Path  # the committed step_N directory used
    step: int


def _verify(ckpt: Path) -> int:
    """Check a committed checkpoint as a resume does (fault.checkpoint.verify_checkpoint: confined to its directory,
    every file listed and hashed, nothing that could run code); return its step."""
    try:
        return int(verify_checkpoint(ckpt)["step"])
    except (safe_load.Refused, OSError, ValueError) as e:
        raise QualityError(f"checkpoint {ckpt} is refused ({e}); pick another one with --step") from None


def _pick_checkpoint(run: Path, step: int | None) -> Path:
    found = newest_committed(run / "checkpoints")
    if not found:
        raise QualityError(f"{run}: this run saved no checkpoint; train with fault/checkpoint=sync")
    if step is None:
        return found[0]
    wanted = run / "checkpoints" / f"step_{step:06d}"
    if wanted not in found:
        raise QualityError(f"{run} has no committed checkpoint at step {step}; it has steps "
                           f"{', '.join(str(int(p.name[5:])) for p in found)}")
    return wanted


def load_run(run: Path, step: int | None) -> RunCheckpoint:
    """Read a run directory's config, tokenizer hash and chosen (verified) checkpoint; loads no weights."""
    config, tokenizer = run / ".hydra" / "config.yaml", run / "tokenizer.model"
    if not run.is_dir():
        raise QualityError(f"run directory {run} does not exist")
    if not config.is_file() or not tokenizer.is_file():
        raise QualityError(f"{run} is not a chuanliu run directory: it needs .hydra/config.yaml and "
                           "tokenizer.model (written by python -m experiments.train)")
    try:
        cfg = OmegaConf.load(config)
        model, data = typed(cfg.model, "model", ModelConfig), typed(cfg.data, "data", DataConfig)
    except Exception as e:  # noqa: BLE001 (unreadable YAML, missing node or bad value: all bad input here)
        raise QualityError(f"{config} does not hold a usable run config ({type(e).__name__}: {e})") from None
    ckpt = _pick_checkpoint(run, step)
    return RunCheckpoint(path=run, model=model, data=data, tokenizer_sha256=file_sha256(tokenizer), checkpoint=ckpt,
                         step=_verify(ckpt))


def check_comparable(a: RunCheckpoint, b: RunCheckpoint) -> None:
    """Same tokenizer (else losses are over different tokens), same weight shapes and training corpus."""
    if a.tokenizer_sha256 != b.tokenizer_sha256:
        raise QualityError(f"{a.path} and {b.path} have different tokenizers (tokenizer.model sha256 "
                           f"{a.tokenizer_sha256[:12]} vs {b.tokenizer_sha256[:12]}); losses over different tokens "
                           "are not comparable: train both with the same data.tokenizer_path")
    for kind, fields, x, y in (("model", SHAPE_FIELDS, a.model, b.model), ("data", CORPUS_FIELDS, a.data, b.data)):
        diff = [f"{kind}.{k}: {getattr(x, k)!r} vs {getattr(y, k)!r}"
                for k in fields if getattr(x, k) != getattr(y, k)]
        if diff:
            raise QualityError(f"{a.path} and {b.path} differ in {'; '.join(diff)}; this tool compares two runs of "
                               "the same model on the same data")


def load_model(run: RunCheckpoint) -> torch.nn.Module:
    """The run's model in fp32 on the CPU, in eval mode, with the checkpoint's weights (no optimizer state)."""
    model = build_model(run.model)
    state = get_model_state_dict(model)
    # A partial load: DCP reads only the "model" entries; the checkpoint's "optim" entries stay on disk. Only the
    # files _verify hashed are opened, bytes items are read weights_only, a weight stored as an object is refused.
    verified = safe_load.listed_sizes(json.loads(safe_load.read_manifest(run.checkpoint)))
    with warnings.catch_warnings():  # DCP warns that there is no process group; one process is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            safe_load.load({"model": state}, run.checkpoint, verified=verified, no_dist=True)
        except (CheckpointException, RuntimeError, ValueError) as e:  # Refused is a ValueError  # CheckpointException: a
            raise QualityError(f"checkpoint {run.checkpoint} is refused ({str(e).splitlines()[0][:300]}); pick "
                               "another one with --step") from None  # BaseException, raised by DCP's load
    set_model_state_dict(model, state)
    return model.float().eval()


def _windows(tokens: list[int], max_len: int) -> list[list[int]]:
    """Cut tokens into pieces of at most max_len + 1 overlapping by one, so every token after the first is a target."""
    return [tokens[i : i + max_len + 1] for i in range(0, max(1, len(tokens) - 1), max_len)]


def document_tokens(tokenizer: Tokenizer, doc: str) -> list[int]:
    """[eos] + encode(doc) + [eos]: training packs documents as encode(doc) + [eos] back to back, so a document
    is always read right after an EOS; the leading EOS gives it that context and is not itself a target."""
    return [tokenizer.eos_id, *tokenizer.encode(doc), tokenizer.eos_id]


@torch.inference_mode()
def score(model: torch.nn.Module, docs: list[list[int]], max_len: int) -> list[DocLoss]:
    """Summed next-token loss and target count of each document, windows of max_len, fp32."""
    windows = [(i, w) for i, toks in enumerate(docs) for w in _windows(toks, max_len)]
    windows.sort(key=lambda iw: len(iw[1]))  # batches of similar lengths waste little compute on padding
    nll, count = [0.0] * len(docs), [0] * len(docs)
    for start in range(0, len(windows), BATCH):
        chunk = windows[start : start + BATCH]
        width = max(len(w) for _, w in chunk)
        # Right padding: a causal model's outputs at real positions never see the pad.
        batch = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T + 1)
        mask = torch.zeros(len(chunk), width - 1, dtype=torch.bool)  # (B, T)
        for row, (_, w) in enumerate(chunk):
            batch[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w) - 1] = True
        logits = model(batch[:, :-1]).float()  # (B, T, V)
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none") * mask  # (B, T)
        for row, (i, _) in enumerate(chunk):
            nll[i] += float(loss[row].sum())
            count[i] += int(mask[row].sum())
    return [DocLoss(nll=n, tokens=c) for n, c in zip(nll, count)]


def evaluate(run: RunCheckpoint, docs: dict[str, list[list[int]]]) -> dict[str, list[DocLoss]]:
    model = load_model(run)
    flat = [t for toks in docs.values() for t in toks]
    losses = iter(score(model, flat, run.model.max_seq_len))
    return {name: [next(losses) for _ in toks] for name, toks in docs.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.quality", description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path, help="reference run directory (A)")
    p.add_argument("run_b", type=Path, help="variant run directory (B)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to use in both runs (default: newest)")
    p.add_argument("--per-category", type=int, default=20, help="held-out documents per category (default 20)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"tie margin in nats/token on a document's mean loss (default {DEFAULT_MARGIN})")
    p.add_argument("--min-rate", type=float, default=DEFAULT_MIN_RATE,
                   help=f"win+tie rate %% each side needs for parity (default {DEFAULT_MIN_RATE:g})")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, help="held-out document seed")
    p.add_argument("--out", type=Path, default=None, help="report directory (default <run_b>/quality_vs_<run_a>)")
    return p.parse_args(argv)


def run_quality(args: argparse.Namespace) -> Path:
    if args.per_category < 1 or args.margin < 0 or not 0 <= args.min_rate <= 100:
        raise QualityError("--per-category must be >= 1, --margin >= 0 and --min-rate within 0..100")
    a, b = load_run(args.run_a, args.step), load_run(args.run_b, args.step)
    check_comparable(a, b)
    if a.data.data_dir is not None:
        print(f"note: the runs trained on {a.data.data_dir}; the held-out documents come from the built-in "
              "corpus generator, so they measure transfer to it", file=sys.stderr)
    texts = heldout_documents(args.per_category, args.seed, n_files=a.data.corpus_files,
                              total_mb=a.data.corpus_mb, corpus_seed=a.data.seed)
    tokenizer = load_tokenizer(a.path / "tokenizer.model")
    docs = {name: [document_tokens(tokenizer, t) for t in ts] for name, ts in texts.items()}
    losses_a = evaluate(a, docs)
    # The same checkpoint twice (a run against itself) is scored once: evaluation is deterministic anyway.
    losses_b = losses_a if b.checkpoint.resolve() == a.checkpoint.resolve() else evaluate(b, docs)
    report = compare(losses_a, losses_b, margin=args.margin, min_rate=args.min_rate)
    out = args.out or b.path / f"quality_vs_{a.path.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    runs = {k: {"path": str(r.path), "step": r.step, "checkpoint": str(r.checkpoint)} for k, r in (("a", a), ("b", b))}
    context = {"runs": runs, "tokenizer_sha256": a.tokenizer_sha256, "heldout_seed": args.seed,
               "per_category": args.per_category, "loss_unit": "nats/token"}
    (out / "quality.json").write_text(to_json(report, **context) + "\n", encoding="utf-8")
    md = f"# Quality parity: B vs A\n\n{to_markdown(report, *(f'{r.path} (step {r.step})' for r in (a, b)))}"
    (out / "quality.md").write_text(md, encoding="utf-8")
    print(md + f"\nwrote {out / 'quality.json'} and {out / 'quality.md'}")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run_quality(args)
    except QualityError as e:
        print(f"chuanliu: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
