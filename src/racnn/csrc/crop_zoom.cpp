// Separable two-tap sampling for racnn's crop-and-zoom on the CPU (racnn.crop_cpp, model.compile_crop).
//
//   out[b,c,y,x] = sum_{i,j in {0,1}} wy_i[b,y] * wx_j[b,x] * img[b,c, ry_i[b,y], cx_j[b,x]]
//
// with ry_0 = ry, ry_1 = min(ry + 1, H - 1) (and the same for cx): the boxcar-masked bilinear zoom of
// racnn.attention.crop_zoom, whose tap weights wy_i, wx_j (bilinear fraction times the mask at the tap, Eqs. 4-6)
// are computed by autograd in Python. This file only does the heavy, memory-bound part: the taps over the
// B x C x out x out output, and in the backward the tap weights' gradients (and the image's when it needs one).
//
// The sample rows ry[b, :] of a box (half side > 0) never decrease, so each *source* row r is visited in one run of
// output rows (were they to decrease, a row would be gathered again: slower, still exact). Its two column taps are
// gathered once per run (q0[x] = img[r, cx_0[x]], q1[x] = img[r, cx_1[x]]), and everything per output row is a
// contiguous, vectorisable loop over x. The backward accumulates, per source row, the upstream gradient weighted by
// that row's tap weight (d[x]) and turns it into the column weights' gradients when the run ends. No full-resolution
// tensor is made (except the image gradient, when asked for).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

// Source row r of sample b, all channels, gathered at the output columns: q_j[c][x] = img[b, c, r, cx_j[x]], and
// its horizontal interpolation h[c][x] = wx_0[x] q_0[c][x] + wx_1[x] q_1[c][x]. d: the backward's accumulator
// over the row's run of output rows y, d[c][x] = sum_y wy(y) grad_out[b, c, y, x]. Each array is C x OX.
template <typename T>
struct Row {
  int64_t r = -1;
  std::vector<T> q0, q1, h, d;
  explicit Row(int64_t n) : q0(n), q1(n), h(n), d(n, T(0)) {}
};

// Sample b: its image, its column taps and weights. NC: the channel count when known at compile time (3),
// else 0 and C is read at run time; the column index and weights are loaded once for all channels.
template <typename T, int NC>
struct Sample {
  const T* img;  // img[b]
  int64_t C, sc, sh, sw, OX;
  const int32_t* __restrict__ k0;  // OX source columns of tap 0
  const int32_t* __restrict__ k1;  // and of tap 1 = min(k0 + 1, W - 1), as the Python side's i1
  const T* __restrict__ wx0;       // OX column weights
  const T* __restrict__ wx1;
  int64_t channels() const { return NC ? NC : C; }
  void gather(Row<T>& t, int64_t r, bool keep_taps) const {
    const int64_t nc = channels();
    const T* p = img + r * sh;
    T* __restrict__ q0 = t.q0.data();
    T* __restrict__ q1 = t.q1.data();
    T* __restrict__ h = t.h.data();
    for (int64_t x = 0; x < OX; ++x) {
      const int64_t i0 = k0[x] * sw, i1 = k1[x] * sw;
      const T w0 = wx0[x], w1 = wx1[x];
      for (int64_t c = 0; c < nc; ++c) {
        const T v0 = p[c * sc + i0], v1 = p[c * sc + i1];
        h[c * OX + x] = w0 * v0 + w1 * v1;
        if (keep_taps) {  // the backward needs the taps themselves (the column weights' gradients)
          q0[c * OX + x] = v0;
          q1[c * OX + x] = v1;
        }
      }
    }
    t.r = r;
  }
};

// Makes a[0] hold source row r and a[1] row r1 (r1 == r at the bottom edge, then a[1] is unused). Rows only
// grow with y, so a row that leaves the pair is finished: `done` is called on it first (the backward's flush).
template <typename T, typename S, typename Done>
inline void advance(Row<T>* a[2], const S& smp, int64_t r, int64_t r1, bool keep_taps, Done&& done) {
  if (a[0]->r != r) {
    if (a[0]->r >= 0) done(*a[0]);
    if (a[1]->r == r) {
      std::swap(a[0], a[1]);
    } else {
      if (a[1]->r >= 0) done(*a[1]);
      smp.gather(*a[0], r, keep_taps);
    }
    a[1]->r = -1;
  }
  if (r1 != r && a[1]->r != r1) {
    if (a[1]->r >= 0) done(*a[1]);
    smp.gather(*a[1], r1, keep_taps);
  }
}

