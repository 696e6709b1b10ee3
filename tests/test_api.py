"""The Python API of the package root (docs/api.md): its example runs as written, and each name does what the
page says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import racnn
from conftest import assert_same_prediction
from racnn.data import SyntheticBirds, build_transform

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_documented_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), str(DOC), "exec"), {})  # our own documentation
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"scale 1 \d\.\d\d, fused \d\.\d\d", out[-2])
    name, box = out[-1].split(" ", 1)
    assert name in SyntheticBirds(split="test").classes and box.startswith("[")
    run = tmp_path / "runs" / "api_example"
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.json"} <= {
        p.name for p in run.iterdir()
    }


def test_the_package_root_exports_the_api() -> None:
    assert set(racnn.__all__) >= {"create_model", "load_model", "Trainer", "predict", "Config"}
    assert all(getattr(racnn, name) is not None for name in racnn.__all__)
    count = re.search(r"the names the package root exports, (\w+) in all", DOC.read_text())
    numbers = {"six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
    assert count is not None and numbers[count.group(1)] == len(racnn.__all__)  # docs/api.md's count
    model = racnn.create_model("tiny", num_classes=5, input_size=32, apn_grid=2, apn_hidden=8)
    assert isinstance(model, racnn.RACNN) and model.cfg.num_scales == 3 and model.cfg.pretrained is False
    assert model.image_size == 32 and model.classes is None
    with pytest.raises(TypeError, match="unknown option"):
        racnn.create_model("tiny", num_classes=5, num_scale=2)
    with pytest.raises(racnn.config.ConfigError, match=r"model\.fusion"):
        racnn.create_model("tiny", num_classes=5, fusion="vote")
    with pytest.raises(ValueError, match="2 class names for 5 classes"):
        racnn.create_model("tiny", num_classes=5, classes=["a", "b"])


def _tiny_trainer(out: Path, **kw) -> racnn.Trainer:
    model = racnn.create_model(
        "tiny", num_classes=8, input_size=32, apn_grid=2, apn_hidden=8, image_size=48, crop_from="source"
    )
    prep = model.preprocessing
    tf = build_transform(size=48, mean=prep.mean, std=prep.std, train=False)
    data = SyntheticBirds(split="train", transform=tf, max_images=16, image_size=48)
    cfg = racnn.Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.data.num_workers, cfg.apn.init_steps = 1, 8, 0, 1
    cfg.train.tensorboard = False
    return racnn.Trainer(
        cfg, out, model=model, train_set=data, val_set=data, test_set=data, progress=False, **kw
    )


def test_trainer_writes_nothing_before_fit_and_uses_what_it_is_given(tmp_path: Path) -> None:
    out = tmp_path / "run"
    model = racnn.create_model("tiny", num_classes=8, input_size=32, apn_grid=2, apn_hidden=8)
    opts = (torch.optim.SGD(model.parameters(), lr=0.0), torch.optim.SGD(model.parameters(), lr=0.0))
    trainer = _tiny_trainer(out, optimizers=opts)
    assert not out.exists()  # nothing before fit
    assert trainer.optimizers.cls is opts[0] and trainer.optimizers.apn is opts[1]
    assert trainer.cfg.data.image_size == 48 and trainer.cfg.model is trainer.model.cfg
    trainer = _tiny_trainer(out)
    assert not out.exists()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.fit()
    trainer.close()
    assert (out / "best.pt").is_file() and 0.0 <= metrics["acc_s123"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    best = racnn.load_model(out / "best.pt")
    assert best.classes == SyntheticBirds(split="train").classes and best.image_size == 48
    assert best.training_config is not None and best.training_config.train.epochs == 1
    assert "runtime" not in torch.load(out / "best.pt", weights_only=True)["config"]  # not part of a model


def test_predict_takes_paths_pil_images_and_tensors(tmp_path: Path) -> None:
    model = racnn.create_model(
        "tiny", num_classes=3, input_size=32, apn_grid=2, apn_hidden=8, classes=["a", "b", "c"], image_size=40
    )
    path = tmp_path / "x.png"
    Image.new("RGB", (80, 60), (120, 30, 30)).save(path)
    image = Image.open(path)
    tensor = model.transforms()(image)
    assert tensor.shape == (3, 40, 40)
    by_path, by_image = racnn.predict(model, [path, image], topk=2)
    (by_tensor,) = racnn.predict(model, tensor, topk=2)
    assert by_path["image"] == str(path) and (by_path["width"], by_path["height"]) == (80, 60)
    # the same pixels, the same answer: the same top-1, probabilities within PROB_TOL (a batch of two and a
    # batch of one may run different CPU kernels)
    for other in (by_image, by_tensor):
        assert_same_prediction(by_path["top"], other["top"])
    assert list(by_path["top"]) == ["s1", "s2", "s3", "s12", "s123"] and len(by_path["top"]["s1"]) == 2
    assert by_path["top"]["s1"][0]["class"] in {"a", "b", "c"}
    assert [b["scale"] for b in by_path["boxes"]] == [1, 2]
    x0, y0, x1, y1 = by_path["boxes"][0]["xyxy_px"]
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60  # in the image's pixels
    with pytest.raises(ValueError, match="3 x H x W"):
        racnn.predict(model, [torch.zeros(1, 40, 40)])


def test_importing_racnn_to_predict_or_serve_leaves_the_training_stack_out() -> None:
    """``import racnn`` (then ``racnn.predict``) and what ``racnn predict`` / ``racnn serve`` import load no
    scipy, no TensorBoard and nothing of ``racnn.training``; ``racnn.Trainer`` still comes on first use."""
    pytest.importorskip("fastapi")
    code = (
        "import sys, racnn, racnn.cli, racnn.cli_predict, racnn.predict_files, racnn.runtime, racnn.serve\n"
        "heavy = ('scipy', 'tensorboard', 'torch.utils.tensorboard', 'racnn.training')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
        "print(racnn.Trainer.__module__, 'racnn.training.trainer' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "racnn.training.trainer True"]
