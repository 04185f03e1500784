// Shared by sde_ops.cpp (CPU) and sde_ops_cuda.cu (CUDA): argument checks and the one-time
// conversion of an op's inputs (x, v to the rows' dtype; per-row coefficients to the
// accumulation dtype: float, or double for double rows).
#pragma once
#include <ATen/ATen.h>

namespace g2rpo {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

struct Rows {
  at::Tensor x, v, y;  // y: the noise (sde_step) or x_next (residual sums)
  at::Tensor a, b, c;  // c: std (sde_step), the incoming gradient (backward) or undefined
  at::ScalarType dtype, acc;
  int64_t B, N;
  bool x_shared, v_shared;  // one row for the whole group (only meaningful when B > 1)
};

inline Rows prepare(const char* what, const at::Tensor& x, const at::Tensor& v, const at::Tensor& y,
                    const at::Tensor& a, const at::Tensor& b, const at::Tensor& c = at::Tensor()) {
  TORCH_CHECK(y.dim() == 2, what, ": expected [B, N] rows");
  TORCH_CHECK(x.dim() == 2 && v.dim() == 2 && x.size(1) == y.size(1) && v.size(1) == y.size(1), what,
              ": x and v must be [1 or B, N] with the rows' N");
  TORCH_CHECK(x.size(0) == 1 || x.size(0) == y.size(0), what, ": x must have 1 or B rows");
  TORCH_CHECK(v.size(0) == 1 || v.size(0) == y.size(0), what, ": v must have 1 or B rows");
  Rows r;
  r.dtype = y.scalar_type();
  r.acc = r.dtype == at::kDouble ? at::kDouble : at::kFloat;
  r.x = x.to(r.dtype).contiguous();
  r.v = v.to(r.dtype).contiguous();
  r.y = y.contiguous();
  r.a = a.to(r.acc).contiguous();
  r.b = b.to(r.acc).contiguous();
  if (c.defined()) r.c = c.to(r.acc).contiguous();
  r.B = y.size(0);
  r.N = y.size(1);
  r.x_shared = x.size(0) == 1;
  r.v_shared = v.size(0) == 1;
  return r;
}

}  // namespace g2rpo