struct Shapes {
  int64_t B, C, H, W, OY, OX, sb, sc, sh, sw;
  Shapes(const at::Tensor& img, const at::Tensor& ry, const at::Tensor& cx)
      : B(img.size(0)),
        C(img.size(1)),
        H(img.size(2)),
        W(img.size(3)),
        OY(ry.size(1)),
        OX(cx.size(1)),
        sb(img.stride(0)),
        sc(img.stride(1)),
        sh(img.stride(2)),
        sw(img.stride(3)) {}
  template <typename T, int NC>
  Sample<T, NC> sample(const T* I, int64_t b, const int32_t* CX, const std::vector<int32_t>& k1, const T* WX0,
                       const T* WX1) const {
    return {I + b * sb, C, sc, sh, sw, OX, CX + b * OX, k1.data(), WX0 + b * OX, WX1 + b * OX};
  }
};

template <typename T>
struct Taps {  // the raw pointers of the kernel's inputs: image, row taps, column taps
  const T* I;
  const int32_t *RY, *CX;
  const T *WY0, *WY1, *WX0, *WX1;
  Taps(const at::Tensor& img, const at::Tensor& ry, const at::Tensor& wy0, const at::Tensor& wy1, const at::Tensor& cx,
       const at::Tensor& wx0, const at::Tensor& wx1)
      : I(img.data_ptr<T>()),
        RY(ry.data_ptr<int32_t>()),
        CX(cx.data_ptr<int32_t>()),
        WY0(wy0.data_ptr<T>()),
        WY1(wy1.data_ptr<T>()),
        WX0(wx0.data_ptr<T>()),
        WX1(wx1.data_ptr<T>()) {}
};

inline void second_tap(const int32_t* k0, int64_t n, int64_t W, std::vector<int32_t>& k1) {
  for (int64_t x = 0; x < n; ++x) k1[x] = static_cast<int32_t>(std::min<int64_t>(k0[x] + 1, W - 1));
}

// Runs body(b, sample, rows, k1) for every sample b of the batch, in parallel over samples (each sample owns
// its output and gradient slices: no two tasks write the same element). rows: the two cached source rows,
// empty at the start of each sample; k1: the sample's second column tap.
template <typename T, int NC, typename Body>
void each_sample(const Shapes& s, const Taps<T>& tp, Body&& body) {
  at::parallel_for(0, s.B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int32_t> k1(s.OX);
    Row<T> ta(s.C * s.OX), tb(s.C * s.OX);
    for (int64_t b = lo; b < hi; ++b) {
      second_tap(tp.CX + b * s.OX, s.OX, s.W, k1);
      const auto smp = s.sample<T, NC>(tp.I, b, tp.CX, k1, tp.WX0, tp.WX1);
      Row<T>* rows[2] = {&ta, &tb};
      ta.r = tb.r = -1;
      body(b, smp, rows, k1);
    }
  });
}

template <typename T, int NC>
void forward_kernel(const at::Tensor& img, const at::Tensor& ry, const at::Tensor& wy0, const at::Tensor& wy1,
                    const at::Tensor& cx, const at::Tensor& wx0, const at::Tensor& wx1, at::Tensor& out) {
  const Shapes s(img, ry, cx);
  const Taps<T> tp(img, ry, wy0, wy1, cx, wx0, wx1);
  T* O = out.data_ptr<T>();
  each_sample<T, NC>(s, tp, [&](int64_t b, const Sample<T, NC>& smp, Row<T>** a, const std::vector<int32_t>&) {
    const int64_t nc = smp.channels();
    for (int64_t y = 0; y < s.OY; ++y) {
      const int64_t r = tp.RY[b * s.OY + y], r1 = std::min(r + 1, s.H - 1);
      advance(a, smp, r, r1, false, [](Row<T>&) {});
      const T a0 = tp.WY0[b * s.OY + y], a1 = tp.WY1[b * s.OY + y];
      for (int64_t c = 0; c < nc; ++c) {
        const T* __restrict__ h0 = a[0]->h.data() + c * s.OX;
        const T* __restrict__ h1 = (r1 == r ? a[0] : a[1])->h.data() + c * s.OX;
        T* __restrict__ o = O + ((b * nc + c) * s.OY + y) * s.OX;
        for (int64_t x = 0; x < s.OX; ++x) o[x] = a0 * h0[x] + a1 * h1[x];
      }
    }
  });
}

