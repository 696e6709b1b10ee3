"""Run configuration: dataclasses per concern, YAML loading and dotted ``--set`` overrides.

The resolved :class:`Config` is stored (as a plain dict) inside every checkpoint, so a model can be rebuilt
from the file alone. This module imports neither the model nor data code; the kinds of fusion, of APN
and of APN initialisation box it accepts are those :mod:`racnn.fusion`, :mod:`racnn.attention` and
:mod:`racnn.localization` implement.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .attention import APN_KINDS
from .fusion import FUSIONS
from .localization import INIT_BOXES

# most scales a model has: the fused outputs' names spell their scales digit by digit (s12, s123), so a tenth
# scale's s10 would read as scales 1 and 0 (racnn.model.fusion_keys)
MAX_SCALES = 9


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming the key and the problem."""


@dataclass
class ModelConfig:
    """What the model is: rebuilt from this section alone (it ships inside every checkpoint and export)."""

    backbone: str = "mobilenet_v2"  # any name of racnn.backbones.list_backbones() or a torchvision model
    pretrained: bool = True  # ImageNet weights via torchvision (offline through TORCH_HOME) or weights_file
    weights_file: str | None = None  # local state_dict for the backbone, overrides the torchvision weights
    num_scales: int = 3
    input_size: int = 224  # side of scale 1's (square) input, pixels
    zoom_size: int | None = None  # side of the inputs of scales 2..N (None: input_size); paper: 448 then 224
    crop_from: str = "previous"  # "previous": zoom the previous scale (paper); "source": crop the data image
    mask_k: float = 10.0  # steepness of the boxcar's logistic h(x)=1/(1+exp(-k x)), x in source pixels
    # the mask's steepness in the backward pass only (None: mask_k). A soft value (released code: 0.05) gives a
    # box gradient from the pixels near each edge instead of the one pixel an edge crosses (racnn.attention)
    mask_k_backward: float | None = None
    box_min_side: float = 0.25  # lower bound on the box side, fraction of the input side
    box_max_side: float = 1.0  # upper bound on the box side
    apn_grid: int = 7  # APN input: last conv features pooled to grid x grid, then flattened
    apn_hidden: int = 1024  # released model: FC 1024, tanh, FC 3, sigmoid
    # "fc": the paper's APN (two FC layers on the pooled map); "map": a box read off the map by a rule with
    # C + 4 parameters, the same at every cell (racnn.attention.MapAPN); needs apn.lr and init_lr ~1000x fc's
    apn_kind: str = "fc"
    dropout: float = 0.0  # before every classification head
    # what the fused outputs (s12, s123) are: concat (the paper's FC on the concatenated features),
    # mean_prob, mean_logprob, weighted (per-scale weights fitted on validation); see racnn.fusion
    fusion: str = "concat"


@dataclass
class DataConfig:
    name: str = "cub"  # dataset kind: racnn.data.list_datasets()
    root: str | None = None  # dataset folder (the CLI's --data overrides it)
    image_size: int = 224  # side of the image the loader gives the model (> input_size for crop_from=source)
    val_fraction: float = 0.1  # share of train carved out (seeded, per class) for model selection
    max_images: int | None = None  # cap on each split, for smoke runs
    num_workers: int = 2
    augment: bool = True  # random resized crop + horizontal flip on train
    crop_scale_min: float = 0.6  # smallest area fraction of RandomResizedCrop
    skip_bad_images: bool = False  # unreadable images: skip and count them instead of stopping


