"""Where metrics go. Sinks only receive dicts from analysis.metrics.MetricsProcessor; they compute nothing."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(kw_only=True)
class LoggingConfig:
    """The logging group (conf/logging/): where a run's metrics go. ``build`` gives rank 0's sinks."""

    wandb_mode: str = "offline"  # offline (default: no network, sync later), online or disabled
    project: str = "chuanliu"  # wandb project
    group: str | None = None  # wandb group (runs of one sweep share one)
    tags: list[str] = field(default_factory=list)  # wandb tags
    progress_bar: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode={self.wandb_mode!r} is unknown; use offline, online or disabled")

    def build(self, *, run_dir: Path, config: dict[str, Any], log_every: int, total_steps: int,
              write: Callable[[str], None] = print) -> list:
        """The console line and metrics.jsonl always; a wandb run unless wandb_mode=disabled (wandb's own
        "disabled" mode would still import it, which costs seconds)."""
        sinks: list = [ConsoleSink(log_every, total_steps, write=write), JsonlSink(Path(run_dir) / "metrics.jsonl")]
        if self.wandb_mode == "disabled":
            return sinks
        try:
            sinks.append(WandbSink(mode=self.wandb_mode, project=self.project, run_dir=run_dir, config=config,
                                   group=self.group, tags=list(self.tags), name=Path(run_dir).name))
        except Exception as e:  # wandb's own errors (no API key, no network) are many types
            raise ValueError(f"wandb could not start in mode {self.wandb_mode!r} ({e}); use "
                             "logging.wandb_mode=offline (sync later with `wandb sync`) or disabled") from None
        return sinks


def _jsonable(v: Any) -> Any:
    # NaN/Inf are not JSON: a diverged loss must still land in metrics.jsonl, as null plus a flag.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlSink:
    """One JSON object per step, flushed at once so a crash loses at most the step in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: _jsonable(v) for k, v in metrics.items()}
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            row["nonfinite"] = bad
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self, summary: dict[str, Any]) -> None:
        self._f.close()


class ConsoleSink:
    """A line every ``every`` steps (and the last), written through ``write`` (tqdm.write keeps the bar intact)."""

    def __init__(self, every: int, total_steps: int, write: Callable[[str], None] = print):
        self.every, self.total, self.write = max(1, every), total_steps, write

    def log(self, m: dict[str, Any]) -> None:
        step = m["step"]
        if step % self.every and step != self.total and step != 1:
            return
        mfu = m.get("perf/mfu/palm")
        mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        self.write(f"step {step:>5} | loss {m['train/loss']:.4f} | lr {m['train/lr']:.2e} | "
                   f"gnorm {m['train/grad_norm']:.2f} | {m['perf/step_s'] * 1e3:.0f} ms | "
                   f"{m['perf/tokens_per_s']:,.0f} tok/s | {m['perf/tflops/palm']:.3f} TFLOPS | MFU {mfu_s}")

    def close(self, summary: dict[str, Any]) -> None:
        pass


class WandbSink:
    """wandb run (offline by default). Config, group and tags are logged at init; the summary at close."""

    def __init__(self, *, mode: str, project: str, run_dir: str | Path, config: dict[str, Any],
                 group: str | None = None, tags: list[str] | None = None, name: str | None = None):
        import wandb  # imported here: a null sink must not pay for wandb's import

        self._wandb = wandb
        self.run = wandb.init(mode=mode, project=project, dir=str(run_dir), config=config, group=group,
                              tags=tags or None, name=name, settings=wandb.Settings(console="off", quiet=True))

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: v for k, v in metrics.items() if v is not None and k not in ("step", "time")}
        self.run.log(row, step=metrics["step"])

    @property
    def location(self) -> str:
        return self.run.dir

    def close(self, summary: dict[str, Any]) -> None:
        for k, v in _flatten(summary).items():
            self.run.summary[k] = v
        self.run.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out
