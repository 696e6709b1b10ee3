"""Config: defaults, YAML loading, type checks and dotted ``--set`` overrides."""

from __future__ import annotations

import pytest
import yaml

from racnn.config import (
    Config,
    ConfigError,
    ModelConfig,
    RuntimeConfig,
    apply_overrides,
    load_config,
    parse_override,
    save_config,
    validate,
)


def _write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = Config()
    validate(cfg)
    assert load_config(None) == cfg
    assert cfg.model.num_scales == 3 and cfg.model.mask_k == 10.0 and cfg.loss.rank_margin == 0.05


def test_load_yaml_file(tmp_path):
    path = _write(
        tmp_path,
        """
model:
  backbone: tiny
  pretrained: false
  input_size: 64
  mask_k: 20          # int for a float field: accepted
train:
  epochs: 3
optim:
  lr: 0.05
  grad_clip: 2.0
data:
  max_images: null
""",
    )
    cfg = load_config(path)
    assert cfg.model.backbone == "tiny" and cfg.model.pretrained is False and cfg.model.input_size == 64
    assert cfg.model.mask_k == 20.0 and isinstance(cfg.model.mask_k, float)
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05 and cfg.optim.grad_clip == 2.0
    assert cfg.data.max_images is None
    # untouched fields keep their defaults
    assert cfg.model.num_scales == ModelConfig().num_scales
    assert cfg.train.batch_size == Config().train.batch_size


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing here\n")) == Config()


def test_file_then_overrides(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 5\n  batch_size: 4\n")
    cfg = load_config(path, ["train.epochs=7"])
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 4


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("foo: 1\n", "'foo'"),
        ("model:\n  backbone: tiny\n  bakcbone: vgg19\n", "'model.bakcbone'"),
        ("train:\n  epochs: 2\n  lr: 0.1\n", "'train.lr'"),
    ],
)
def test_unknown_key_in_file_is_named(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("foo=1", "'foo'"),
        ("model.bakcbone=vgg19", "'model.bakcbone'"),
        ("nosuch.section.key=1", "'nosuch'"),
    ],
)
def test_unknown_key_in_override_is_named(override, key):
    with pytest.raises(ConfigError, match="unknown key") as info:
        apply_overrides(Config(), [override])
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  epochs: '3'\n", "train.epochs"),  # string for int
        ("train:\n  epochs: three\n", "train.epochs"),
        ("train:\n  epochs: true\n", "train.epochs"),  # bool for int
        ("train:\n  epochs: 2.5\n", "train.epochs"),  # float for int
        ("model:\n  pretrained: 1\n", "model.pretrained"),  # int for bool
        ("model:\n  backbone: 3\n", "model.backbone"),  # int for str
        ("optim:\n  lr: fast\n", "optim.lr"),  # string for float
        ("optim:\n  lr: true\n", "optim.lr"),  # bool for float
        ("data:\n  max_images: 1.5\n", "data.max_images"),  # float for optional int
        ("model: 3\n", "model"),  # scalar for a section
    ],
)
def test_wrong_type_in_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        "train.epochs=three",  # string for int
        "train.epochs=true",  # bool for int
        "train.epochs=2.5",  # float for int
        "optim.lr=fast",  # string for float
        "optim.lr=false",  # bool for float
        "model.pretrained=3",  # int for bool
        "data.max_images=many",  # string for optional int
    ],
)
def test_wrong_type_in_override(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    assert key in str(info.value)


def test_int_for_float_accepted():
    cfg = apply_overrides(Config(), ["optim.lr=1", "optim.grad_clip=5", "model.mask_k=20"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.grad_clip == 5.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.model.mask_k == 20.0 and isinstance(cfg.model.mask_k, float)


def test_scientific_notation_for_float_in_override():
    cfg = apply_overrides(Config(), ["apn.lr=1e-4"])
    assert cfg.apn.lr == pytest.approx(1e-4)


def test_scientific_notation_for_float_in_file(tmp_path):
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 5e-4\n"))
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.weight_decay == pytest.approx(5e-4)


def test_apply_overrides_values():
    cfg = Config()
    cfg.model.weights_file = "x.pth"
    out = apply_overrides(
        cfg,
        [
            "train.epochs=3",
            "model.weights_file=null",
            "model.pretrained=false",
            "model.backbone=resnet50",
            "optim.lr=0.002",
            "data.max_images=10",
        ],
    )
    assert out is cfg
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.model.weights_file is None
    assert cfg.model.pretrained is False
    assert cfg.model.backbone == "resnet50"
    assert cfg.optim.lr == 0.002
    assert cfg.data.max_images == 10
    # the next override sees the previous ones; later wins
    apply_overrides(cfg, ["train.epochs=4", "train.epochs=5"])
    assert cfg.train.epochs == 5


def test_parse_override():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override(" model.backbone = vgg19") == ("model.backbone", "vgg19")
    assert parse_override("model.weights_file=null") == ("model.weights_file", None)
    assert parse_override("data.root=/a/b=c") == ("data.root", "/a/b=c")
    assert parse_override("optim.lr=0.5") == ("optim.lr", 0.5)


@pytest.mark.parametrize("bad", ["train.epochs", "train.epochs:3", ""])
def test_override_without_equals_raises(bad):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), [bad])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("schedule.mode=foo", "schedule.mode"),
        ("model.crop_from=center", "model.crop_from"),
        ("model.apn_kind=conv", "model.apn_kind"),
        ("optim.name=adam", "optim.name"),
        ("optim.scheduler=linear", "optim.scheduler"),
    ],
)
def test_bad_choice(override, key):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    assert key in str(info.value) and override.split("=")[1] in str(info.value)


