"""Training, one concept per module:

- :mod:`~racnn.training.schedule`: the phases (what each trains, its loss, its optimisers) and the alternating
  schedule;
- :mod:`~racnn.training.step`: one training step of any phase (the trainer's and ``benchmarks/speed.py``'s);
- :mod:`~racnn.training.apn_init`: the APN initialisation's targets; :mod:`~racnn.training.search`: the search
  update's (``apn.update=search``);
- :mod:`~racnn.training.trainer`: :class:`~racnn.training.trainer.Trainer`, the run from start to test;
- :mod:`~racnn.training.outputs`: the run folder (config, checkpoints, metrics log, TensorBoard);
- :mod:`~racnn.training.loaders`, :mod:`~racnn.training.optim`, :mod:`~racnn.training.runtime`: datasets and
  loaders, optimisers and schedules, random generators / Ctrl-C (the device, autocast and memory format are
  :mod:`racnn.runtime`'s);
- :mod:`~racnn.training.distributed` and :mod:`~racnn.training.ddp`: the process group and collectives; the
  DDP wrapper and synchronised BatchNorm.
"""
