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

namespace g2rpo {
namespace {

constexpr int64_t kBlock = 8192;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

void check(const at::Tensor& x, const at::Tensor& v, const at::Tensor& rows, const char* what) {
  TORCH_CHECK(rows.dim() == 2, what, ": expected [B, N] rows");
  TORCH_CHECK(x.dim() == 2 && v.dim() == 2 && x.size(1) == rows.size(1) && v.size(1) == rows.size(1), what,
              ": x and v must be [1 or B, N] with the rows' N");
  TORCH_CHECK(x.size(0) == 1 || x.size(0) == rows.size(0), what, ": x must have 1 or B rows");
  TORCH_CHECK(v.size(0) == 1 || v.size(0) == rows.size(0), what, ": v must have 1 or B rows");
}

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

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> sde_step(const at::Tensor& x_, const at::Tensor& v_, const at::Tensor& z_,
                                            const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& s_) {
  check(x_, v_, z_, "sde_step");
  const auto st = z_.scalar_type();
  const auto at_ = acc_type(st);
  auto x = x_.to(st).contiguous(), v = v_.to(st).contiguous(), z = z_.contiguous();
  auto a = a_.to(at_).contiguous(), b = b_.to(at_).contiguous(), s = s_.to(at_).contiguous();
  const int64_t B = z.size(0), N = z.size(1), nb = (N + kBlock - 1) / kBlock;
  auto out = at::empty({B, N}, z.options().dtype(at_));
  auto part = at::empty({B, nb}, z.options().dtype(at_));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "sde_step", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    rows_impl<true, scalar_t, acc_t>(x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                     out.data_ptr<acc_t>(), a.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
                                     s.data_ptr<acc_t>(), part.data_ptr<acc_t>(), B, N, x.size(0) == 1 && B > 1,
                                     v.size(0) == 1 && B > 1, nb);
  });
  return {out, part.sum(1)};
}

at::Tensor residual_sums(const at::Tensor& x_, const at::Tensor& v_, const at::Tensor& xn_, const at::Tensor& a_,
                         const at::Tensor& b_) {
  check(x_, v_, xn_, "residual_sums");
  const auto st = xn_.scalar_type();
  const auto at_ = acc_type(st);
  auto x = x_.to(st).contiguous(), v = v_.to(st).contiguous(), xn = xn_.contiguous();
  auto a = a_.to(at_).contiguous(), b = b_.to(at_).contiguous();
  const int64_t B = xn.size(0), N = xn.size(1), nb = (N + kBlock - 1) / kBlock;
  auto part = at::empty({B, nb}, xn.options().dtype(at_));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "residual_sums", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    rows_impl<false, scalar_t, acc_t>(x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), xn.data_ptr<scalar_t>(),
                                      nullptr, a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), nullptr,
                                      part.data_ptr<acc_t>(), B, N, x.size(0) == 1 && B > 1,
                                      v.size(0) == 1 && B > 1, nb);
  });
  return part.sum(1);
}

at::Tensor residual_sums_backward(const at::Tensor& x_, const at::Tensor& v_, const at::Tensor& xn_,
                                  const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& g_) {
  check(x_, v_, xn_, "residual_sums_backward");
  const auto st = xn_.scalar_type();
  const auto at_ = acc_type(st);
  auto x = x_.to(st).contiguous(), v = v_.to(st).contiguous(), xn = xn_.contiguous();
  auto a = a_.to(at_).contiguous(), b = b_.to(at_).contiguous(), g = g_.to(at_).contiguous();
  const int64_t B = xn.size(0), N = xn.size(1);
  auto gv = at::empty({v.size(0), N}, xn.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "residual_sums_backward", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    bwd_impl<scalar_t, acc_t>(x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), xn.data_ptr<scalar_t>(),
                              a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), g.data_ptr<acc_t>(), gv.data_ptr<scalar_t>(),
                              B, N, x.size(0) == 1 && B > 1, v.size(0) == 1);
  });
  return gv.to(v_.scalar_type());
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
