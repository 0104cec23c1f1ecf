"""Cluster-scale predictor: what a configuration reaches on a GPU cluster, held against published runs.

Start at ``predict`` (step.py): a model shape, a cluster and technique choices go in, a ``Prediction`` comes out
(step time, tokens/s/GPU, TFLOPS and MFU under the palm convention, HFU, memory, goodput). The sections:

    inputs.py        model shapes, GPU types, clusters, techniques, ranges of unpublished inputs
    compute.py       GEMMs with tile/wave quantisation, FlashAttention by sequence and head dim, memory-bound
                     kernels, the loss, per-layer overhead, the optimizer
    collectives.py   NCCL rings over rails, trees, NVLink; chuanliu's hierarchical all-reduce
    step.py          engines (DDP, ZeRO-1/2/3, FSDP) put compute and communication together
    memory.py        activations (Korthikanti) and ZeRO-sharded states
    goodput.py       Young/Daly checkpoint intervals and useful time
    interval.py      unpublished inputs as ranges: an interval with its point estimate
    dataset.py       the public data set (data/*.csv) and its seeded split
    calibration.py   the fit on the calibration half (data/fit.json), validation, a CPU's own calibration
    configs.py       a chuanliu run's typed configs -> the predictor's inputs
    nccl_check.py    the collective model against published nccl-tests bus bandwidths
    titan_check.py   the independent check: torchtitan's published tables, never in the data set
    cli.py           python -m analysis.predictor (docs/predictor.md)
"""
from analysis.predictor.collectives import busbw_gbps, collective_s
from analysis.predictor.compute import Efficiencies
from analysis.predictor.configs import (
                                        cpu_cluster,
                                        load_model,
                                        model_from_config,
                                        techniques_from_config,
                                        techniques_from_configs,
)
from analysis.predictor.inputs import (
                                        BAICHUAN_7B_RANGES,
                                        CLUSTERS,
                                        GPUS,
                                        TECHNIQUES,
                                        Cluster,
                                        ModelShape,
                                        Ranges,
                                        Techniques,
                                        get_cluster,
                                        get_gpu,
                                        get_techniques,
)
from analysis.predictor.interval import Interval, predict_interval
from analysis.predictor.step import Prediction, predict

__all__ = ["BAICHUAN_7B_RANGES", "CLUSTERS", "GPUS", "TECHNIQUES", "Cluster", "Efficiencies", "Interval",
           "ModelShape", "Prediction", "Ranges", "Techniques", "busbw_gbps", "collective_s", "cpu_cluster",
           "get_cluster", "get_gpu", "get_techniques", "load_model", "model_from_config", "predict",
           "predict_interval", "techniques_from_config", "techniques_from_configs"]
