"""The crop-and-zoom as one C++ kernel for CPU tensors (``runtime.compile_crop`` on a CPU).

:func:`racnn.attention.crop_zoom` is a ``grid_sample`` plus a few whole-output passes for the gains and their
gradients; on a CPU each pass is a sweep through memory. Here the same crop (Eqs. 3-6) is one pass forward and
one backward (``csrc/crop_zoom.cpp``): the box arithmetic stays in PyTorch on B x out tensors
(:func:`racnn.attention.box_taps`, so autograd carries the gradient from the tap weights to the box), and the
kernel does the separable two-tap sampling over the B x C x out x out output and its backward. Same values and
gradients as the literal reference (tests/test_fast_paths.py). First derivatives only: the backward is
one kernel call, marked ``once_differentiable`` (a double backward raises instead of being silently wrong).

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (about 30 s; it needs a C++ compiler
and ninja, ``pip install 'racnn[cpp]'``) and cached in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes
load it in well under a second. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from .attention import box_taps, crop_zoom, crop_zoom_compiled, crop_zoom_gather

SOURCE = Path(__file__).with_name("csrc") / "crop_zoom.cpp"
# -fopenmp-simd: the kernel's dot products vectorise without -ffast-math (gcc and clang; MSVC has no such flag)
CFLAGS = ["/O2"] if sys.platform == "win32" else ["-O3", "-fopenmp-simd"]


class CropKernelUnavailable(RuntimeError):
    """The C++ crop kernel could not be built or loaded here (no compiler, no ninja, a failed build)."""


_FAILED: list[CropKernelUnavailable] = []  # a failed build is not retried on every call


def _find_ninja() -> None:
    """torch runs ``ninja`` from PATH; ``pip install ninja`` (``racnn[cpp]``) puts it in the environment's bin
    folder, which is not on PATH when a venv's python is run without activating the venv."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja  # type: ignore[import-not-found]

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _announce_first_build(cpp_extension: ModuleType) -> None:
    """A line on stderr before the 30 s first build, so that a training start does not look hung."""
    try:  # a private helper of torch's; the message is a courtesy, never a failure
        build_dir = Path(cpp_extension._get_build_directory("racnn_crop_zoom", verbose=False))
    except Exception:
        return
    if not any(build_dir.glob("*.so")) and not any(build_dir.glob("*.pyd")):
        print(f"racnn: building the C++ crop kernel in {build_dir} (once, about 30 s)", file=sys.stderr)


def build_failed() -> bool:
    """Whether this process already failed to build the kernel (:func:`load_crop_kernel` then raises at once)."""
    return bool(_FAILED)


@functools.cache
def load_crop_kernel() -> ModuleType:
    """Build (first use, ~30 s) or load (cached) the kernel; raises :class:`CropKernelUnavailable`, at once
    after a first failure in this process."""
    if _FAILED:
        raise _FAILED[0]
    # the import logs a CUDA_HOME warning on machines without CUDA; it concerns CUDA builds, not this one
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        _find_ninja()
        cpp_extension.verify_ninja_availability()
        _announce_first_build(cpp_extension)
        return cpp_extension.load(
            name="racnn_crop_zoom", sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False
        )
    except Exception as e:  # a missing compiler surfaces as RuntimeError, OSError or a subprocess error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        error = CropKernelUnavailable(
            f"{SOURCE}: cannot build the C++ crop kernel ({first}); it needs a C++ compiler and ninja "
            "(pip install 'racnn[cpp]')"
        )
        _FAILED.append(error)
        raise error from e
    finally:
        ext_log.setLevel(level)


class _SeparableTaps(torch.autograd.Function):
    """``out[b, c, y, x] = sum_ij wy_i[b, y] wx_j[b, x] image[b, c, ry_i[b, y], cx_j[b, x]]`` with
    ``ry_1 = min(ry_0 + 1, H - 1)`` (and so for columns); gradients for the weights and, when asked, the image.
    Indices are int32, B x out; weights B x out in the image's dtype."""

    @staticmethod
    def forward(ctx, image, ry, wy0, wy1, cx, wx0, wx1):  # type: ignore[override]
        ctx.save_for_backward(image, ry, wy0, wy1, cx, wx0, wx1)
        return load_crop_kernel().forward(image, ry, wy0, wy1, cx, wx0, wx1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        image, ry, wy0, wy1, cx, wx0, wx1 = ctx.saved_tensors
        want_image = ctx.needs_input_grad[0]
        gy0, gy1, gx0, gx1, gimg = load_crop_kernel().backward(
            grad.contiguous(), image, ry, wy0, wy1, cx, wx0, wx1, want_image
        )
        return (gimg if want_image else None), None, gy0, gy1, None, gx0, gx1


def crop_zoom_cpp(image: torch.Tensor, box: torch.Tensor, out: int, k: float = 10.0) -> torch.Tensor:
    """:func:`racnn.attention.crop_zoom` through the C++ kernel: B x C x H x W CPU image, B x 3 box ->
    B x C x out x out, same values and gradients (box and image). As there, the box arithmetic runs in at least
    float32, a bf16/fp16 image is sampled in float32 and cast back, and channels_last in gives channels_last
    out. Raises :class:`CropKernelUnavailable` when the kernel cannot be built, ``ValueError`` for a non-CPU
    tensor."""
    if image.device.type != "cpu" or box.device.type != "cpu":
        raise ValueError(f"crop_zoom_cpp runs on CPU tensors, got {image.device} and {box.device}")
    load_crop_kernel()  # fail here, before any autograd node exists
    _, _, h, w = image.shape
    dtype = torch.promote_types(image.dtype, torch.float32)
    box = box.to(torch.promote_types(box.dtype, dtype))
    (r0, _, wr0, wr1), (c0, _, wc0, wc1) = box_taps(box, h, w, out, k)  # B x out each
    ry, cx = r0.to(torch.int32).contiguous(), c0.to(torch.int32).contiguous()
    wy0, wy1, wx0, wx1 = (t.to(dtype).contiguous() for t in (wr0, wr1, wc0, wc1))
    crop = _SeparableTaps.apply(image.to(dtype), ry, wy0, wy1, cx, wx0, wx1)  # B x C x out x out, contiguous
    if image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
        crop = crop.contiguous(memory_format=torch.channels_last)
    return crop.to(image.dtype)


def crop_function(compile_crop: bool, images: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The crop-and-zoom this forward runs. ``compile_crop``: ``torch.compile`` of it on CUDA, the C++ kernel on a
    CPU (this module; built on first use, the plain crop with one warning where it cannot be built).
    A forward that is itself being traced runs a crop whose graph the tracer can read: ``torch.export`` (the
    ONNX export) the two-tap gathers (:func:`racnn.attention.crop_zoom_gather`), which onnxruntime runs in
    about 70% of its ``GridSample``'s time (docs/performance.md); torch.compile of the whole model and a
    TorchScript trace the plain crop. All give the same values and gradients."""
    if getattr(torch.compiler, "is_exporting", lambda: False)():  # torch >= 2.6
        return crop_zoom_gather
    if not compile_crop or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return crop_zoom
    if images.is_cuda:
        return crop_zoom_compiled
    if images.device.type != "cpu" or build_failed():  # a failed build has warned once already
        return crop_zoom
    try:
        load_crop_kernel()
    except CropKernelUnavailable as e:
        warnings.warn(
            f"{e}; runtime.compile_crop falls back to the plain crop (same values, slower)", stacklevel=3
        )
        return crop_zoom
    return crop_zoom_cpp
