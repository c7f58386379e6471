"""The paper's experiments: models, one training loop, presets and their runner.

- :mod:`~icstools.experiments.models`: the model factories (``paper_mlp``, ``small_cnn``,
  ``vgg_cnn``),
  noisy BatchNorm, ``normalized_layers`` and ``load_factory`` (model targets);
- :mod:`~icstools.experiments.measures`: measurements logged during training
  (``scale_invariance``, ``generalization``);
- :mod:`~icstools.experiments.inference`: Algorithm 2's inference network with population
  statistics (``population_batchnorm``);
- :mod:`~icstools.experiments.training`: the one training loop (``train``) and the record
  schedule (``record_steps``);
- :mod:`~icstools.experiments.presets`: the experiments (``Preset``, ``PRESETS``) and the
  claims they test;
- :mod:`~icstools.experiments.runner`: ``run_preset``, its run stores and ``manifest.json``;
- :mod:`~icstools.experiments.cluster`: the runs of ``run_preset(workers=N)`` or
  ``run_preset(scheduler=ADDRESS)`` on a ``dask.distributed`` cluster;
- :mod:`~icstools.experiments.sweeps`: the learning-rate sweep behind ``FIG1_LR``.

The public names are all importable from here.
"""

from icstools.experiments.cluster import ClusterError, RunsFailedError
from icstools.experiments.inference import population_batchnorm
from icstools.experiments.measures import generalization, scale_invariance
from icstools.experiments.models import (
    NoisyBatchNorm1d,
    load_factory,
    normalized_layers,
    paper_mlp,
    set_noise_step,
    small_cnn,
    vgg_cnn,
)
from icstools.experiments.presets import (
    CNN_LR,
    DATA_SHAPES,
    FIG1_LR,
    PRESETS,
    RELU_LR,
    Condition,
    Preset,
    PresetError,
    get_preset,
)
from icstools.experiments.rerun import RunsExistError
from icstools.experiments.runner import (
    Manifest,
    RunInfo,
    load_manifest,
    run_preset,
    train_condition,
)
from icstools.experiments.sweeps import fig1_lr_sweep
from icstools.experiments.training import TrainResult, record_steps, train, train_mnist

__all__ = [
    "CNN_LR",
    "DATA_SHAPES",
    "FIG1_LR",
    "PRESETS",
    "RELU_LR",
    "ClusterError",
    "Condition",
    "Manifest",
    "NoisyBatchNorm1d",
    "Preset",
    "PresetError",
    "RunInfo",
    "RunsExistError",
    "RunsFailedError",
    "TrainResult",
    "fig1_lr_sweep",
    "generalization",
    "get_preset",
    "load_factory",
    "load_manifest",
    "normalized_layers",
    "paper_mlp",
    "population_batchnorm",
    "record_steps",
    "run_preset",
    "scale_invariance",
    "set_noise_step",
    "small_cnn",
    "train",
    "train_condition",
    "train_mnist",
    "vgg_cnn",
]
