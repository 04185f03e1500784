// Fused SDE step and residual sums on CPU: the same contract as kernels/sde_ops.py (Triton)
// and the torch reference in g2rpo/sde.py.  mean = a*x + b*v per row; x and v have 1 row
// (shared by the group) or B rows.  Work is split over (row, column block) with
// at::parallel_for (OpenMP); inner loops are `omp simd` reductions.
//   sde_step(x, v, z, a, b, s)            -> (x_next [B, N], S [B]),  S_r = sum (x_next - mean)^2
//   residual_sums(x, v, xn, a, b)         -> S [B]
//   residual_sums_backward(x, v, xn, a, b, g) -> grad_v (shape of v): -2 g_r b_r (xn - mean), summed
//                                            over rows when v is shared
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "ops_common.h"

namespace g2rpo {
namespace {

constexpr int64_t kBlock = 8192;

// kStep: x_next = mean + s * zy is written to `out` and squared; else zy is x_next itself.
template <bool kStep, typename scalar_t, typename acc_t>
void rows_impl(const scalar_t* x, const scalar_t* v, const scalar_t* zy, acc_t* out, const acc_t* a, const acc_t* b,
               const acc_t* s, acc_t* part, int64_t B, int64_t N, bool xs, bool vs, int64_t nb) {
  at::parallel_for(0, B * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / nb, lo = (i % nb) * kBlock, hi = std::min(N, lo + kBlock);
      const scalar_t* xr = x + (xs ? 0 : r * N);
      const scalar_t* vr = v + (vs ? 0 : r * N);
      const scalar_t* yr = zy + r * N;
      acc_t* o = kStep ? out + r * N : nullptr;
      const acc_t ar = a[r], br = b[r], sr = kStep ? s[r] : acc_t(0);
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t n = lo; n < hi; ++n) {
        const acc_t mean = ar * static_cast<acc_t>(xr[n]) + br * static_cast<acc_t>(vr[n]);
        acc_t d;
        if constexpr (kStep) {
          const acc_t xn = mean + sr * static_cast<acc_t>(yr[n]);
          o[n] = xn;
          d = xn - mean;
        } else {
          d = static_cast<acc_t>(yr[n]) - mean;
        }
        sum += d * d;
      }
      part[i] = sum;
    }
  });
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const scalar_t* x, const scalar_t* v, const scalar_t* xn, const acc_t* a, const acc_t* b,
              const acc_t* g, scalar_t* gv, int64_t B, int64_t N, bool xs, bool vs) {
  const int64_t nb = (N + kBlock - 1) / kBlock;
  if (vs) {  // shared v: each column block sums the group's rows, reading v once
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t lo = blk * kBlock, hi = std::min(N, lo + kBlock);
        for (int64_t n = lo; n < hi; ++n) gv[n] = static_cast<scalar_t>(0);
        std::vector<acc_t> acc(hi - lo, acc_t(0));
        for (int64_t r = 0; r < B; ++r) {
          const scalar_t* xr = x + (xs ? 0 : r * N);
          const scalar_t* yr = xn + r * N;
          const acc_t ar = a[r], br = b[r], cr = acc_t(-2) * g[r] * b[r];
#pragma omp simd
          for (int64_t n = lo; n < hi; ++n) {
            const acc_t d = static_cast<acc_t>(yr[n]) - (ar * static_cast<acc_t>(xr[n]) + br * static_cast<acc_t>(v[n]));
            acc[n - lo] += cr * d;
          }
        }
        for (int64_t n = lo; n < hi; ++n) gv[n] = static_cast<scalar_t>(acc[n - lo]);
      }
    });
  } else {
    at::parallel_for(0, B * nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / nb, lo = (i % nb) * kBlock, hi = std::min(N, lo + kBlock);
        const scalar_t* xr = x + (xs ? 0 : r * N);
        const scalar_t* vr = v + r * N;
        const scalar_t* yr = xn + r * N;
        scalar_t* o = gv + r * N;
        const acc_t ar = a[r], br = b[r], cr = acc_t(-2) * g[r] * b[r];
#pragma omp simd
        for (int64_t n = lo; n < hi; ++n) {
          const acc_t d = static_cast<acc_t>(yr[n]) - (ar * static_cast<acc_t>(xr[n]) + br * static_cast<acc_t>(vr[n]));
          o[n] = static_cast<scalar_t>(cr * d);
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> sde_step(const at::Tensor& x, const at::Tensor& v, const at::Tensor& z,
                                            const at::Tensor& a, const at::Tensor& b, const at::Tensor& s) {
  Rows r = prepare("sde_step", x, v, z, a, b, s);
  const int64_t nb = (r.N + kBlock - 1) / kBlock;
  auto out = at::empty({r.B, r.N}, r.y.options().dtype(r.acc));
  auto part = at::empty({r.B, nb}, r.y.options().dtype(r.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.dtype, "sde_step", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    rows_impl<true, scalar_t, acc_t>(r.x.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), r.y.data_ptr<scalar_t>(),
                                     out.data_ptr<acc_t>(), r.a.data_ptr<acc_t>(), r.b.data_ptr<acc_t>(),
                                     r.c.data_ptr<acc_t>(), part.data_ptr<acc_t>(), r.B, r.N,
                                     r.x_shared && r.B > 1, r.v_shared && r.B > 1, nb);
  });
  return {out, part.sum(1)};
}

at::Tensor residual_sums(const at::Tensor& x, const at::Tensor& v, const at::Tensor& xn, const at::Tensor& a,
                         const at::Tensor& b) {
  Rows r = prepare("residual_sums", x, v, xn, a, b);
  const int64_t nb = (r.N + kBlock - 1) / kBlock;
  auto part = at::empty({r.B, nb}, r.y.options().dtype(r.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.dtype, "residual_sums", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    rows_impl<false, scalar_t, acc_t>(r.x.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), r.y.data_ptr<scalar_t>(),
                                      nullptr, r.a.data_ptr<acc_t>(), r.b.data_ptr<acc_t>(), nullptr,
                                      part.data_ptr<acc_t>(), r.B, r.N, r.x_shared && r.B > 1,
                                      r.v_shared && r.B > 1, nb);
  });
  return part.sum(1);
}

at::Tensor residual_sums_backward(const at::Tensor& x, const at::Tensor& v, const at::Tensor& xn,
                                  const at::Tensor& a, const at::Tensor& b, const at::Tensor& g) {
  Rows r = prepare("residual_sums_backward", x, v, xn, a, b, g);
  auto gv = at::empty({r.v.size(0), r.N}, r.y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.dtype, "residual_sums_backward", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    bwd_impl<scalar_t, acc_t>(r.x.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), r.y.data_ptr<scalar_t>(),
                              r.a.data_ptr<acc_t>(), r.b.data_ptr<acc_t>(), r.c.data_ptr<acc_t>(),
                              gv.data_ptr<scalar_t>(), r.B, r.N, r.x_shared && r.B > 1, r.v_shared);
  });
  return gv.to(v.scalar_type());
}

}  // namespace
}  // namespace g2rpo

TORCH_LIBRARY(g2rpo_C, m) {
  m.def("sde_step(Tensor x, Tensor v, Tensor z, Tensor a, Tensor b, Tensor s) -> (Tensor, Tensor)");
  m.def("residual_sums(Tensor x, Tensor v, Tensor xn, Tensor a, Tensor b) -> Tensor");
  m.def("residual_sums_backward(Tensor x, Tensor v, Tensor xn, Tensor a, Tensor b, Tensor g) -> Tensor");
}

TORCH_LIBRARY_IMPL(g2rpo_C, CPU, m) {
  m.impl("sde_step", &g2rpo::sde_step);
  m.impl("residual_sums", &g2rpo::residual_sums);
  m.impl("residual_sums_backward", &g2rpo::residual_sums_backward);
}

// A plain Python module so that `import g2rpo._C` loads the library (and registers the ops).
static struct PyModuleDef g2rpo_c_module = {PyModuleDef_HEAD_INIT, "_C", "g2rpo's C++ ops (torch.ops.g2rpo_C)", -1,
                                            nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&g2rpo_c_module);
#ifdef G2RPO_WITH_CUDA
  if (m) PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  if (m) PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
