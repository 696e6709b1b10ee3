"""Training, one concept per module:

- :mod:`~racnn.training.phases`: the phases, each defined in one place with all it does (what it trains, how
  its crops see the boxes, its loss, its optimisers, clipping, the learning-rate schedule, its length);
- :mod:`~racnn.training.schedule`: which phase runs next (warm-up, the APN initialisation, the alternating
  phases);
- :mod:`~racnn.training.step`: one training step of any phase (the trainer's and ``benchmarks/speed.py``'s);
- :mod:`~racnn.training.apn_init` and :mod:`~racnn.training.search`: the APN initialisation's targets, the
  search update's;
- :mod:`~racnn.training.trainer`: :class:`~racnn.training.trainer.Trainer`, the loop of a run from start to
  test;
- :mod:`~racnn.training.state`: where a run stands and the checkpoint ``last.pt`` it resumes from;
- :mod:`~racnn.training.outputs`: the run folder (config, checkpoints, metrics log, TensorBoard);
- :mod:`~racnn.training.loaders`, :mod:`~racnn.training.optim`, :mod:`~racnn.training.runtime`: a run's
  datasets and loaders, its optimisers and learning-rate schedule, the model placed for training, random
  generators, Ctrl-C (the device, autocast and memory format are :mod:`racnn.runtime`'s);
- :mod:`~racnn.training.distributed` and :mod:`~racnn.training.ddp`: the process group and collectives; the
  DDP wrapper and synchronised BatchNorm.

A split is evaluated by :func:`racnn.evaluation.evaluate_split`, over every process of a run.
"""
