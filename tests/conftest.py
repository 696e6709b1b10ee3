"""Shared fixtures: a tiny fake CUB-200-2011 tree, the location of the real subset in ../shared, and the
crop-and-zoom comparison with the literal reference that the fast-path tests share."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from racnn.attention import box_from_unit, crop_zoom_reference

REAL_CUB = Path(__file__).resolve().parents[1].parent / "shared/datasets/cub200-subset/CUB_200_2011"
# the tiny model every fast end-to-end test trains: 32 px inputs, a 16-unit APN on 2 x 2 features
TINY_MODEL = [
    "model.backbone=tiny",
    "model.pretrained=false",
    "model.input_size=32",
    "data.image_size=32",
    "model.apn_hidden=16",
    "model.apn_grid=2",
    "train.tensorboard=false",
]
SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared/weights"

CLASS_IDS = (12, 3, 7)  # written in this order; labels follow sorted ids: 3 -> 0, 7 -> 1, 12 -> 2
PART_NAMES = {1: "back", 2: "beak", 3: "left eye", 4: "right eye", 5: "tail"}
PER_CLASS = 5  # images per class: 4 train + 1 test


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script, not a package) as the module ``bench_<name>``."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:  # as when the script runs: its sibling modules import
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def interrupt_epoch(trainer: object, call: int) -> None:
    """Make ``trainer.train_epoch`` raise ``KeyboardInterrupt`` (Ctrl-C) on its ``call``-th call."""
    real, calls = trainer.train_epoch, {"n": 0}  # type: ignore[attr-defined]

    def train_epoch(phase: str) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(phase)

    trainer.train_epoch = train_epoch  # type: ignore[attr-defined]


def write_fake_cub(root: Path) -> Path:
    """Write a 3-class, 15-image CUB_200_2011 tree under ``root``; return the CUB_200_2011 folder."""
    cub = root / "CUB_200_2011"
    (cub / "parts").mkdir(parents=True)
    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes", "locs")}
    image_id = 100  # ids need not start at 1
    for cid in CLASS_IDS:
        folder = cub / "images" / f"{cid:03d}.Bird_{cid}"
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            image_id += 1
            width, height = 40 + 6 * k, 32 + 4 * k
            mode = "L" if (cid, k) == (7, 0) else "RGB"  # one greyscale image
            Image.new(mode, (width, height), 90 + 10 * k).save(folder / f"img_{image_id}.jpg")
            lines["images"].append(f"{image_id} {folder.name}/img_{image_id}.jpg")
            lines["labels"].append(f"{image_id} {cid}")
            lines["split"].append(f"{image_id} {int(k < PER_CLASS - 1)}")
            # The first image's box overhangs the image by 2 px on the right and starts at x = -1.
            box_w = width + 3.0 if k == 0 else width / 2
            lines["boxes"].append(f"{image_id} {-1.0 if k == 0 else 4.0} 5.0 {box_w} {height / 2}")
            for pid in PART_NAMES:
                visible = int(pid != 5)
                lines["locs"].append(f"{image_id} {pid} {10.0 * visible + pid} {12.0 * visible} {visible}")
    files = {
        "images.txt": lines["images"],
        "image_class_labels.txt": lines["labels"],
        "train_test_split.txt": lines["split"],
        "bounding_boxes.txt": lines["boxes"],
        "classes.txt": [f"{cid} {cid:03d}.Bird_{cid}" for cid in CLASS_IDS],
        "parts/parts.txt": [f"{pid} {name}" for pid, name in PART_NAMES.items()],
        "parts/part_locs.txt": lines["locs"],
    }
    for name, content in files.items():
        (cub / name).write_text("\n".join(content) + "\n")
    return cub


@pytest.fixture
def fake_cub(tmp_path: Path) -> Path:
    return write_fake_cub(tmp_path)


# ------------------------------------------------------------------ predictions compared across runs

# One image's probabilities in batches of other sizes, under other thread counts or backends (other CPU kernels,
# other summation orders): float32 rounding, summed through the network, stays within this.
PROB_TOL = 1e-5


def assert_same_prediction(a: dict, b: dict, tol: float = PROB_TOL) -> None:
    """Two prediction records' ``top`` tables agree as far as floating point lets them on any CPU: the same
    outputs, the same decision (top-1 class) of each, the same ranked probabilities within ``tol``, and any
    class in both lists with probabilities within ``tol`` (classes after the first may swap places where their
    probabilities are that close). Exact equality is no requirement: it does not hold across batch sizes."""
    assert list(a) == list(b)
    for key in a:
        assert a[key][0]["class"] == b[key][0]["class"], key
        assert [e["prob"] for e in a[key]] == pytest.approx([e["prob"] for e in b[key]], abs=tol), key
        pa, pb = ({e["class"]: e["prob"] for e in t[key]} for t in (a, b))
        assert all(abs(pa[c] - pb[c]) <= tol for c in pa.keys() & pb.keys()), key


@pytest.fixture(autouse=True)
def _one_thread():
    """Test tensors are tiny and gain nothing from threads, while 2 OpenMP threads on a busy 2-core machine
    stall (seen 100x slower); every test runs single-threaded and restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ crop-and-zoom fast paths


def _no_cpp_toolchain() -> bool:
    """No C++ compiler or no ninja (racnn[cpp]): the kernel cannot be built here. A machine that has both
    runs the kernel's tests, so a kernel that fails to build fails them instead of skipping."""
    if shutil.which("c++") is None:
        return True
    try:
        import ninja  # noqa: F401
    except ImportError:
        return shutil.which("ninja") is None
    return False


# the C++ kernel is built on first use (about 30 s, once per machine)
NEEDS_CXX = pytest.mark.skipif(
    _no_cpp_toolchain(), reason="the C++ crop kernel needs a C++ compiler and ninja"
)


def crop_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random boxes, border boxes, a pixel-aligned box (samples on pixel centres: zero fractions) and a box
    half outside the image (samples clamped to the border)."""
    random = box_from_unit(torch.rand(n, 3, generator=gen, dtype=torch.float64), 0.1, 1.0)
    special = torch.tensor(
        [
            [0.3, 0.5, 0.3],  # left edge
            [0.71, 0.4, 0.29],  # right edge
            [0.5, 0.22, 0.22],  # top edge
            [0.45, 0.73, 0.27],  # bottom edge
            [0.5, 0.5, 0.5],  # whole image
            [0.2, 0.8, 0.2],  # bottom-left corner
            [0.5, 0.375, 0.25],  # pixel-aligned on a 16 x 16 image with out = 8
            [0.95, 0.05, 0.2],  # half outside (top-right)
        ],
        dtype=torch.float64,
    )
    return torch.cat([random, special])


def compare_crop(fn, image: torch.Tensor, boxes: torch.Tensor, out: int, k: float, image_grad: bool) -> None:
    """``fn`` equals ``crop_zoom_reference`` in float64: values, box gradient (and the image's), 1e-10."""
    gen = torch.Generator().manual_seed(out)
    results = []
    for f in (fn, crop_zoom_reference):
        im = image.clone().requires_grad_(image_grad)
        bx = boxes.clone().requires_grad_(True)
        y = f(im, bx, out, k)
        upstream = torch.randn(y.shape, generator=gen.manual_seed(out), dtype=torch.float64)
        grads = torch.autograd.grad((y * upstream).sum(), (bx, im) if image_grad else (bx,))
        results.append((y, *grads))
    for got, want in zip(results[0], results[1], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
