"""One way to plug in an option: each option names its class, the class builds what the run uses."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from comm.buckets import BucketConfig, CostModelBuckets, GpuCountBuckets
from comm.engines.ddp import DDPConfig
from comm.hierarchical import FlatAllReduce, HierarchicalAllReduce
from comm.hooks import AlgorithmConfig
from comm.slowlink import LinkConfig, SlowLink
from experiments.config import ConfigError, typed
from experiments.dist import register_resolvers
from experiments.trainer import read_settings
from fault.chaos import KINDS, ChaosConfig, FaultKind, FaultSpec
from tests.helpers import REPO


def _compose(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_saved_config_naming_an_engines_old_path_still_loads_and_says_where_it_moved(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = typed(OmegaConf.create({"_target_": "comm.ddp.DDPConfig", "static_graph": True}), "engine")
    assert isinstance(cfg, DDPConfig) and cfg.static_graph
    assert "comm.engines.ddp.DDPConfig" in caplog.text


def test_a_node_without_a_class_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"comm\.link names no _target_ .* conf/comm/link/"):
        typed(OmegaConf.create({"inter_gbps": 1.0}), "comm.link")


def test_an_option_naming_a_class_of_the_wrong_kind_is_refused():
    cfg = _compose("comm/algorithm=flat", "comm.algorithm._target_=comm.buckets.BucketConfig")
    with pytest.raises(ConfigError, match=r"comm\.algorithm\._target_ names BucketConfig, not a subclass "
                                          r"of AlgorithmConfig"):
        read_settings(cfg)


@pytest.mark.parametrize("option, cls", [("native", AlgorithmConfig), ("flat", FlatAllReduce),
                                         ("hierarchical", HierarchicalAllReduce)])
def test_each_algorithm_option_is_its_class_and_builds_its_reduce(option, cls):
    s = read_settings(_compose(f"comm/algorithm={option}"))
    assert type(s.algorithm) is cls and s.algorithm.name == option
    reduce = s.algorithm.build(SimpleNamespace(topology=None), SlowLink(LinkConfig()))  # built, not called
    assert (reduce is None) == (option == "native")  # native: the engine's own reduction, no hook


def test_the_option_name_cannot_contradict_the_class():
    with pytest.raises(ValueError, match=r"select it with comm/algorithm=hierarchical"):
        FlatAllReduce(name="hierarchical")
    with pytest.raises(ConfigError, match=r"select it with comm/bucket=gpu_count"):
        read_settings(_compose("comm/bucket=fixed", "+comm.bucket.policy=gpu_count"))


@pytest.mark.parametrize("option, cls", [("fixed", BucketConfig), ("baichuan", BucketConfig),
                                         ("gpu_count", GpuCountBuckets), ("cost_model", CostModelBuckets)])
def test_each_bucket_option_is_its_class(option, cls):
    s = read_settings(_compose(f"comm/bucket={option}"))
    assert type(s.bucket) is cls
    assert s.bucket.policy == {"baichuan": "fixed"}.get(option, option)


def test_every_chaos_kind_is_one_class_and_strikes_where_it_says():
    assert set(KINDS) == {"kill", "hang", "slow", "nan_loss", "exception", "corrupt_checkpoint", "kill_mid_save",
                          "slow_io"}
    for name, cls in KINDS.items():
        assert issubclass(cls, FaultKind) and cls.kind == name and cls.at in ("step_start", "save", "commit")
    needs = ChaosConfig(faults=[FaultSpec(kind="hang", step=3), FaultSpec(kind="slow_io", step=3)]).kinds_used()
    assert any(k.needs_watchdog for k in needs) and any(k.needs_checkpoint for k in needs)
    with pytest.raises(ValueError, match=r"fault kind 'melt' is unknown; use one of kill, hang"):
        FaultSpec(kind="melt", step=3)
