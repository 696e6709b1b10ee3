"""The compiled crops of ``runtime.compile_crop``: ``torch.compile`` of the crop (used on CUDA) and the C++ kernel
(``racnn.crop_cpp``, used on a CPU). Their equality to the literal reference on every crop case is in
test_fast_paths.py; here: which crop a model runs where, the fallback without a compiler, and the kernel's own
edge cases (gradcheck, threads, double backward, misuse, ninja lookup)."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import racnn.crop_cpp as crop_cpp_module
from conftest import NEEDS_CXX, compare_crop, crop_boxes
from racnn.attention import box_from_unit, crop_zoom_compiled, crop_zoom_reference
from racnn.config import ModelConfig
from racnn.crop_cpp import CropKernelUnavailable, crop_zoom_cpp, load_crop_kernel
from racnn.model import build_model


@pytest.mark.slow
def test_compiled_crop_equals_reference_and_compiles_the_batch_axis_once():
    """``crop_zoom_compiled`` (``runtime.compile_crop``) is ``torch.compile`` of the same function: the same
    values and gradients (box and image) as the literal reference, in float64, on random and special boxes.
    A new batch size (a last partial batch, evaluation) reuses the graph instead of compiling another."""
    import torch._dynamo

    gen = torch.Generator().manual_seed(5)
    image = torch.rand(8, 3, 16, 16, generator=gen, dtype=torch.float64)
    boxes = crop_boxes(8, gen)
    compare_crop(crop_zoom_compiled, image, boxes[:8], 8, 10.0, image_grad=True)
    compare_crop(crop_zoom_compiled, image, boxes[8:], 8, 10.0, image_grad=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compare_crop(crop_zoom_compiled, image[:5], boxes[:5], 8, 10.0, image_grad=True)
        compare_crop(crop_zoom_compiled, image[:3], boxes[8:11], 8, 10.0, image_grad=False)


def _compile_crop_models(device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = ModelConfig(backbone="tiny", pretrained=False, input_size=32, apn_grid=2, apn_hidden=8)
    torch.manual_seed(0)
    eager = build_model(cfg, num_classes=3).to(device).eval()
    fused = build_model(cfg, num_classes=3).to(device).eval()
    fused.compile_crop = True
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@NEEDS_CXX
@pytest.mark.parametrize("crop_from", ["previous", "source"])
def test_compile_crop_model_runs_the_cpp_kernel_on_a_cpu(monkeypatch, crop_from):
    """On a CPU ``compile_crop`` crops with the C++ kernel, never with ``torch.compile`` (slower there). In
    float64 the whole model then gives the same outputs and the same gradient for every parameter as the
    plain model: backbones, heads, fusion and the APNs, which get theirs through the kernel's backward."""
    calls = []
    monkeypatch.setattr(
        crop_cpp_module, "crop_zoom_compiled", lambda *a: pytest.fail("torch.compile on a CPU")
    )
    monkeypatch.setattr(crop_cpp_module, "crop_zoom_cpp", lambda *a: calls.append(1) or crop_zoom_cpp(*a))
    cfg = ModelConfig(
        backbone="tiny", pretrained=False, input_size=32, apn_grid=2, apn_hidden=16, crop_from=crop_from
    )
    torch.manual_seed(0)
    plain = build_model(cfg, num_classes=5).double().train()
    fused = build_model(cfg, num_classes=5).double().train()
    fused.compile_crop = True
    fused.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3, 0, 4])
    results = []
    for model in (plain, fused):
        out = model(x)
        loss = sum(F.cross_entropy(v, y) for v in out.logits.values()) + sum(b.sum() for b in out.boxes)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out, grads))
    assert len(calls) == 2  # the two crops of the compile_crop model, none of the plain one
    (out_a, grads_a), (out_b, grads_b) = results
    for u, v in zip(
        [*out_a.logits.values(), *out_a.crops], [*out_b.logits.values(), *out_b.crops], strict=True
    ):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-10)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_b.values())
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-12, rtol=1e-9, msg=name)
    assert grads_b["apns.0.fc2.weight"].abs().sum() > 0


