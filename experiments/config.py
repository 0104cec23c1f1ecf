"""Typed configs: each YAML node is checked against its component's dataclass before anything is built.

A node with ``_target_`` names its dataclass (``_target_: systems.precision.Precision``); otherwise the caller
says which. OmegaConf's structured merge rejects unknown keys and values of the wrong type, and the error is
re-raised as one sentence that names the config key, so ``model.n_layers=abc`` fails before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from comm.engines import current_target

T = TypeVar("T")


class ConfigError(ValueError):
    """Bad user input found while setting a run up; the entry point prints it as one line."""


def typed(node: DictConfig, key: str, cls: type[T] | None = None) -> T:
    """Validate ``node`` (found at config key ``key``) against a dataclass and return an instance of it."""
    if node is None:
        raise ConfigError(f"the config has no {key}; select an option of conf/{key.replace('.', '/')}/ or add it")
    raw = OmegaConf.to_container(node, resolve=True)
    target = raw.pop("_target_", None)
    if cls is None and target is None:
        raise ConfigError(f"{key} names no _target_ (its config class); add `_target_: <module>.<Class>` to the "
                          f"YAML of conf/{key.replace('.', '/')}/")
    try:
        cls = cls or get_class(current_target(target, key))
    except Exception as e:  # hydra raises a bare ImportError/ValueError chain
        raise ConfigError(f"{key}._target_={target!r} cannot be imported ({e}); fix the YAML") from None
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{key}._target_={target!r} is not a config dataclass")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), raw)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        field = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{key}.{field} is not a known key of {key} ({cls.__name__}: {known}); "
                          "check the spelling") from None
    except OmegaConfBaseException as e:
        field = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for {key}.{field}: {msg}") from None
    except (ValueError, TypeError) as e:  # raised by the dataclass's own __post_init__ checks
        raise ConfigError(str(e)) from None


# Config groups whose options all build one dataclass: its defaults are the group's defaults, stored in Hydra's
# ConfigStore as /schema/<name>; each option YAML starts from them (``defaults: [/schema/<name>@_here_, _self_]``)
# and sets only what differs, and every key stays overridable from the command line.
SCHEMAS = {
    "comm_bucket": "comm.buckets.BucketConfig",
    "fault_checkpoint": "fault.checkpoint.CheckpointConfig",
    "splitting": "systems.splitting.SplittingConfig",
    "fusion": "systems.fusion.FusionConfig",
    "precision": "systems.precision.Precision",
}


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore  # noqa: PLC0415

    store = ConfigStore.instance()
    for name, target in SCHEMAS.items():
        # A plain node, not a structured one: values are checked by typed(), whose errors name the key. The field
        # that names an option (``option_field``) is left to each option's class, so its default is the class's.
        cls = get_class(target)
        values = OmegaConf.to_container(OmegaConf.structured(cls))
        values.pop(getattr(cls, "option_field", None), None)
        node = {"_target_": target, **values}
        store.store(group="schema", name=name, node=node)


def plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


class RunDirCheck(Callback):
    """Hydra callback: a run (or sweep) directory that cannot be written is one line naming it and the fix, before
    Hydra's own mkdir would end in a traceback (conf/config.yaml registers it)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(OmegaConf.select(config, "hydra.run.dir"), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(OmegaConf.select(config, "hydra.sweep.dir"), "hydra.sweep.dir")


def _check_writable(path: str | None, key: str) -> None:
    if path is None:
        return
    target = Path(path).expanduser().absolute()
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"chuanliu: error: cannot write the run directory {target} ({e.strerror or e}); set "
                         f"{key}=<a writable directory>, or start from a directory you can write to (the default "
                         f"is relative to the current one)") from None
