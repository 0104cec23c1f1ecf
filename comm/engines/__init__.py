"""Engines: each owns a whole data-parallel strategy (wrapping, gradient reduction, optimizer step, checkpoint
state) behind one interface (``engine.py``): ``ddp.py``, ``fsdp2.py``, ``deepspeed.py``, ``megatron.py`` (+
``megatron_cpu.py``, its one CPU bridge). The collectives they may use live one level up, in comm/.
"""
import logging

log = logging.getLogger(__name__)

# Where the engines' configs lived before comm/engines/ (a run's saved .hydra/config.yaml and users' own YAMLs
# still name them): read as the new path, with a warning naming it.
MOVED = {"comm.ddp.": "comm.engines.ddp.", "comm.fsdp2.": "comm.engines.fsdp2.",
         "comm.deepspeed_engine.": "comm.engines.deepspeed.", "comm.megatron_engine.": "comm.engines.megatron.",
         "comm.engine.": "comm.engines.engine."}


def current_target(target: str, key: str = "engine") -> str:
    """``target`` with a moved module path replaced by the new one (logged once per call)."""
    if not isinstance(target, str):
        return target
    for old, new in MOVED.items():
        if target.startswith(old):
            moved = new + target[len(old):]
            log.warning("%s._target_=%s has moved to %s; update the YAML (the old path still works for now)",
                        key, target, moved)
            return moved
    return target