def test_bad_choice_in_file(tmp_path):
    path = _write(tmp_path, "schedule:\n  mode: foo\n")
    with pytest.raises(ConfigError, match=r"schedule\.mode") as info:
        load_config(path)
    assert str(path) in str(info.value) and "alternate" in str(info.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.num_scales=0", "num_scales"),
        ("model.num_scales=10", "num_scales"),
        ("model.input_size=8", "input_size"),
        ("model.zoom_size=8", "zoom_size"),
        ("model.box_min_side=0.9", "box_min_side"),  # with box_max_side=0.5 below
        ("model.mask_k=0", "mask_k"),
        ("model.dropout=1.0", "dropout"),
        ("loss.label_smoothing=1.0", "label_smoothing"),
        ("apn.init_side=0", "apn.init_side"),
        ("apn.init_threshold=1.0", "apn.init_threshold"),
        ("apn.init_box=region,box", "apn.init_box"),
        ("apn.init_box=", "apn.init_box"),
        ("apn.init_box=region,peak,peak", "apn.init_box"),  # 3 kinds for the 2 APNs of 3 scales
    ],
)
def test_range_checks(override, needle):
    overrides = [override]
    if override.startswith("model.box_min_side"):
        overrides.append("model.box_max_side=0.5")
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(Config(), overrides)


def test_apn_init_box_list_is_moot_without_apn():
    cfg = apply_overrides(Config(), ["model.num_scales=1", "apn.init_box=region,peak"])
    assert cfg.apn.init_box == ["region", "peak"]  # the accuracy benchmark's baseline: 1 scale, no APN


def test_init_box_is_a_list_in_yaml_or_one_string(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("apn:\n  init_box: [aolm, peak]\n")
    assert load_config(f).apn.init_box == ["aolm", "peak"]
    assert apply_overrides(Config(), ["apn.init_box=[region, peak]"]).apn.init_box == ["region", "peak"]
    assert apply_overrides(Config(), ["apn.init_box=region"]).apn.init_box == ["region"]
    with pytest.raises(ConfigError, match=r"apn\.init_box must be a list of names"):
        apply_overrides(Config(), ["apn.init_box=3"])


def test_keys_of_earlier_releases_load_under_their_new_names(tmp_path, capsys):
    """Configs written before the sections by concept keep loading: a file or --set gets one line per renamed
    key on stderr, a checkpoint's config (which cannot be edited) loads silently."""
    old = {
        "model": {"backbone": "tiny", "compile_crop": True, "checkpoint_activations": True},
        "optim": {"lr": 0.1, "apn_lr": 3e-6, "apn_optimizer": "sgd", "label_smoothing": 0.1},
        "schedule": {
            "apn_init_box": "region,peak",
            "apn_init_steps": 7,
            "rank_margin": 0.1,
            "fusion_weight": 2.0,
        },
        "train": {"device": "cpu", "amp": True, "channels_last": True, "deterministic": True, "epochs": 3},
    }
    f = tmp_path / "old.yaml"
    f.write_text(yaml.safe_dump(old))
    cfg = load_config(f)
    err = capsys.readouterr().err.splitlines()
    assert f"{f}: optim.apn_lr is now apn.lr (read as such)" in err and len(err) == 13
    assert (cfg.apn.lr, cfg.apn.optimizer, cfg.apn.init_steps) == (3e-6, "sgd", 7)
    assert cfg.apn.init_box == ["region", "peak"] and cfg.loss.label_smoothing == 0.1
    assert (cfg.loss.rank_margin, cfg.loss.fusion_weight, cfg.optim.lr, cfg.train.epochs) == (
        0.1,
        2.0,
        0.1,
        3,
    )
    assert cfg.runtime == RuntimeConfig("cpu", True, True, True, True, True)
    assert Config.from_dict(old).to_dict() == cfg.to_dict() and capsys.readouterr().err == ""
    assert apply_overrides(Config(), ["schedule.rank_margin=0.2"]).loss.rank_margin == 0.2
    assert "schedule.rank_margin is now loss.rank_margin" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"optim\.apn_lr and apn\.lr are the same key"):
        Config.from_dict({"optim": {"apn_lr": 1e-6}, "apn": {"lr": 1e-5}})


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "missing.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "model:\n  backbone: [tiny\n  input_size: 3\n", name="broken.yaml")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_round_trip_dict_and_file(tmp_path):
    cfg = apply_overrides(
        Config(),
        [
            "model.backbone=tiny",
            "model.weights_file=w.pth",
            "train.epochs=3",
            "optim.grad_clip=1.5",
            "data.max_images=7",
            "schedule.mode=joint",
        ],
    )
    d = cfg.to_dict()
    assert isinstance(d["model"], dict) and d["model"]["backbone"] == "tiny"
    again = Config.from_dict(d)
    assert again == cfg and again is not cfg
    assert again != Config()
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_from_dict_validates():
    d = Config().to_dict()
    d["model"]["num_scales"] = 0
    with pytest.raises(ConfigError, match="num_scales"):
        Config.from_dict(d)
    with pytest.raises(ConfigError, match=r"'model\.nope'"):
        Config.from_dict({"model": {"nope": 1}})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_every_config_key_is_documented() -> None:
    """docs/config.md is the reference: it must name every key the code accepts."""
    import dataclasses
    from pathlib import Path

    from racnn.config import Config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    cfg = Config()
    missing = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
        if f"`{section.name}.{f.name}`" not in doc
    ]
    assert not missing, f"undocumented config keys: {missing}"
