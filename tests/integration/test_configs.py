"""Every config in conf/ composes: each option of each config group (nested groups and conf/experiment
presets included) is composed onto the primary config with Hydra's compose API, fully resolved, and every
node is validated against its component's dataclass through experiments.config.typed, exactly as
experiments.trainer.build_run would do before building anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

import experiments.dist  # noqa: F401  registers the chuanliu_* resolvers that conf/config.yaml uses
from analysis.flops import total_params
from experiments.config import typed
from analysis.sinks import LoggingConfig
from experiments.trainer import GROUPS as TRAINER_GROUPS
from experiments.trainer import HardwareConfig, TrainConfig
from comm.buckets import BucketConfig
from comm.hooks import AlgorithmConfig, OverlapConfig
from comm.slowlink import LinkConfig
from comm.topology import TopologyConfig
from systems.data import DataConfig
from systems.fusion import FusionConfig
from systems.model import ModelConfig
from systems.optim import OptimConfig
from systems.splitting import SplittingConfig

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
PRIMARY = "config"

# Every group the trainer reads names its class with _target_ (experiments.trainer.GROUPS); the test types each
# against the class the trainer's Settings expects, so an option naming the wrong class fails here.
TARGETED = tuple(TRAINER_GROUPS.values())
EXPECTED: dict[str, type] = {"train": TrainConfig, "model": ModelConfig, "data": DataConfig,
                             "hardware": HardwareConfig, "logging": LoggingConfig, "optim": OptimConfig,
                             "fusion": FusionConfig, "splitting": SplittingConfig,
                             "comm.topology": TopologyConfig, "comm.algorithm": AlgorithmConfig,
                             "comm.overlap": OverlapConfig, "comm.link": LinkConfig, "comm.bucket": BucketConfig}


# ---------------------------------------------------------------------------------------------------------
# Discovery (at collection time, so each option is its own test id).
# ---------------------------------------------------------------------------------------------------------


def discover_groups(conf: Path = CONF) -> dict[str, list[str]]:
    """{group path ("model", "comm/algorithm", "experiment"): sorted option names} for every folder under
    conf/ (recursively) that holds *.yaml files."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in conf.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in folder.glob("*.yaml") if f.is_file())
        if options:
            groups[folder.relative_to(conf).as_posix()] = options
    return groups


def _defaults_entry_group(entry: Any) -> str | None:
    """The group a primary defaults-list entry selects ("optional /experiment@foo: x" -> "experiment")."""
    if not isinstance(entry, dict) or len(entry) != 1:
        return None  # "_self_" or a plain config name
    key = next(iter(entry)).strip()
    for prefix in ("override ", "optional "):
        key = key.removeprefix(prefix).strip()
    return key.split("@")[0].lstrip("/")


def primary_default_groups(conf: Path = CONF) -> set[str]:
    raw = OmegaConf.to_container(OmegaConf.load(conf / f"{PRIMARY}.yaml"), resolve=False)
    return {g for g in (_defaults_entry_group(e) for e in raw.get("defaults", [])) if g}


GROUPS = discover_groups()
IN_DEFAULTS = primary_default_groups()
CASES = [(group, option) for group, options in GROUPS.items() for option in options]


# ---------------------------------------------------------------------------------------------------------
# Composing and validating.
# ---------------------------------------------------------------------------------------------------------


def compose(overrides: list[str], *, with_hydra: bool = False) -> DictConfig:
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra.compose(config_name=PRIMARY, overrides=overrides, return_hydra_config=with_hydra)


def compose_option(group: str, option: str, *, with_hydra: bool = False) -> DictConfig:
    """Select ``option`` of ``group``: ``group=option`` when the primary defaults list has the group (e.g.
    model, or an ``experiment: null`` slot), else ``+group=option`` (an @package _global_ preset, or a nested
    group). A nested group may instead be selected by a group option's own defaults list, so the other form
    is tried when Hydra refuses the first; if both fail the first error is raised."""
    plain, append = f"{group}={option}", f"+{group}={option}"
    first, second = (plain, append) if group in IN_DEFAULTS else (append, plain)
    try:
        return compose([first], with_hydra=with_hydra)
    except ConfigCompositionException as first_error:
        try:
            return compose([second], with_hydra=with_hydra)
        except ConfigCompositionException:
            raise first_error from None


