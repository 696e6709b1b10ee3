"""The training loop: APN initialisation, then epochs of the alternating (or joint) schedule, validation,
checkpoints (atomic, resumable) and the final test evaluation.

Output folder: ``config.yaml`` (resolved), ``last.pt`` (resumable state), ``best.pt`` (best validation
accuracy of the full fusion), ``metrics.jsonl`` (one line per epoch), ``metrics.json`` (test evaluation).
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
from ..evaluation import Accumulator, autocast_dtype, evaluate, format_table, json_safe
from ..losses import (
    box_regression_loss,
    classification_losses,
    ranking_loss,
    total_classification,
    true_class_prob,
)
from ..model import RACNN, build_model
from . import setup
from .checkpoint import TRAIN_FORMAT, CheckpointError, load_checkpoint, model_record, save_checkpoint
from .schedule import (
    ATTEND,
    CLASSIFY,
    JOINT,
    WARMUP,
    PhaseSchedule,
    class_activation,
    peak_response_boxes,
    set_phase,
    trainable,
)


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path, *, resume: bool = False, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        self.out.mkdir(parents=True, exist_ok=True)
        state = None
        if resume:
            state = load_checkpoint(self.out / "last.pt")
            if state.get("format") != TRAIN_FORMAT:
                raise CheckpointError(f"{self.out / 'last.pt'}: not a training state")
            self.cfg = cfg = Config.from_dict(state["config"], source=str(self.out / "last.pt"))
        setup.seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.device = setup.resolve_device(cfg.train.device)
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
        self._loader: torch.utils.data.DataLoader | None = None
        self.classes: list[str] = list(self.train_set.classes)
        self.model: RACNN = build_model(
            cfg.model, num_classes=len(self.classes), pretrained=cfg.model.pretrained and state is None
        ).to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.cls_opt, self.apn_opt = setup.make_optimizers(self.model, cfg.optim)
        self.schedule = PhaseSchedule(cfg.schedule, cfg.train.epochs)
        cls_epochs = self.schedule.planned_epochs(WARMUP) + self.schedule.planned_epochs(
            JOINT if cfg.schedule.mode == JOINT else CLASSIFY
        )
        self.cls_sched = setup.make_scheduler(self.cls_opt, cfg.optim, cls_epochs)
        self.apn_init_done = False
        self.best = -math.inf
        self.best_epoch = -1
        if state is not None:
            self._load_state(state)
        else:
            save_config(cfg, self.out / "config.yaml")
            (self.out / "metrics.jsonl").write_text("")

    # ---------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
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
            },
            "rng": rng,
        }

    def _load_state(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.cls_opt.load_state_dict(s["optimizers"]["cls"])
        self.apn_opt.load_state_dict(s["optimizers"]["apn"])
        self.cls_sched.load_state_dict(s["schedulers"]["cls"])
        p = s["progress"]
        self.schedule.load_state_dict(p["schedule"])
        self.apn_init_done, self.best, self.best_epoch = p["apn_init_done"], p["best"], p["best_epoch"]
        torch.set_rng_state(s["rng"]["torch"])
        if "cuda" in s["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng"]["cuda"])

    def _save_last(self) -> None:
        save_checkpoint(self._state(), self.out / "last.pt")

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")

    # ---------------------------------------------------------------- data
    def _train_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        if self._loader is None:
            self._loader = setup.make_loader(self.train_set, self.cfg, train=True)
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
            side = self.cfg.schedule.apn_init_side
            opt = torch.optim.Adam(self.model.parameter_groups()["apn"], lr=self.cfg.schedule.apn_init_lr)
            done, epoch, loss_sum = 0, 0, 0.0
            bar = tqdm(
                total=steps, desc="apn init", leave=False, disable=not self.progress, dynamic_ncols=True
            )
            while done < steps:
                for batch in self._train_loader(10_000 + epoch):
                    x, y = self._inputs(batch)
                    with self._autocast():
                        out = self.model(x, return_maps=True)
                    loss = sum(
                        box_regression_loss(
                            box.float(), peak_response_boxes(self._response(s, fmap, y), side)
                        )
                        for s, (box, fmap) in enumerate(zip(out.boxes, out.maps, strict=False))
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += float(loss.detach())
                    done += 1
                    bar.update()
                    bar.set_postfix(loss=f"{loss_sum / done:.4f}")
                    if done >= steps:
                        break
                epoch += 1
            bar.close()
            self._log({"phase": "apn_init", "epoch": 0, "steps": done, "loss": loss_sum / max(done, 1)})
        self.apn_init_done = True
        self._save_last()

    def _response(self, s: int, fmap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What the APN of scale ``s`` is initialised towards: the last conv layer's response (B x C' x h x w)."""
        fmap = fmap.detach().float()
        if self.cfg.schedule.apn_init_response == "cam":
            return class_activation(fmap, self.model.heads[s], target)
        return fmap

    def train_epoch(self, phase: str) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        set_phase(model, phase)
        params = trainable(list(model.parameters()))
        n_scales = cfg.model.num_scales
        acc = Accumulator()
        sums: dict[str, float] = {}
        steps, seen, t0 = 0, 0, time.perf_counter()
        epoch = self.schedule.epoch + 1
        for bar, batch in self._batches(
            self._train_loader(epoch), f"epoch {epoch}/{cfg.train.epochs} {phase}"
        ):
            x, y = self._inputs(batch)
            with self._autocast():
                out = model(x, detach_boxes=phase in (CLASSIFY, WARMUP))
            terms = classification_losses(out.logits, y, label_smoothing=cfg.optim.label_smoothing)
            cls = total_classification(terms, num_scales=n_scales, fusion_weight=cfg.schedule.fusion_weight)
            probs = [true_class_prob(out.logits[f"s{i + 1}"], y) for i in range(n_scales)]
            rank = (
                ranking_loss(probs, cfg.schedule.rank_margin, detach_coarse=cfg.schedule.rank_detach_coarse)
                if n_scales > 1
                else cls.new_zeros(())
            )
            # warm-up and classification: L_cls only, APNs fixed; attention: L_rank only, classifiers fixed
            loss = {ATTEND: rank, JOINT: cls + cfg.schedule.rank_weight * rank}.get(phase, cls)
            opts = {ATTEND: [self.apn_opt], JOINT: [self.cls_opt, self.apn_opt]}.get(phase, [self.cls_opt])
            for o in opts:
                o.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                for o in opts:
                    o.step()
            # running sums stay on the device: no host sync per step
            for k, v in {"loss": loss, "cls": cls, "rank": rank, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            acc.update({k: v.detach() for k, v in out.logits.items()}, [b.detach() for b in out.boxes], batch)
            steps += 1
            seen += y.numel()
            if steps % cfg.train.log_every == 0:
                bar.set_postfix(
                    loss=f"{float(sums['loss']) / steps:.3f}",
                    acc=f"{acc.correct['s1'] / acc.n:.2f}",
                    ips=f"{seen / (time.perf_counter() - t0):.1f}",
                )
        dt = time.perf_counter() - t0
        rec = {k: float(v) / max(steps, 1) for k, v in sums.items()}
        summary = acc.summary()
        rec.update({f"train_{k}": v for k, v in summary.items() if k.startswith(("acc_", "box_side"))})
        rec.update({"steps": steps, "time_s": round(dt, 2), "images_per_s": round(seen / max(dt, 1e-9), 2)})
        return rec

    def validate(self) -> dict[str, float]:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        loader = setup.make_loader(self.val_set, self.cfg)
        return evaluate(
            self.model,
            loader,
            device=self.device,
            amp=self.cfg.train.amp,
            head_parts=getattr(self.val_set, "head_parts", None),
            channels_last=self.cfg.train.channels_last,
            desc="validate",
            progress=self.progress,
        )

    # ---------------------------------------------------------------- run
    def fit(self) -> dict[str, float]:
        """Train to the end of the schedule (continuing a resumed run), then evaluate ``best.pt`` on test."""
        fused = self.model.keys[-1]
        while (phase := self.schedule.next_phase()) is not None:
            if phase != WARMUP and not self.apn_init_done:
                self.init_apns()
            self.schedule.start_epoch(phase)
            rec = self.train_epoch(phase)
            if phase in (CLASSIFY, JOINT, WARMUP):
                rec["lr"] = self.cls_opt.param_groups[-1]["lr"]
                self.cls_sched.step()
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(
                    f"epoch {self.schedule.epoch + 1} ({phase}): loss is {rec['loss']}; "
                    f"stopped, {self.out / 'last.pt'} keeps the last good state"
                )
            self.schedule.end_epoch(rec["loss"])
            epoch = self.schedule.epoch
            val = (
                self.validate()
                if epoch % self.cfg.train.eval_every == 0 or self.schedule.next_phase() is None
                else {}
            )
            rec = {"epoch": epoch, "phase": phase, **rec, **{f"val_{k}": v for k, v in val.items()}}
            # model selection on validation only; without a validation split, on training accuracy
            score = val.get(f"acc_{fused}", -math.inf) if self.val_set else rec[f"train_acc_{fused}"]
            if score > self.best:
                self.best, self.best_epoch = score, epoch
                save_checkpoint(model_record(self.model, self.cfg, self.classes), self.out / "best.pt")
            rec["best_epoch"] = self.best_epoch
            self._log(rec)
            self._save_last()
            if self.progress:
                tqdm.write(_epoch_line(rec, fused))
        if self.schedule.stopped:
            self._log({"event": "stopped", "reason": self.schedule.stopped, "epoch": self.schedule.epoch})
        return self.test()

    def test(self) -> dict[str, float]:
        from .checkpoint import load_model

        best = self.out / "best.pt"
        model = load_model(best)[0].to(self.device) if best.is_file() else self.model
        test_set = setup.make_dataset(self.cfg, "test", model.preprocessing, train=False)
        loader = setup.make_loader(test_set, self.cfg)
        metrics = evaluate(
            model,
            loader,
            device=self.device,
            amp=self.cfg.train.amp,
            head_parts=getattr(test_set, "head_parts", None),
            desc="test",
            progress=self.progress,
        )
        metrics = {**metrics, "best_epoch": self.best_epoch, "split": "test"}
        (self.out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
        if self.progress:
            tqdm.write(format_table(metrics, title=f"RA-CNN test ({len(test_set)} images)"))
        return metrics


def _epoch_line(rec: dict[str, Any], fused: str) -> str:
    parts = [f"epoch {rec['epoch']:>3} {rec['phase']:<8}", f"loss {rec['loss']:.4f}"]
    for k in ("train_acc_s1", "val_acc_s1", "val_acc_s2", f"val_acc_{fused}", "val_box_side_s1"):
        if k in rec:
            parts.append(f"{k.replace('_acc', '')} {rec[k]:.3f}")
    parts.append(f"{rec['images_per_s']:.1f} img/s")
    return " | ".join(parts)