template <typename T, int NC>
void backward_kernel(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& ry, const at::Tensor& wy0,
                     const at::Tensor& wy1, const at::Tensor& cx, const at::Tensor& wx0, const at::Tensor& wx1,
                     at::Tensor& gy0, at::Tensor& gy1, at::Tensor& gx0, at::Tensor& gx1, at::Tensor* gimg) {
  const Shapes s(img, ry, cx);
  const Taps<T> tp(img, ry, wy0, wy1, cx, wx0, wx1);
  const T* G = grad.data_ptr<T>();
  T *GY0 = gy0.data_ptr<T>(), *GY1 = gy1.data_ptr<T>(), *GX0 = gx0.data_ptr<T>(), *GX1 = gx1.data_ptr<T>();
  T* GI = gimg ? gimg->data_ptr<T>() : nullptr;  // contiguous B x C x H x W
  each_sample<T, NC>(s, tp, [&](int64_t b, const Sample<T, NC>& smp, Row<T>** a, const std::vector<int32_t>& k1) {
    const int64_t nc = smp.channels();
    const int32_t* k0 = tp.CX + b * s.OX;
    const T *wx0 = tp.WX0 + b * s.OX, *wx1 = tp.WX1 + b * s.OX;
    T* __restrict__ gx0 = GX0 + b * s.OX;
    T* __restrict__ gx1 = GX1 + b * s.OX;
    // A finished source row: out = sum_y wy(y) (wx_0 q_0 + wx_1 q_1), so d out / d wx_j[x] = sum_c d q_j,
    // and the image gets wx_j[x] d[c][x] at (c, r, cx_j[x]).
    auto flush = [&](Row<T>& t) {
      for (int64_t c = 0; c < nc; ++c) {
        const T* __restrict__ d = t.d.data() + c * s.OX;
        const T* __restrict__ q0 = t.q0.data() + c * s.OX;
        const T* __restrict__ q1 = t.q1.data() + c * s.OX;
        for (int64_t x = 0; x < s.OX; ++x) {
          gx0[x] += d[x] * q0[x];
          gx1[x] += d[x] * q1[x];
        }
        if (GI) {
          T* gr = GI + ((b * nc + c) * s.H + t.r) * s.W;
          for (int64_t x = 0; x < s.OX; ++x) {
            gr[k0[x]] += wx0[x] * d[x];
            gr[k1[x]] += wx1[x] * d[x];
          }
        }
      }
      std::fill(t.d.begin(), t.d.end(), T(0));
      t.r = -1;
    };
    for (int64_t y = 0; y < s.OY; ++y) {
      const int64_t r = tp.RY[b * s.OY + y], r1 = std::min(r + 1, s.H - 1);
      advance(a, smp, r, r1, true, flush);
      Row<T>& t0 = *a[0];
      Row<T>& t1 = (r1 == r) ? *a[0] : *a[1];
      const T a0 = tp.WY0[b * s.OY + y], a1 = tp.WY1[b * s.OY + y];
      T s0 = 0, s1 = 0;  // d out / d wy_i[y] = sum_{c,x} grad[c, y, x] h_i[c][x]
      for (int64_t c = 0; c < nc; ++c) {
        const T* __restrict__ gy = G + ((b * nc + c) * s.OY + y) * s.OX;
        const T* __restrict__ h0 = t0.h.data() + c * s.OX;
        const T* __restrict__ h1 = t1.h.data() + c * s.OX;
#pragma omp simd reduction(+ : s0, s1)
        for (int64_t x = 0; x < s.OX; ++x) {
          s0 += gy[x] * h0[x];
          s1 += gy[x] * h1[x];
        }
        T* d0 = t0.d.data() + c * s.OX;
        T* d1 = t1.d.data() + c * s.OX;
        for (int64_t x = 0; x < s.OX; ++x) d0[x] += a0 * gy[x];
        for (int64_t x = 0; x < s.OX; ++x) d1[x] += a1 * gy[x];
      }
      GY0[b * s.OY + y] += s0;
      GY1[b * s.OY + y] += s1;
    }
    if (a[0]->r >= 0) flush(*a[0]);
    if (a[1]->r >= 0) flush(*a[1]);
  });
}

}  // namespace

