"""The fitted constants (data/fit.json): written by ``calibration.fit`` on the calibration half only."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from analysis.predictor.compute import Efficiencies
from analysis.predictor.inputs import GPU

FIT_PATH = Path(__file__).resolve().parent / "data" / "fit.json"


@lru_cache(maxsize=4)
def load_fit(path: Path = FIT_PATH) -> dict:
    if not path.exists():
        raise ValueError(f"{path} is missing: the predictor has no fitted constants; run "
                         "`python -m analysis.predictor --fit` (fits on the calibration half of the data set)")
    return json.loads(path.read_text())


def efficiencies_for(gpu: GPU, fit: dict | None = None) -> Efficiencies:
    """This GPU type's constants: its own fitted values (when the calibration half had enough of its rows) or
    those of the same silicon (inputs.GPUS' family), plus the shared ones."""
    fit = fit or load_fit()
    families = fit["families"]
    family = gpu.name if gpu.name in families else gpu.family
    if family not in families:
        raise ValueError(f"no fitted constants for {gpu.name} (family {gpu.family}); the data set's calibration "
                         f"half covers {sorted(families)}: add published runs of this GPU type and refit, or pass "
                         "eff= explicitly")
    return Efficiencies(**(fit["shared"] | families[family]))
