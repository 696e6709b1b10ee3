"""The trainer: the loop of a run, phase after phase as the schedule says, then validation, model selection,
checkpoints and the final test; one process or N under ``torchrun`` (see :mod:`racnn.training.distributed`).

A :class:`Trainer` is built from a :class:`racnn.Config`, or from the user's own model, datasets and
optimisers (the config then supplies the rest), and writes nothing until :meth:`Trainer.fit`. What each phase
does is in :mod:`racnn.training.phases`, which phase runs next in :mod:`racnn.training.schedule`, the run's
state and ``last.pt`` in :mod:`racnn.training.state`, its folder in :mod:`racnn.training.outputs`.

Faults: a run killed at any moment resumes from ``last.pt`` (written atomically; ``metrics.jsonl`` is cut back
to what that state had logged), exactly in deterministic mode. Ctrl-C drops the unfinished epoch (``last.pt``
holds the last finished one). A non-finite loss raises :class:`FloatingPointError` naming epoch and step
(a device-side flag checked every ``train.log_every`` steps: no host sync per step); ``last.pt`` stays good.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..backbones import check_weights
from ..checkpoint import load_model, model_record
from ..config import Config, ConfigError
from ..evaluation import Accumulator, epoch_line, evaluate_split, format_table
from ..model import RACNN, build_model
from ..runtime import place_model
from . import ddp, distributed, loaders, optim, runtime
from .outputs import RunFolder, RunFolderError, TensorBoard
from .phases import Phase, attend_phase, set_phase
from .schedule import PhaseSchedule
from .search import epoch_anchor
from .state import RunState, initial_apns, read_resume
from .step import NonFiniteWatch, epoch_record, train_step


class Trainer:
    """One training run in ``out_dir``.

    ``cfg``: the run's config (default: ``Config()``). Each of ``model``, ``train_set``, ``val_set``,
    ``test_set`` and ``optimizers`` replaces what the config would build: ``model`` an :class:`RACNN` (its
    ``cfg`` becomes the config's model section), the datasets any map-style datasets of dicts with ``image``
    (3 x S x S, normalised as ``model.transforms()`` does) and ``label`` (and, for the localisation figures,
    ``box``/``has_box``/``parts``), with ``classes`` names; ``optimizers`` the pair (classifiers, APNs).
    ``resume`` continues the run in ``out_dir`` from its ``last.pt`` with the config saved there
    (``skip_bad_images`` may still be switched on); a new run refuses a folder that holds a run unless
    ``overwrite`` (:class:`racnn.training.outputs.RunFolder`). Nothing is written before :meth:`fit`, which
    locks the folder until :meth:`close`. Under torchrun every process builds one."""

    def __init__(
        self,
        cfg: Config | None = None,
        out_dir: str | Path = "runs/racnn",
        *,
        model: RACNN | None = None,
        train_set: Dataset | None = None,
        val_set: Dataset | None = None,
        test_set: Dataset | None = None,
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        skip_bad_images: bool = False,
    ):
        if resume and overwrite:
            raise ValueError(
                "resume continues the run in the folder, overwrite replaces it: pass one of them"
            )
        # a copy: the run owns its config (the caller's object is left as it was)
        cfg = Config() if cfg is None else Config.from_dict(cfg.to_dict())
        self.dist = distributed.env_from_os()
        self.main = self.dist.main
        self.run = RunFolder(out_dir)
        self.out, self.last = self.run.path, self.run.last
        self.progress, self.overwrite = progress and self.main, overwrite
        saved, cfg = read_resume(self.run) if resume else (None, cfg)
        if model is not None:  # the model's own description wins: it is what the checkpoints record
            cfg.model, cfg.data.image_size = model.cfg, model.image_size
        self.cfg = cfg
        cfg.data.skip_bad_images = cfg.data.skip_bad_images or skip_bad_images
        runtime.seed_everything(cfg.train.seed, cfg.runtime.deterministic)
        self.device = distributed.device_for(runtime.resolve_device(cfg.runtime.device), self.dist)
        loaders.per_rank_batch(cfg, self.dist.world_size)  # the global batch must split evenly
        if saved is None and model is None:  # fail before any data is read
            check_weights(
                cfg.model.backbone, pretrained=cfg.model.pretrained, weights_file=cfg.model.weights_file
            )
        prep = model.preprocessing if model is not None else None
        self.train_set, self.val_set = loaders.run_datasets(
            cfg, preprocessing=prep, train_set=train_set, val_set=val_set
        )
        self.test_set = test_set
        self._loader: loaders.Loader | None = None
        self.classes: list[str] = _classes(self.train_set, model)
        if model is None:
            model = build_model(
                cfg.model,
                num_classes=len(self.classes),
                pretrained=cfg.model.pretrained and saved is None,
                classes=self.classes,
                image_size=cfg.data.image_size,
            )
        elif model.num_classes != len(self.classes):
            raise ValueError(
                f"the model has {model.num_classes} classes, the training set {len(self.classes)}"
            )
        model.classes = self.classes
        # raw module: parameter groups, state dicts, evaluation; `self.forward_model()`: what a step calls
        self.model: RACNN = runtime.place_for_training(model, cfg.runtime, device=self.device, env=self.dist)
        self.forward_model = ddp.PhaseDDP(self.model, self.device, self.dist)
        self.schedule = PhaseSchedule(cfg.schedule, cfg.train.epochs, attend=attend_phase(cfg))
        if cfg.apn.attend_holdout:
            _check_holdout(cfg, self.schedule, self.train_set, self.val_set)
        self.optimizers = optim.run_optimizers(
            self.model, cfg, lr_epochs=self.schedule.lr_epochs(), given=optimizers
        )
        self.state = RunState(self.schedule)
        if saved is not None:
            self.state.load(
                saved,
                model=self.model,
                optimizers=self.optimizers,
                cfg=cfg,
                classes=self.classes,
                where=str(self.last),
            )
        self.tb: TensorBoard | None = None
        self.started = False

    def start(self) -> None:
        """What :meth:`fit` does first (once): join the process group, lock and set up the run folder (rank 0)
        and, for a new run, write its first ``last.pt`` (a run killed before its first epoch ends resumes
        too)."""
        if self.started:
            return
        self.started = True
        distributed.init(self.dist, self.device)
        problem = None
        if self.main:  # rank 0 holds the lock; every rank stops alike when it cannot
            try:
                self.run.start(
                    self.cfg,
                    resume=self.state.resumed,
                    log_bytes=self.state.log_bytes,
                    overwrite=self.overwrite,
                )
            except RunFolderError as e:
                problem = str(e)
        problem = distributed.broadcast_object(problem, self.dist)
        if problem:
            self.started = False
            raise RunFolderError(problem)
        if not self.state.resumed:
            self._save_last()
            if self.main:
                self.run.first_checkpoint_written()
        if self.cfg.train.tensorboard and self.main:
            self.tb = TensorBoard(self.run.tensorboard, purge_step=self.state.saved_epoch + 1)

    def _save_last(self) -> None:
        if self.main:
            self.run.save_state(self.state.checkpoint(self.model, self.cfg, self.classes, self.optimizers))
        self.state.saved_epoch = self.schedule.epoch

    def _log(self, record: dict[str, Any]) -> None:
        if self.main:
            self.state.log_bytes = self.run.log(record)

    def _watch(self, where: str) -> NonFiniteWatch:
        saved = self.state.saved_epoch
        kept = (
            f"{self.last} keeps the last good state ({f'epoch {saved}' if saved else 'the start of the run'})"
        )
        return NonFiniteWatch(self.device, self.dist, self.cfg.train.log_every, where, kept)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the training loader's workers, flush TensorBoard, release the run folder's lock and leave the
        process group (``with racnn.Trainer(...) as trainer:`` does it at the end of the block)."""
        self._loader = None
        if self.tb is not None:
            self.tb.close()
        self.run.unlock()
        distributed.close(self.dist)

    # ---------------------------------------------------------------- data
    def _images(self, phase: Phase) -> str:
        """Which training images ``phase`` reads now (:func:`racnn.training.loaders.share_positions`): with
        ``apn.attend_holdout`` its own share, the classifiers' becoming every image once the budget's last
        attention epoch has run; else every image."""
        if self.cfg.apn.attend_holdout == 0 or (
            phase.images == "fitted" and not self.schedule.attention_ahead()
        ):
            return "all"
        return phase.images

    def _train_loader(self, epoch: int, images: str = "all") -> loaders.Loader:
        """The one training loader (its workers started at the first call), reading the share ``images``
        (:func:`racnn.training.loaders.share_positions`) in epoch ``epoch``'s order."""
        if self._loader is None:
            self._loader = loaders.make_loader(
                self.train_set, self.cfg, train=True, world_size=self.dist.world_size, rank=self.dist.rank
            )
        self._loader.sampler.select(loaders.share_positions(self.train_set, self.cfg, images))
        self._loader.sampler.set_epoch(epoch)  # same order after a resume
        return self._loader

    def _batches(self, loader: Any, desc: str, limit: int | None) -> Iterator[tuple[Any, Any]]:
        total = min(len(loader), limit) if limit else len(loader)
        bar = tqdm(loader, desc=desc, total=total, leave=False, disable=not self.progress, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if limit and i >= limit:
                break
            yield bar, batch

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = runtime.place_batch(batch["image"], self.device, channels_last=self.cfg.runtime.channels_last)
        return x, batch["label"].to(self.device, non_blocking=True)

    def _step(
        self, phase: Phase, forward: Any, batch: dict[str, Any], anchor: torch.nn.ModuleList | None = None
    ) -> tuple[dict[str, torch.Tensor], Any, torch.Tensor]:
        x, y = self._inputs(batch)
        autocast = runtime.autocast(self.device, self.cfg.runtime.amp)
        opts = self.optimizers.stepped_by(phase)
        terms, out = train_step(
            self.model, forward, x, y, phase, self.cfg, opts, autocast=autocast, anchor=anchor
        )
        return terms, out, x

    # ---------------------------------------------------------------- phases
    def train_steps(self, phase: Phase) -> None:
        """A phase of fixed steps (``phase.steps``: the APN initialisation, Sec. 3.4 step 2), over as many
        passes of the training data as it takes; logged as epoch 0 with the phase's ``probe``."""
        self.start()
        steps = phase.steps(self.cfg) if phase.steps is not None else 0
        if steps > 0:
            set_phase(self.model, phase, self.cfg)
            forward = self.forward_model()  # after set_phase: DDP covers what this phase trains
            done, rounds = 0, 0
            loss_sum = torch.zeros((), device=self.device)
            watch = self._watch(phase.title)
            bar = tqdm(
                total=steps, desc=phase.title, leave=False, disable=not self.progress, dynamic_ncols=True
            )
            while done < steps:
                for batch in self._train_loader(10_000 + rounds, self._images(phase)):
                    terms, _, x = self._step(phase, forward, batch)
                    done += 1
                    loss_sum += terms["loss"].detach()
                    watch.mark(terms["loss"], done)
                    bar.update()
                    if done % self.cfg.train.log_every == 0 or done >= steps:
                        bar.set_postfix(loss=f"{float(loss_sum) / done:.4f}")
                    if done >= steps:
                        watch.check()
                        break
                rounds += 1
            bar.close()
            mean = float(distributed.all_reduce_sum(loss_sum, self.dist)) / (done * self.dist.world_size)
            rec = {"phase": phase.name, "epoch": 0, "steps": done, "loss": mean}
            self._log(rec | (phase.probe(self.model, x) if phase.probe is not None else {}))
            if phase.initial_apns:
                self.state.apn_init = {k: v.detach().clone() for k, v in self.model.apns.state_dict().items()}
        self.schedule.end_steps(phase)
        self._save_last()

    def train_epoch(self, phase: Phase) -> dict[str, float]:
        """One epoch of ``phase``: every step through :func:`racnn.training.step.train_step`; returns the
        epoch's record (loss terms, training accuracy, speed)."""
        self.start()
        cfg, model = self.cfg, self.model
        set_phase(model, phase, cfg)
        forward = self.forward_model()  # after set_phase: DDP covers what this phase trains
        acc = Accumulator(model.cfg.num_scales)
        sums: dict[str, torch.Tensor] = {}
        steps, seen, t0 = 0, 0, time.perf_counter()
        epoch = self.schedule.epoch + 1
        watch = self._watch(f"epoch {epoch} ({phase.name})")
        images = self._images(phase)
        loader = self._train_loader(epoch, images)
        bad_before = loader.bad_images
        desc = f"epoch {epoch}/{cfg.train.epochs} {phase.name}"
        # a resumed run restarts the epoch from the checkpoint at its start, so the anchor is the same
        anchor = epoch_anchor(model) if phase.anchor(cfg) else None
        for bar, batch in self._batches(loader, desc, cfg.schedule.max_steps_per_epoch):
            terms, out, _ = self._step(phase, forward, batch, anchor)
            # running sums and the non-finite flag stay on the device (read every log_every steps on GPUs)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            acc.update(
                {k: v.detach() for k, v in out.logits.items()},
                [b.detach() for b in out.boxes],
                [v.detach() for v in out.views],
                batch,
            )
            steps += 1
            seen += batch["label"].numel()
            watch.mark(terms["loss"], steps)
            if steps % cfg.train.log_every == 0:
                bar.set_postfix(
                    loss=f"{float(sums['loss']) / steps:.3f}",
                    acc=f"{acc.correct[model.scale_keys[0]] / acc.n:.2f}",
                    ips=f"{seen / (time.perf_counter() - t0):.1f}",
                )
        watch.check()
        bad = loader.bad_images - bad_before if cfg.data.skip_bad_images else None
        rec = epoch_record(sums, acc, steps, seen, time.perf_counter() - t0, bad, self.dist)
        return rec | ({"images": images} if cfg.apn.attend_holdout else {})

    def _evaluate(self, model: RACNN, dataset: Any, desc: str, **kw: Any) -> dict[str, float]:
        kw |= {"device": self.device, "desc": desc, "progress": self.progress}
        return evaluate_split(model, dataset, self.cfg, self.dist, **kw)

    def evaluate_boxes(self, model: RACNN, dataset: Any, desc: str) -> dict[str, float]:
        """``model``'s metrics on ``dataset`` and, where the run kept the APNs' state after their
        initialisation, the same with those APNs as ``*_init``: what the attention phases added, under the
        same classifiers."""
        metrics = self._evaluate(model, dataset, desc)
        if self.state.apn_init is not None:
            with initial_apns(model, self.state.apn_init):
                init = self._evaluate(model, dataset, f"{desc}, initial boxes")
            metrics |= {f"{k}_init": v for k, v in init.items() if k != "num_images"}
        return metrics

    def validate(self) -> dict[str, float]:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        # the weighted fusion is fitted on these held-out predictions (its figure here is cross-fitted)
        return self._evaluate(
            self.model,
            self.val_set,
            "validate",
            channels_last=self.cfg.runtime.channels_last,
            fit_fusion=True,
        )

    def _picture_data(self) -> Any:
        """Images of the TensorBoard attention picture: validation, else training without augmentation (only
        when the config builds the data: a training set of the user's own is augmented)."""
        if self.val_set is not None and len(self.val_set):
            return self.val_set
        if self.cfg.data.root is None and self.cfg.data.name != "synthetic":
            return None
        return loaders.make_dataset(self.cfg, "train", self.model.preprocessing, train=False)

    # ---------------------------------------------------------------- run
    @runtime.sturdy_ctrl_c()
    def fit(self) -> dict[str, float]:
        """Train to the end of the schedule (continuing a resumed run), then evaluate ``best.pt`` on test."""
        self.start()
        while (phase := self.schedule.next_phase()) is not None:
            runtime.raise_if_interrupted()
            if phase.steps is not None:
                self.train_steps(phase)
            else:
                self._epoch(phase)
        if self.schedule.stopped:
            self._log({"event": "stopped", "reason": self.schedule.stopped, "epoch": self.schedule.epoch})
        return self.test()

    def _epoch(self, phase: Phase) -> None:
        """An epoch of ``phase`` and what follows it: the learning-rate schedule (where the phase steps it),
        validation, model selection, the log, ``last.pt`` and TensorBoard."""
        fused, state = self.model.keys[-1], self.state
        self.schedule.start_epoch(phase)
        rec = self.train_epoch(phase)
        if phase.lr_step:
            rec["lr"] = self.optimizers.cls.param_groups[-1]["lr"]
            self.optimizers.cls_lr.step()
        self.schedule.end_epoch(rec["loss"])
        epoch = self.schedule.epoch
        validating = epoch % self.cfg.train.eval_every == 0 or self.schedule.next_phase() is None
        val = self.validate() if validating else {}
        rec = {"epoch": epoch, "phase": phase.name, **rec, **{f"val_{k}": v for k, v in val.items()}}
        # model selection on validation only; without a validation split, on training accuracy;
        # train.select=last keeps every epoch over the one before
        score = val.get(f"acc_{fused}", -math.inf) if self.val_set else rec[f"train_acc_{fused}"]
        if score > state.best or self.cfg.train.select == "last":
            state.best, state.best_epoch = score, epoch
            if self.main:
                self.run.save_model(model_record(self.model, self.cfg, self.classes))
        rec["best_epoch"] = state.best_epoch
        self._log(rec)
        self._save_last()
        if self.tb is not None:
            self.tb.scalars(rec, epoch)
            if validating:
                self.tb.attention(self.model, self._picture_data, self.classes, epoch, self.device)
        if self.progress:
            tqdm.write(epoch_line(rec, fused))

    def test(self) -> dict[str, float]:
        """Evaluate the selected model (``best.pt``) on the test split; writes ``metrics.json``."""
        self.start()
        distributed.barrier(self.dist)  # rank 0 has written best.pt
        best = self.run.best
        model = place_model(load_model(best), self.device) if best.is_file() else self.model
        test_set = self.test_set
        if test_set is None:
            test_set = loaders.make_dataset(
                self.cfg, "test", model.preprocessing, train=False, classes=self.classes
            )
        metrics = self.evaluate_boxes(model, test_set, "test")
        metrics = {**metrics, "best_epoch": self.state.best_epoch, "split": "test"}
        if self.main:
            self.run.write_test(metrics)
        if self.tb is not None:
            self.tb.scalars(metrics, self.schedule.epoch, group="test")
        if self.progress:
            tqdm.write(format_table(metrics, title=f"RA-CNN test ({len(test_set)} images)"))
        return metrics


def _check_holdout(cfg: Config, schedule: PhaseSchedule, train_set: Dataset, val_set: Dataset | None) -> None:
    """``apn.attend_holdout`` is refused where the classifiers would never train on the held-out images (a
    budget that ends on an attention epoch) or where model selection would compare training accuracy on
    other images from epoch to epoch (no validation split); the split itself is checked here, before the
    run folder is touched."""
    last = schedule.last_attention_epoch()
    if last >= cfg.train.epochs - 1:
        raise ConfigError(
            f"apn.attend_holdout: the budget of {cfg.train.epochs} epochs ends on an attention epoch, so the "
            "classifiers would never train on the held-out images; end it on classification epochs "
            f"(train.epochs={cfg.train.epochs + cfg.schedule.classify_epochs}, say)"
        )
    if cfg.data.skip_bad_images:
        raise ConfigError(
            "apn.attend_holdout with data.skip_bad_images: an unreadable image's stand-in may come from the "
            "other share; remove or fix the unreadable images (racnn train without --skip-bad-images names them)"
        )
    if val_set is None and cfg.train.select == "val":
        raise ConfigError(
            "apn.attend_holdout without a validation split: the model kept would be chosen on training "
            "accuracy, measured on other images epoch to epoch; set data.val_fraction > 0 or train.select=last"
        )
    loaders.holdout_split(train_set, cfg.apn.attend_holdout, cfg.train.seed)


def _classes(dataset: Dataset, model: RACNN | None) -> list[str]:
    """The class names of a run: the training set's ``classes``, else the model's."""
    names = getattr(dataset, "classes", None) or (model.classes if model is not None else None)
    if not names:
        raise ValueError(
            "the training set has no 'classes' (a list of class names) and the model none either"
        )
    return list(names)