// The Python side (racnn/crop_cpp.py) builds these; a misuse is an error, not an out-of-bounds read.
void check_inputs(const at::Tensor& img, const at::Tensor& ry, const at::Tensor& wy0, const at::Tensor& wy1,
                  const at::Tensor& cx, const at::Tensor& wx0, const at::Tensor& wx1) {
  TORCH_CHECK(img.device().is_cpu() && img.dim() == 4, "racnn crop kernel: image must be a 4-D CPU tensor");
  TORCH_CHECK(img.size(2) > 0 && img.size(3) > 0, "racnn crop kernel: empty image");
  const int64_t B = img.size(0);
  for (const auto* t : {&ry, &cx}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->dim() == 2 && t->size(0) == B,
                "racnn crop kernel: indices must be contiguous int32 B x out");
  }
  for (const auto* t : {&wy0, &wy1, &wx0, &wx1}) {
    TORCH_CHECK(t->scalar_type() == img.scalar_type() && t->is_contiguous(),
                "racnn crop kernel: weights must be contiguous, in the image's dtype");
  }
  TORCH_CHECK(
      wy0.sizes() == ry.sizes() && wy1.sizes() == ry.sizes() && wx0.sizes() == cx.sizes() && wx1.sizes() == cx.sizes(),
      "racnn crop kernel: weights and indices differ in shape");
  TORCH_CHECK(ry.numel() == 0 || cx.numel() == 0 ||
                  (ry.min().item<int32_t>() >= 0 && ry.max().item<int32_t>() < img.size(2) &&
                   cx.min().item<int32_t>() >= 0 && cx.max().item<int32_t>() < img.size(3)),
              "racnn crop kernel: a tap index lies outside the image");
}

at::Tensor forward(const at::Tensor& img, const at::Tensor& ry, const at::Tensor& wy0, const at::Tensor& wy1,
                   const at::Tensor& cx, const at::Tensor& wx0, const at::Tensor& wx1) {
  check_inputs(img, ry, wy0, wy1, cx, wx0, wx1);
  auto out = at::empty({img.size(0), img.size(1), ry.size(1), cx.size(1)}, img.options());
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "racnn_crop_forward", [&] {
    if (img.size(1) == 3) {
      forward_kernel<scalar_t, 3>(img, ry, wy0, wy1, cx, wx0, wx1, out);
    } else {
      forward_kernel<scalar_t, 0>(img, ry, wy0, wy1, cx, wx0, wx1, out);
    }
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& ry,
                                 const at::Tensor& wy0, const at::Tensor& wy1, const at::Tensor& cx,
                                 const at::Tensor& wx0, const at::Tensor& wx1, bool image_grad) {
  check_inputs(img, ry, wy0, wy1, cx, wx0, wx1);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == img.scalar_type() && grad.dim() == 4 &&
                  grad.size(0) == img.size(0) && grad.size(1) == img.size(1) && grad.size(2) == ry.size(1) &&
                  grad.size(3) == cx.size(1),
              "racnn crop kernel: the output gradient must be contiguous B x C x out x out, in the image's dtype");
  auto gy0 = at::zeros_like(wy0), gy1 = at::zeros_like(wy1), gx0 = at::zeros_like(wx0), gx1 = at::zeros_like(wx1);
  at::Tensor gimg = image_grad ? at::zeros(img.sizes(), img.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "racnn_crop_backward", [&] {
    at::Tensor* gi = image_grad ? &gimg : nullptr;
    if (img.size(1) == 3) {
      backward_kernel<scalar_t, 3>(grad, img, ry, wy0, wy1, cx, wx0, wx1, gy0, gy1, gx0, gx1, gi);
    } else {
      backward_kernel<scalar_t, 0>(grad, img, ry, wy0, wy1, cx, wx0, wx1, gy0, gy1, gx0, gx1, gi);
    }
  });
  return {gy0, gy1, gx0, gx1, gimg};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "separable two-tap crop, forward");
  m.def("backward", &backward, "separable two-tap crop, backward");
}