@dataclass
class OptimConfig:
    """The classifiers' optimiser (backbones, heads, fusion); the APNs' is in :class:`APNConfig`."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # classification heads and fusion
    backbone_lr_mult: float = 0.1  # backbones train at lr * this
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | step | none  (over the classification epochs)
    step_size: int = 10  # epochs between decays for scheduler=step
    gamma: float = 0.1
    grad_clip: float | None = None


@dataclass
class APNConfig:
    """How the attention proposal networks are initialised (paper Sec. 3.4) and trained."""

    lr: float = 1e-5  # learning rate in the attention (and joint) phases
    optimizer: str = "adam"  # adam | sgd (sgd uses optim.momentum)
    init_steps: int = 50  # regression steps of each APN towards its initialisation box
    init_lr: float = 1e-5  # Adam learning rate of that regression
    # the initialisation box per APN, the last repeated (racnn.localization): "peak", a square of init_side on
    # the strongest response (paper); "region", a square sized to the cells above init_threshold of the
    # response; "aolm", the largest connected region above the map's mean (MMAL-Net)
    init_box: list[str] = field(default_factory=lambda: ["peak"])
    init_side: float = 0.5  # side of the "peak" square, fraction of the input side
    init_threshold: float = 0.5  # "region": fraction of the (min, max) response range a cell must reach
    init_response: str = "sum"  # "sum": channel sum of the last conv layer (paper); "cam": class activation
    # scale 1's initialisation box from its map of the loader's full-size image (14 x 14 at 448 px against
    # 7 x 7 at 224): a finer grid for the box; only where the images are larger than scale 1's input
    init_full_size: bool = False
    # how the attention phases move the APNs: "gradient", the ranking loss's gradient through the crop (paper);
    # "search", each APN regressed (smooth-L1, at apn.lr) towards the box among itself and its neighbours
    # (centre moved by search_shift of the side, side times or over search_zoom) on which the frozen finer
    # scale best meets the ranking loss, when that beats the box itself by more than search_min_gain in p_t
    update: str = "gradient"
    search_shift: float = 0.1
    search_zoom: float = 1.15
    search_min_gain: float = 0.0
    search_candidates: int = 6  # neighbours the finer scale judges per image and step (of 6, drawn at random)
    # what a candidate is judged by: "pair", the hinge of (s, s+1); "total", every pair's hinge from (s, s+1) to
    # the last, the finer APNs re-run on the candidate's view (the paper's whole ranking loss; costs APN s
    # one more pass per finer scale)
    search_score: str = "pair"
    # the search's boxes and their neighbours come from the APNs as they were when the attention epoch began,
    # and every image regresses towards its target (an image that does not move, back to that box) on the
    # views those APNs show: every target lies within one neighbour's step of the epoch's starting box. Off,
    # the search starts from the APN's current box and an image that does not move pulls on nothing, so steps
    # add up within an epoch (docs/results.md)
    search_anchor: bool = False
    # the share of the training split (per class, seeded) that the attention phases learn on and the
    # classifiers do not train on until the budget's last attention epoch has run: the finer scale's p_t then
    # judges boxes on images it has not fitted (on those it has, it barely depends on the box). An attention
    # epoch visits each of these images the whole number of times that makes it about one epoch of the split
    attend_holdout: float = 0.0


@dataclass
class LossConfig:
    """The loss terms and their weights (paper Eqs. 7-8, and the options beyond them)."""

    label_smoothing: float = 0.0  # of every cross-entropy
    fusion_weight: float = 1.0  # weight of the concat fusion heads' cross-entropies
    rank_margin: float = 0.05
    rank_detach_coarse: bool = True  # p_t(s) is a fixed reference in L_rank: only p_t(s+1) is pushed
    # the hinge goes quiet once the finer scale is within the margin of the p_t that label smoothing aims for
    rank_quiet: bool = False
    rank_weight: float = 1.0  # weight of the ranking loss (joint mode)
    # weight of the object prior in the attention phases: smooth-L1 of the scale-1 box to the AOLM box of
    # scale 1's own conv map (racnn.localization.aolm_boxes); 0: the paper's ranking loss alone
    prior_weight: float = 0.0


@dataclass
class ScheduleConfig:
    """Which phase each epoch is (paper Sec. 3.4; racnn.training.schedule)."""

    mode: str = "alternate"  # alternate (paper) | joint (both losses every step)
    warmup_epochs: int = 0  # classification epochs before the APN initialisation (heads must classify first)
    warmup_backbones: bool = True  # false: the warm-up trains heads and fusion only (ImageNet maps kept)
    classify_epochs: int = 2  # epochs per classification phase (APNs frozen)
    attend_epochs: int = 1  # epochs per attention phase (classifiers frozen)
    converge_tol: float = 0.01  # relative loss improvement under which a phase counts as converged
    max_steps_per_epoch: int | None = None  # cap on iterations per epoch (smoke runs, benchmarks)


@dataclass
class TrainConfig:
    epochs: int = 12  # total epochs, all phases together
    batch_size: int = 16
    seed: int = 0
    eval_every: int = 1  # validate every N epochs
    # the model kept in best.pt and tested: "val", the epoch of the best validation accuracy of the last
    # fused output; "last", the last epoch (no selection: a 75-image validation split is one image per 1.3
    # points, and picking the best of 16 noisy epochs flatters it)
    select: str = "val"
    log_every: int = 10  # iterations between progress-bar updates and non-finite loss checks
    tensorboard: bool = True  # scalars + attention pictures in OUT/tb/ when tensorboard is installed


@dataclass
class RuntimeConfig:
    """How this machine runs the job: none of it is part of the model (an exported model carries none)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = False  # autocast (bf16 on CPU and on GPUs that support it, else fp16)
    channels_last: bool = False
    deterministic: bool = False
    checkpoint_activations: bool = False  # recompute backbone activations in backward (saves memory)
    compile_crop: bool = False  # the crop as compiled code: torch.compile on CUDA, a C++ kernel on a CPU


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    apn: APNConfig = field(default_factory=APNConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Config:
        """A config from a plain dict (a checkpoint's, a YAML file's); keys of earlier releases are read under
        their new names (:data:`RENAMED`) without a word: a checkpoint cannot be edited."""
        cfg = cls()
        _merge(cfg, _renamed(d, source, warn=False), prefix="", source=source)
        validate(cfg, source=source)
        return cfg


# Keys that moved to a section of their own concept. Old configs and checkpoints keep loading: a YAML file or
# --set that uses an old name gets one line on stderr saying the new one.
RENAMED: dict[str, str] = {
    "optim.apn_lr": "apn.lr",
    "optim.apn_optimizer": "apn.optimizer",
    "schedule.apn_init_steps": "apn.init_steps",
    "schedule.apn_init_lr": "apn.init_lr",
    "schedule.apn_init_box": "apn.init_box",
    "schedule.apn_init_side": "apn.init_side",
    "schedule.apn_init_threshold": "apn.init_threshold",
    "schedule.apn_init_response": "apn.init_response",
    "optim.label_smoothing": "loss.label_smoothing",
    "schedule.fusion_weight": "loss.fusion_weight",
    "schedule.rank_margin": "loss.rank_margin",
    "schedule.rank_detach_coarse": "loss.rank_detach_coarse",
    "schedule.rank_quiet": "loss.rank_quiet",
    "schedule.rank_weight": "loss.rank_weight",
    "schedule.prior_weight": "loss.prior_weight",
    "train.device": "runtime.device",
    "train.amp": "runtime.amp",
    "train.channels_last": "runtime.channels_last",
    "train.deterministic": "runtime.deterministic",
    "model.checkpoint_activations": "runtime.checkpoint_activations",
    "model.compile_crop": "runtime.compile_crop",
}


def _renamed(d: Any, source: str, *, warn: bool) -> Any:
    """``d`` (a nested dict) with the keys of :data:`RENAMED` moved to their new places; a key given under
    both names is an error."""
    if not isinstance(d, dict):
        return d
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for old, new in RENAMED.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = out.get(osec)
        if not isinstance(section, dict) or okey not in section:
            continue
        value = section.pop(okey)
        if not section:
            out.pop(osec)
        target = out.setdefault(nsec, {})
        if not isinstance(target, dict):
            continue  # the type check of _merge reports it
        if nkey in target:
            raise ConfigError(f"{source}: {old} and {new} are the same key (renamed); keep {new} only")
        target[nkey] = value
        if warn:
            print(f"{source}: {old} is now {new} (read as such)", file=sys.stderr)
    return out


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (bool, int, float, str, optional thereof)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:  # list[str]: a YAML list, or one string with commas (a,b)
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise ConfigError(f"{source}: {key} must be a list of names (or one name, or a,b), got {value!r}")
    else:  # pragma: no cover - all fields use the types above
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{source}: {key} must be {name}, got {value!r}")


def _merge(obj: Any, d: dict[str, Any], prefix: str, source: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {d!r}")
    hints = _field_types(obj)
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{source}: unknown key '{full}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))


_CHOICES = {
    "model.crop_from": ("previous", "source"),
    "model.fusion": FUSIONS,
    "model.apn_kind": APN_KINDS,
    "optim.name": ("sgd", "adamw"),
    "optim.scheduler": ("cosine", "step", "none"),
    "apn.optimizer": ("adam", "sgd"),
    "apn.init_response": ("sum", "cam"),
    "apn.update": ("gradient", "search"),
    "apn.search_score": ("pair", "total"),
    "schedule.mode": ("alternate", "joint"),
    "train.select": ("val", "last"),
}


def validate_model(m: ModelConfig, *, source: str = "config") -> None:
    """Range and choice checks of the model section alone (also what ``racnn.create_model`` checks)."""
    for key in ("model.crop_from", "model.fusion", "model.apn_kind"):
        value = getattr(m, key.split(".")[1])
        if value not in _CHOICES[key]:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    checks = [
        (
            1 <= m.num_scales <= MAX_SCALES,
            f"model.num_scales must be in 1..{MAX_SCALES} (output keys s12, s123, ... name scales by one digit)",
        ),
        (m.input_size >= 16, "model.input_size must be >= 16"),
        (m.zoom_size is None or m.zoom_size >= 16, "model.zoom_size must be >= 16 (or null)"),
        (0.0 < m.box_min_side <= m.box_max_side <= 1.0, "need 0 < model.box_min_side <= box_max_side <= 1"),
        (m.mask_k > 0, "model.mask_k must be > 0"),
        (m.mask_k_backward is None or m.mask_k_backward > 0, "model.mask_k_backward must be > 0 (or null)"),
        (m.apn_grid >= 1 and m.apn_hidden >= 1, "model.apn_grid and apn_hidden must be >= 1"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: {msg}")


def validate(cfg: Config, *, source: str = "config") -> None:
    """Range and choice checks that the types alone cannot express."""
    validate_model(cfg.model, source=source)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(choices)}, got {value!r}")
    boxes = cfg.apn.init_box
    too_many = cfg.model.num_scales > 1 and len(boxes) > cfg.model.num_scales - 1  # (1 scale: no APN, moot)
    if not all(b in INIT_BOXES for b in boxes) or too_many:
        raise ConfigError(
            f"{source}: apn.init_box must name {', '.join(INIT_BOXES)}, at most one per APN (num_scales - 1), "
            f"the last repeated (e.g. [region, peak]), got {boxes!r}"
        )
    checks = [
        (0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (cfg.data.max_images is None or cfg.data.max_images > 0, "data.max_images must be > 0"),
        (cfg.data.image_size >= 16, "data.image_size must be >= 16"),
        (0.0 < cfg.data.crop_scale_min <= 1.0, "data.crop_scale_min must be in (0, 1]"),
        (cfg.train.epochs >= 0 and cfg.train.batch_size >= 1, "train.epochs >= 0 and batch_size >= 1"),
        (cfg.schedule.classify_epochs >= 1 and cfg.schedule.attend_epochs >= 1, "phase lengths must be >= 1"),
        (cfg.apn.init_steps >= 0, "apn.init_steps must be >= 0"),
        (cfg.train.log_every >= 1 and cfg.train.eval_every >= 1, "train.log_every, eval_every must be >= 1"),
        (cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0"),
        (0.0 < cfg.apn.init_side <= 1.0, "apn.init_side must be in (0, 1]"),
        (0.0 <= cfg.apn.init_threshold < 1.0, "apn.init_threshold must be in [0, 1)"),
        (0.0 <= cfg.loss.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)"),
        (cfg.loss.prior_weight >= 0.0, "loss.prior_weight must be >= 0"),
        (0.0 < cfg.apn.search_shift < 1.0, "apn.search_shift must be in (0, 1)"),
        (cfg.apn.search_zoom > 1.0, "apn.search_zoom must be > 1"),
        (cfg.apn.search_min_gain >= 0.0, "apn.search_min_gain must be >= 0"),
        (1 <= cfg.apn.search_candidates <= 6, "apn.search_candidates must be in 1..6"),
        (
            not cfg.apn.search_anchor or cfg.apn.update == "search",
            "apn.search_anchor needs apn.update=search (the gradient update has no search to anchor)",
        ),
        (0.0 <= cfg.apn.attend_holdout < 1.0, "apn.attend_holdout must be in [0, 1)"),
        (
            cfg.apn.attend_holdout == 0.0 or cfg.schedule.mode == "alternate",
            "apn.attend_holdout needs schedule.mode=alternate (joint epochs train both on the same images)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: {msg}")


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value parsed as YAML (so 3, 0.1, true, null work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted ``key=value`` overrides with the same type checks as the file."""
    for text in overrides:
        key, value = parse_override(text)
        if isinstance(value, str) and _expects_number(cfg, RENAMED.get(key, key)) and not _is_float(value):
            raise ConfigError(f"--set {text}: {key} must be a number, got {value!r}")
        _merge(
            cfg, _renamed(_nest(key, value), f"--set {text}", warn=True), prefix="", source=f"--set {text}"
        )
    validate(cfg, source="--set")
    return cfg


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _expects_number(cfg: Config, key: str) -> bool:
    obj: Any = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
        if obj is None or not dataclasses.is_dataclass(obj):
            return False
    tp = _field_types(obj).get(parts[-1])
    return tp in (int, float, int | None, float | None)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML") from e
        _merge(cfg, _renamed(raw, str(p), warn=True), prefix="", source=str(p))
        validate(cfg, source=str(p))
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