def test_compile_crop_model_falls_back_to_the_plain_crop_without_a_compiler(monkeypatch):
    """A machine that cannot build the kernel warns once and runs the plain crop (same values)."""

    def unavailable() -> None:  # as load_crop_kernel fails: the error is remembered for the process
        error = CropKernelUnavailable("crop_zoom.cpp: cannot build the C++ crop kernel (no compiler)")
        crop_cpp_module._FAILED.append(error)
        raise error

    monkeypatch.setattr(crop_cpp_module, "_FAILED", [])
    monkeypatch.setattr(crop_cpp_module, "load_crop_kernel", unavailable)
    monkeypatch.setattr(crop_cpp_module, "crop_zoom_cpp", lambda *a: pytest.fail("the kernel is unavailable"))
    eager, fused = _compile_crop_models("cpu")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="cannot build the C\\+\\+ crop kernel.*falls back"), torch.no_grad():
        first = fused(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once, not on every batch
        with torch.no_grad():
            fused(x)
    with torch.no_grad():  # both ran the plain crop, same batch, same threads: the same arithmetic
        for u, v in zip(eager(x).crops, first.crops, strict=True):
            torch.testing.assert_close(u, v, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_crop_model_uses_the_compiled_crop_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(
        crop_cpp_module, "crop_zoom_compiled", lambda *a: calls.append(1) or crop_zoom_compiled(*a)
    )
    eager, fused = _compile_crop_models("cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        a, b = eager(x), fused(x)
    assert len(calls) == 2  # the two crops of the compile_crop model, none of the eager one
    for u, v in zip(a.crops, b.crops, strict=True):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- the C++ crop kernel


@NEEDS_CXX
def test_cpp_crop_gradcheck_and_thread_count_independence():
    """Finite differences agree with the kernel's backward (box and image), and two threads (the kernel splits
    the batch) give the same result as one."""
    gen = torch.Generator().manual_seed(11)
    image = torch.rand(3, 2, 10, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = box_from_unit(torch.rand(3, 3, generator=gen, dtype=torch.float64), 0.3, 1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda b, i: crop_zoom_cpp(i, b, 7, 3.0), (boxes, image))
    big = torch.rand(5, 3, 40, 40, generator=gen)
    bx = box_from_unit(torch.rand(5, 3, generator=gen), 0.25, 1.0).requires_grad_()
    upstream = torch.randn(5, 3, 19, 19, generator=gen)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            im = big.clone().requires_grad_()
            y = crop_zoom_cpp(im, bx, 19)
            results.append((y, *torch.autograd.grad((y * upstream).sum(), (bx, im))))
        finally:
            torch.set_num_threads(1)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@NEEDS_CXX
def test_cpp_crop_refuses_a_double_backward():
    """The backward is one kernel call: asking for second derivatives raises instead of returning a partial
    graph."""
    image = torch.rand(1, 3, 10, 10, dtype=torch.float64)
    box = torch.tensor([[0.45, 0.55, 0.3]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(crop_zoom_cpp(image, box, 5).pow(2).sum(), box, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        g.sum().backward()


@NEEDS_CXX
def test_cpp_crop_edge_cases():
    """An expanded (non-contiguous) upstream gradient, an empty batch, a 1-pixel output, a NaN box (a diverged
    APN: NaN out, no out-of-bounds read) and a CUDA tensor (refused with a clear error)."""
    image = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    box = torch.tensor([[0.4, 0.5, 0.3], [0.6, 0.4, 0.25]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(crop_zoom_cpp(image, box, 6).sum(), box)  # sum(): a stride-0 gradient
    (g_ref,) = torch.autograd.grad(crop_zoom_reference(image, box, 6).sum(), box)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)
    assert crop_zoom_cpp(image[:0], box[:0], 6).shape == (0, 3, 6, 6)
    assert crop_zoom_cpp(image, box, 0).shape == (2, 3, 0, 0)
    torch.testing.assert_close(
        crop_zoom_cpp(image, box, 1), crop_zoom_reference(image, box, 1), atol=1e-12, rtol=0
    )
    nan_box = torch.tensor([[float("nan"), 0.5, 0.3], [0.5, 0.5, 0.3]], dtype=torch.float64)
    y = crop_zoom_cpp(image, nan_box, 6)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    with pytest.raises(ValueError, match="CPU tensors"):
        crop_zoom_cpp(image.to("meta"), box.detach(), 6)
    # the raw kernel checks what it is given instead of reading out of bounds
    kernel, w = load_crop_kernel(), torch.rand(2, 6, dtype=torch.float64)
    rows, cols = torch.full((2, 6), 12, dtype=torch.int32), torch.zeros(2, 6, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the image"):
        kernel.forward(image, rows, w, w, cols, w, w)
    with pytest.raises(RuntimeError, match="int32"):
        kernel.forward(image, cols.long(), w, w, cols, w, w)


def test_ninja_from_the_cpp_extra_is_found_without_an_activated_venv(monkeypatch, tmp_path):
    """``racnn[cpp]`` installs ninja into the environment's bin folder; torch looks for it on PATH."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without ninja, as for `.venv/bin/python` unactivated
    assert shutil.which("ninja") is None
    crop_cpp_module._find_ninja()
    assert shutil.which("ninja") is not None and os.environ["PATH"].startswith(ninja.BIN_DIR)
