"""The training loop: APN initialisation, epochs of the alternating (or joint) schedule, validation,
checkpoints and the final test; one process or N under ``torchrun`` (see :mod:`racnn.training.distributed`).

Output folder (rank 0 writes): ``config.yaml``, ``last.pt`` (resumable state, at the start and after every
epoch), ``best.pt`` (best validation accuracy of the full fusion), ``metrics.jsonl`` (one line per epoch),
``metrics.json`` (test), ``tb/`` (TensorBoard, when installed).

Faults: a run killed at any moment resumes from ``last.pt`` (written atomically; ``metrics.jsonl`` is cut back
to what that state had logged), exactly in deterministic mode. Ctrl-C drops the unfinished epoch (``last.pt``
holds the last finished one). A non-finite loss raises :class:`FloatingPointError` naming epoch and step
(a device-side flag checked every ``train.log_every`` steps: no host sync per step); ``last.pt`` stays good.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones import backbone_preprocessing, check_weights
from ..config import Config, save_config
from ..evaluation import Accumulator, autocast_dtype, epoch_line, format_table, json_safe
from ..localization import aolm_boxes
from ..losses import (
    box_regression_loss,
    classification_losses,
    rank_ceiling,
    ranking_hinges,
    total_classification,
    true_class_prob,
)
from ..model import RACNN, build_model
from . import distributed, setup
from .apn_init import apn_init_target, apn_saturation
from .checkpoint import TRAIN_FORMAT, CheckpointError, load_checkpoint, model_record, save_checkpoint
from .schedule import (
    ATTEND,
    CLASSIFY,
    JOINT,
    WARMUP,
    PhaseSchedule,
    set_phase,
    trainable,
)


class Trainer:
    """One training run in ``out_dir``; ``resume`` continues it from ``last.pt`` with the config saved there
    (``skip_bad_images`` may still be switched on). Under torchrun every process builds one."""

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
        skip_bad_images: bool = False,
    ):
        self.dist = distributed.env_from_os()
        self.main = self.dist.main
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress and self.main
        self.last = self.out / "last.pt"
        self.out.mkdir(parents=True, exist_ok=True)
        state = None
        if resume:
            state = load_checkpoint(self.last)
            if state.get("format") != TRAIN_FORMAT:
                raise CheckpointError(f"{self.last}: not a training state (resume needs a last.pt)")
            self.cfg = cfg = Config.from_dict(state["config"], source=str(self.last))
        cfg.data.skip_bad_images = cfg.data.skip_bad_images or skip_bad_images
        setup.seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.device = distributed.device_for(setup.resolve_device(cfg.train.device), self.dist)
        setup.per_rank_batch(cfg, self.dist.world_size)  # the global batch must split evenly
        distributed.init(self.dist, self.device)
        # the model first: the data pipeline reads its normalisation
        if state is None:
            check_weights(
                cfg.model.backbone, pretrained=cfg.model.pretrained, weights_file=cfg.model.weights_file
            )
        prep = backbone_preprocessing(cfg.model.backbone)
        self.train_set = setup.make_dataset(cfg, "train", prep, train=True)
        self.val_set = (
            setup.make_dataset(cfg, "val", prep, train=False) if cfg.data.val_fraction > 0 else None
        )
        self._loader: setup.Loader | None = None
        self.classes: list[str] = list(self.train_set.classes)
        model = build_model(
            cfg.model, num_classes=len(self.classes), pretrained=cfg.model.pretrained and state is None
        ).to(self.device)
        # raw module: parameter groups, state dicts, evaluation; `self.forward_model()`: what a step calls
        self.model: RACNN = distributed.sync_batchnorm(model, self.device, self.dist)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward_model = distributed.PhaseDDP(self.model, self.device, self.dist)
        self.cls_opt, self.apn_opt = setup.make_optimizers(self.model, cfg.optim)
        self.schedule = PhaseSchedule(cfg.schedule, cfg.train.epochs)
        cls_epochs = self.schedule.planned_epochs(WARMUP) + self.schedule.planned_epochs(
            JOINT if cfg.schedule.mode == JOINT else CLASSIFY
        )
        self.cls_sched = setup.make_scheduler(self.cls_opt, cfg.optim, cls_epochs)
        self.apn_init_done, self.best, self.best_epoch = False, -math.inf, -1
        self.log_bytes, self.saved_epoch = 0, 0  # metrics.jsonl's size and the epochs done, in last.pt
        if self.main:
            setup.remove_stray_tmp(self.out)
        if state is not None:
            self._load_state(state)
        elif self.main:
            save_config(cfg, self.out / "config.yaml")
            (self.out / "metrics.jsonl").write_text("")
        if state is None:
            self._save_last()  # a run killed before its first epoch ends resumes too
        use_tb = cfg.train.tensorboard and self.main
        self.tb = setup.TensorBoard(self.out / "tb", purge_step=self.saved_epoch + 1) if use_tb else None

    # ---------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return {
            **model_record(self.model, self.cfg, self.classes),
            "format": TRAIN_FORMAT,
            "optimizers": {"cls": self.cls_opt.state_dict(), "apn": self.apn_opt.state_dict()},
            "schedulers": {"cls": self.cls_sched.state_dict()},
            "progress": {
                "schedule": self.schedule.state_dict(),
                "apn_init_done": self.apn_init_done,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "log_bytes": self.log_bytes,
            },
            "rng": setup.rng_state(),
        }

    def _load_state(self, s: dict[str, Any]) -> None:
        saved = list(s.get("classes", self.classes))
        if saved != self.classes:
            raise CheckpointError(
                f"{self.last}: saved for {len(saved)} classes, but {self.cfg.data.root} now has "
                f"{len(self.classes)} (or other names); resume with the dataset the run started with"
            )
        try:
            self.model.load_state_dict(s["model"])
            self.cls_opt.load_state_dict(setup.keep_fused(self.cls_opt, s["optimizers"]["cls"]))
            self.apn_opt.load_state_dict(setup.keep_fused(self.apn_opt, s["optimizers"]["apn"]))
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = f"a {self.cfg.model.backbone} RA-CNN with {len(self.classes)} classes"
            raise CheckpointError(f"{self.last}: does not fit {what} ({first[:200]})") from e
        self.cls_sched.load_state_dict(s["schedulers"]["cls"])
        p = s["progress"]
        self.schedule.load_state_dict(p["schedule"])
        self.apn_init_done, self.best, self.best_epoch = p["apn_init_done"], p["best"], p["best_epoch"]
        self.saved_epoch = self.schedule.epoch
        self.log_bytes = p.get("log_bytes", -1)
        if self.main:  # drop the lines of an epoch that a kill kept out of last.pt
            setup.trim_file(self.out / "metrics.jsonl", self.log_bytes)
        setup.set_rng_state(s["rng"])

    def _save_last(self) -> None:
        if self.main:
            save_checkpoint(self._state(), self.last)
        self.saved_epoch = self.schedule.epoch

    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
            self.log_bytes = f.tell()

    def _watch(self, where: str) -> distributed.NonFiniteWatch:
        kept = f"epoch {self.saved_epoch}" if self.saved_epoch else "the start of the run"
        kept = f"{self.last} keeps the last good state ({kept})"
        return distributed.NonFiniteWatch(self.device, self.dist, self.cfg.train.log_every, where, kept)

    def close(self) -> None:
        """Stop the training loader's workers, flush TensorBoard and leave the process group."""
        self._loader = None
        if self.tb is not None:
            self.tb.close()
        distributed.close(self.dist)

    # ---------------------------------------------------------------- data
    def _train_loader(self, epoch: int) -> setup.Loader:
        if self._loader is None:
            self._loader = setup.make_loader(
                self.train_set, self.cfg, train=True, world_size=self.dist.world_size, rank=self.dist.rank
            )
        self._loader.sampler.set_epoch(epoch)  # same order after a resume
        return self._loader

    def _batches(self, loader: Any, desc: str) -> Any:
        limit = self.cfg.schedule.max_steps_per_epoch
        total = min(len(loader), limit) if limit else len(loader)
        bar = tqdm(loader, desc=desc, total=total, leave=False, disable=not self.progress, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if limit and i >= limit:
                break
            yield bar, batch

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, batch["label"].to(self.device, non_blocking=True)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=autocast_dtype(self.device), enabled=self.cfg.train.amp)

    # ---------------------------------------------------------------- phases
    def init_apns(self) -> None:
        """Sec. 3.4 step 2: regress every APN towards a square on its scale's strongest conv response."""
        steps = self.cfg.schedule.apn_init_steps
        if steps > 0 and self.cfg.model.num_scales > 1:
            set_phase(self.model, "apn_init")
            forward = self.forward_model()
            apn = self.model.parameter_groups()["apn"]
            opt = torch.optim.Adam(apn, lr=self.cfg.schedule.apn_init_lr, fused=setup.fused_ok(apn))
            done, epoch = 0, 0
            loss_sum = torch.zeros((), device=self.device)
            watch = self._watch("APN initialisation")
            bar = tqdm(
                total=steps, desc="apn init", leave=False, disable=not self.progress, dynamic_ncols=True
            )
            while done < steps:
                loader = self._train_loader(10_000 + epoch)
                for batch in loader:
                    x, y = self._inputs(batch)
                    with self._autocast():
                        # each APN regresses towards its own scale's target only: crops cut with detached
                        # boxes, so scale 2's term cannot move APN 1
                        out = forward(x, detach_crops=True, return_maps=True)
                    loss = sum(
                        box_regression_loss(box.float(), apn_init_target(self.model, self.cfg, s, fmap, y))
                        for s, (box, fmap) in enumerate(zip(out.boxes, out.maps, strict=False))
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    done += 1
                    loss_sum += loss.detach()
                    watch.mark(loss, done)
                    bar.update()
                    if done % self.cfg.train.log_every == 0 or done >= steps:
                        bar.set_postfix(loss=f"{float(loss_sum) / done:.4f}")
                    if done >= steps:
                        watch.check()
                        break
                epoch += 1
            bar.close()
            mean = float(distributed.all_reduce_sum(loss_sum, self.dist)) / (done * self.dist.world_size)
            rec = {"phase": "apn_init", "epoch": 0, "steps": done, "loss": mean}
            self._log(rec | apn_saturation(self.model, x))
        self.apn_init_done = True
        self._save_last()

    def train_epoch(self, phase: str) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        set_phase(model, phase, backbones=phase != WARMUP or cfg.schedule.warmup_backbones)
        forward = self.forward_model()  # after set_phase: DDP covers what this phase trains
        params = trainable(list(model.parameters()))
        n_scales, sch = cfg.model.num_scales, cfg.schedule
        box_min, box_max = cfg.model.box_min_side, cfg.model.box_max_side
        prior = sch.prior_weight > 0 and phase in (ATTEND, JOINT) and n_scales > 1
        ceiling = (
            rank_ceiling(cfg.optim.label_smoothing, len(self.classes), sch.rank_margin)
            if sch.rank_quiet
            else None
        )
        acc = Accumulator()
        sums: dict[str, torch.Tensor] = {}
        steps, seen, t0 = 0, 0, time.perf_counter()
        epoch = self.schedule.epoch + 1
        watch = self._watch(f"epoch {epoch} ({phase})")
        loader = self._train_loader(epoch)
        bad_before = loader.bad_images
        for bar, batch in self._batches(loader, f"epoch {epoch}/{cfg.train.epochs} {phase}"):
            x, y = self._inputs(batch)
            with self._autocast():
                out = forward(x, detach_boxes=phase in (CLASSIFY, WARMUP), return_maps=prior)
            terms = classification_losses(out.trained_logits, y, label_smoothing=cfg.optim.label_smoothing)
            cls = total_classification(terms, num_scales=n_scales, fusion_weight=cfg.schedule.fusion_weight)
            probs = [true_class_prob(out.logits[f"s{i + 1}"], y) for i in range(n_scales)]
            hinges = ranking_hinges(
                probs, sch.rank_margin, detach_coarse=sch.rank_detach_coarse, ceiling=ceiling
            )
            rank = sum((h.mean() for h in hinges), cls.new_zeros(()))
            extra = (
                {"rank_active": sum((h > 0).float().mean() for h in hinges) / len(hinges)} if hinges else {}
            )
            if prior:  # the scale-1 box stays near the object that scale 1's own map shows
                box_1 = out.boxes[0].float()
                extra["prior"] = box_regression_loss(box_1, aolm_boxes(out.maps[0], box_min, box_max))
                rank = rank + sch.prior_weight * extra["prior"]
            # warm-up and classification: L_cls only, APNs fixed; attention: L_rank only, classifiers fixed
            loss = {ATTEND: rank, JOINT: cls + sch.rank_weight * rank}.get(phase, cls)
            opts = {ATTEND: [self.apn_opt], JOINT: [self.cls_opt, self.apn_opt]}.get(phase, [self.cls_opt])
            for o in opts:
                o.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                for o in opts:
                    o.step()
            # running sums and the non-finite flag stay on the device (read every log_every steps on GPUs)
            for k, v in {"loss": loss, "cls": cls, "rank": rank, **extra, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            acc.update(
                {k: v.detach() for k, v in out.logits.items()},
                [b.detach() for b in out.boxes],
                batch,
                views=[v.detach() for v in out.views],
            )
            steps += 1
            seen += y.numel()
            watch.mark(loss, steps)
            if steps % cfg.train.log_every == 0:
                bar.set_postfix(
                    loss=f"{float(sums['loss']) / steps:.3f}",
                    acc=f"{acc.correct['s1'] / acc.n:.2f}",
                    ips=f"{seen / (time.perf_counter() - t0):.1f}",
                )
        watch.check()
        bad = loader.bad_images - bad_before if cfg.data.skip_bad_images else None
        return distributed.epoch_record(sums, acc, steps, seen, time.perf_counter() - t0, bad, self.dist)

    def _evaluate(self, model: RACNN, dataset: Any, desc: str, **kw: Any) -> dict[str, float]:
        kw |= {"device": self.device, "desc": desc, "progress": self.progress}
        return distributed.evaluate_split(model, dataset, self.cfg, self.dist, **kw)

    def validate(self) -> dict[str, float]:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        # the weighted fusion is fitted on these held-out predictions (its figure here is cross-fitted)
        return self._evaluate(
            self.model,
            self.val_set,
            "validate",
            channels_last=self.cfg.train.channels_last,
            fit_fusion=True,
        )

    def _picture_data(self) -> Any:
        """Images of the TensorBoard attention picture: validation, else training without augmentation."""
        if self.val_set is not None and len(self.val_set):
            return self.val_set
        return setup.make_dataset(self.cfg, "train", self.model.preprocessing, train=False)

    # ---------------------------------------------------------------- run
    @setup.sturdy_ctrl_c()
    def fit(self) -> dict[str, float]:
        """Train to the end of the schedule (continuing a resumed run), then evaluate ``best.pt`` on test."""
        fused = self.model.keys[-1]
        while (phase := self.schedule.next_phase()) is not None:
            setup.raise_if_interrupted()
            if phase != WARMUP and not self.apn_init_done:
                self.init_apns()
            self.schedule.start_epoch(phase)
            rec = self.train_epoch(phase)
            if phase in (CLASSIFY, JOINT, WARMUP):
                rec["lr"] = self.cls_opt.param_groups[-1]["lr"]
                self.cls_sched.step()
            self.schedule.end_epoch(rec["loss"])
            epoch = self.schedule.epoch
            validating = epoch % self.cfg.train.eval_every == 0 or self.schedule.next_phase() is None
            val = self.validate() if validating else {}
            rec = {"epoch": epoch, "phase": phase, **rec, **{f"val_{k}": v for k, v in val.items()}}
            # model selection on validation only; without a validation split, on training accuracy;
            # train.select=last keeps every epoch over the one before
            score = val.get(f"acc_{fused}", -math.inf) if self.val_set else rec[f"train_acc_{fused}"]
            if score > self.best or self.cfg.train.select == "last":
                self.best, self.best_epoch = score, epoch
                if self.main:
                    save_checkpoint(model_record(self.model, self.cfg, self.classes), self.out / "best.pt")
            rec["best_epoch"] = self.best_epoch
            self._log(rec)
            self._save_last()
            if self.tb is not None:
                self.tb.scalars(rec, epoch)
                if validating:
                    self.tb.attention(self.model, self._picture_data, self.classes, epoch, self.device)
            if self.progress:
                tqdm.write(epoch_line(rec, fused))
        if self.schedule.stopped:
            self._log({"event": "stopped", "reason": self.schedule.stopped, "epoch": self.schedule.epoch})
        return self.test()

    def test(self) -> dict[str, float]:
        from .checkpoint import load_model

        best = self.out / "best.pt"
        distributed.barrier(self.dist)  # rank 0 has written best.pt
        model = load_model(best)[0].to(self.device) if best.is_file() else self.model
        prep = model.preprocessing
        test_set = setup.make_dataset(self.cfg, "test", prep, train=False, classes=self.classes)
        metrics = self._evaluate(model, test_set, "test")
        metrics = {**metrics, "best_epoch": self.best_epoch, "split": "test"}
        if self.main:
            (self.out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
        if self.tb is not None:
            self.tb.scalars(metrics, self.schedule.epoch, group="test")
        if self.progress:
            tqdm.write(format_table(metrics, title=f"RA-CNN test ({len(test_set)} images)"))
        return metrics