def option_package(path: Path, group: str) -> str:
    """Where an option's keys land: its ``# @package`` header, else the group path (Hydra 1.1+ default)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# @package"):
            package = line.removeprefix("# @package").strip()
            if package == "_global_":
                return ""
            return group.replace("/", ".") if package == "_group_" else package
    return group.replace("/", ".")


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def validate_node(node: DictConfig, key: str, objects: dict[str, Any]) -> None:
    """Type ``node`` (at config key ``key``) by its _target_ (checked against EXPECTED); a node without one that
    holds only sub-nodes (the package of a nested group, e.g. comm.algorithm) is a namespace: recurse."""
    if "_target_" in node:
        obj = typed(node, key)
        if key in EXPECTED:
            assert isinstance(obj, EXPECTED[key]), f"{key}._target_ builds {type(obj)}, not a {EXPECTED[key]}"
    else:
        children = {k: node[k] for k in node}
        assert children and all(isinstance(v, DictConfig) for v in children.values()), (
            f"config node {key!r} names no dataclass: give it a `_target_: module.ConfigDataclass` (and add it "
            "to experiments.trainer.GROUPS if the trainer reads it)")
        for k, v in children.items():
            validate_node(v, f"{key}.{k}", objects)
        return
    assert dataclasses.is_dataclass(obj) and not isinstance(obj, type), f"{key} -> {obj!r}"
    objects[key] = obj


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Resolve the whole config, then type every node; returns {key: dataclass instance}."""
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation (resolvers included) works
    assert isinstance(resolved, dict)
    present = {k for k in TARGETED if OmegaConf.select(cfg, k) is not None}
    missing = set(TARGETED) - present
    assert not missing, f"composed config lacks {sorted(missing)}"
    for key in TARGETED:
        assert "_target_" in OmegaConf.select(cfg, key), f"{key} must name its dataclass with _target_"
    objects: dict[str, Any] = {}
    for key in cfg:
        if isinstance(cfg[key], DictConfig):
            validate_node(cfg[key], str(key), objects)
    assert set(TARGETED) <= set(objects)
    return objects


# ---------------------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------------------


def test_discovery_finds_the_groups_and_options():
    for group in ("model", "data", "precision", "engine", "hardware", "logging"):
        assert group in GROUPS, f"group {group} not found under {CONF}: {sorted(GROUPS)}"
    assert {"tiny", "small", "baichuan_7b"} <= set(GROUPS["model"])
    assert {"fp32", "bf16"} <= set(GROUPS["precision"])
    assert {"model", "data", "precision", "engine", "hardware", "logging"} <= IN_DEFAULTS
    # Every option file under conf/ (all but the primary config) is a case, each exactly once.
    files = sorted(f.relative_to(CONF).as_posix() for f in CONF.rglob("*.yaml") if f.parent != CONF)
    assert sorted(f"{g}/{o}.yaml" for g, o in CASES) == files
    assert len(files) >= 11


def test_default_config_composes_and_validates():
    objects = validate(compose([]))
    assert objects["model"].name == "tiny"
    assert objects["train"].seq_len == objects["model"].max_seq_len == 128  # ${model.max_seq_len}
    assert objects["data"].vocab_size == objects["model"].vocab_size  # ${model.vocab_size}
    assert type(objects["precision"]).__name__ == "Precision" and objects["precision"].compute_dtype == "fp32"
    assert type(objects["engine"]).__name__ == "DDPConfig"


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_validates(group: str, option: str):
    cfg = compose_option(group, option)
    validate(cfg)
    # The option was really selected: every value in its YAML is in the composed config, where its package
    # puts it (compared unresolved, so interpolations compare as written).
    path = CONF / group / f"{option}.yaml"
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    own.pop("defaults", None)
    package = option_package(path, group)
    if "hydra" in own or group.startswith("hydra/"):  # sweep settings, or a Hydra plugin's own option
        cfg = compose_option(group, option, with_hydra=True)  # (conf/hydra/sweeper): only with the hydra node
    node = OmegaConf.select(cfg, package) if package else cfg
    assert node is not None, f"{group}={option}: nothing at package {package!r}"
    composed = leaves(OmegaConf.to_container(node, resolve=False))
    for key, value in leaves(own).items():
        got = composed.get(key, "<missing>")
        assert key in composed and got == value, (
            f"{path.relative_to(REPO)}: {key}={value!r} but the composed config has {got!r}")


SWEEPS = [(option, key, value) for option in GROUPS.get("experiment", [])
          for key, values in (OmegaConf.load(CONF / "experiment" / f"{option}.yaml")
                              .get("hydra", {}).get("sweeper", {}).get("params", {}) or {}).items()
          for value in str(values).split(",")]


@pytest.mark.parametrize(("option", "key", "value"), SWEEPS, ids=[f"{o}:{k}={v}" for o, k, v in SWEEPS])
def test_every_job_of_a_preset_sweep_composes(option: str, key: str, value: str):
    """`-m experiment=X` runs every combination of X's sweeper params; each value must compose with X."""
    validate(compose([f"experiment={option}", f"{key}={value.strip()}"]))


def test_baichuan_7b_has_the_published_shapes():
    cfg = compose(["model=baichuan_7b"])
    objects = validate(cfg)
    m = objects["model"]
    assert (m.name, m.n_layers, m.dim, m.n_heads, m.ffn_dim, m.vocab_size, m.max_seq_len) == (
        "baichuan_7b", 32, 4096, 32, 11008, 64000, 4096)
    assert m.head_dim == 128
    n = total_params(n_layers=m.n_layers, dim=m.dim, ffn_dim=m.ffn_dim, vocab_size=m.vocab_size)
    assert n == 7_000_559_616  # the figure in conf/model/baichuan_7b.yaml (Baichuan-7B's config.json)
    # The interpolations follow the model.
    assert objects["train"].seq_len == 4096
    assert objects["data"].vocab_size == 64000
