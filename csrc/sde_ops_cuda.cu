// CUDA versions of the ops in sde_ops.cpp (same contract; built only with G2RPO_BUILD_CUDA=1).
// One thread block per column tile; each block loops over the rows, so a shared x/v tile is
// read once per tile, and a row longer than one tile is spread over many blocks (12 rows
// still fill the GPU). Per-(row, tile) partial sums are reduced with at::sum.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ops_common.h"

namespace g2rpo {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // elements per thread per tile
constexpr int kTile = kThreads * kItems;

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t shared[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  __syncthreads();
  return v;
}

template <typename scalar_t, typename acc_t, bool kStep>
__global__ void rows_kernel(const scalar_t* x, const scalar_t* v, const scalar_t* zy, acc_t* out, const acc_t* a,
                            const acc_t* b, const acc_t* s, acc_t* part, int64_t B, int64_t N, int64_t xs,
                            int64_t vs) {
  const int64_t tile = blockIdx.x, n_tiles = gridDim.x;
  for (int64_t r = 0; r < B; ++r) {
    acc_t sum = 0;
    for (int i = 0; i < kItems; ++i) {
      const int64_t n = tile * kTile + i * kThreads + threadIdx.x;
      if (n < N) {
        const acc_t mean = a[r] * static_cast<acc_t>(x[r * xs + n]) + b[r] * static_cast<acc_t>(v[r * vs + n]);
        acc_t d;
        if (kStep) {
          const acc_t xn = mean + s[r] * static_cast<acc_t>(zy[r * N + n]);
          out[r * N + n] = xn;
          d = xn - mean;
        } else {
          d = static_cast<acc_t>(zy[r * N + n]) - mean;
        }
        sum += d * d;
      }
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) part[r * n_tiles + tile] = sum;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_kernel(const scalar_t* x, const scalar_t* v, const scalar_t* xn, const acc_t* a, const acc_t* b,
                           const acc_t* g, scalar_t* gv, int64_t B, int64_t N, int64_t xs, int64_t vs) {
  for (int i = 0; i < kItems; ++i) {
    const int64_t n = blockIdx.x * kTile + i * kThreads + threadIdx.x;
    if (n >= N) continue;
    acc_t acc = 0;
    for (int64_t r = 0; r < B; ++r) {
      const acc_t d = static_cast<acc_t>(xn[r * N + n]) -
                      (a[r] * static_cast<acc_t>(x[r * xs + n]) + b[r] * static_cast<acc_t>(v[r * vs + n]));
      const acc_t c = acc_t(-2) * g[r] * b[r] * d;
      if (vs) gv[r * N + n] = static_cast<scalar_t>(c);
      else acc += c;
    }
    if (!vs) gv[n] = static_cast<scalar_t>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor> sde_step_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& z,
                                                 const at::Tensor& a, const at::Tensor& b, const at::Tensor& s) {
  Rows r = prepare("sde_step", x, v, z, a, b, s);
  const int64_t tiles = (r.N + kTile - 1) / kTile;
  auto out = at::empty({r.B, r.N}, r.y.options().dtype(r.acc));
  auto part = at::empty({r.B, tiles}, r.y.options().dtype(r.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.dtype, "sde_step_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    rows_kernel<scalar_t, acc_t, true><<<tiles, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        r.x.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), r.y.data_ptr<scalar_t>(), out.data_ptr<acc_t>(),
        r.a.data_ptr<acc_t>(), r.b.data_ptr<acc_t>(), r.c.data_ptr<acc_t>(), part.data_ptr<acc_t>(), r.B, r.N,
        r.x_shared ? 0 : r.N, r.v_shared ? 0 : r.N);
  });
  return {out, part.sum(1)};
}

at::Tensor residual_sums_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& xn, const at::Tensor& a,
                              const at::Tensor& b) {
  Rows r = prepare("residual_sums", x, v, xn, a, b);
  const int64_t tiles = (r.N + kTile - 1) / kTile;
  auto part = at::empty({r.B, tiles}, r.y.options().dtype(r.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.dtype, "residual_sums_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    rows_kernel<scalar_t, acc_t, false><<<tiles, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        r.x.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), r.y.data_ptr<scalar_t>(), nullptr,
        r.a.data_ptr<acc_t>(), r.b.data_ptr<acc_t>(), nullptr, part.data_ptr<acc_t>(), r.B, r.N,
        r.x_shared ? 0 : r.N, r.v_shared ? 0 : r.N);
  });
  return part.sum(1);
}

at::Tensor residual_sums_backward_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& xn,
                                       const at::Tensor& a, const at::Tensor& b, const at::Tensor& g) {
  Rows r = prepare("residual_sums_backward", x, v, xn, a, b, g);
  const int64_t tiles = (r.N + kTile - 1) / kTile;
  auto gv = at::empty({r.v.size(0), r.N}, r.y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.dtype, "residual_sums_backward_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    bwd_kernel<scalar_t, acc_t><<<tiles, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        r.x.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), r.y.data_ptr<scalar_t>(), r.a.data_ptr<acc_t>(),
        r.b.data_ptr<acc_t>(), r.c.data_ptr<acc_t>(), gv.data_ptr<scalar_t>(), r.B, r.N, r.x_shared ? 0 : r.N,
        r.v_shared ? 0 : r.N);
  });
  return gv.to(v.scalar_type());
}

}  // namespace
}  // namespace g2rpo

TORCH_LIBRARY_IMPL(g2rpo_C, CUDA, m) {
  m.impl("sde_step", &g2rpo::sde_step_cuda);
  m.impl("residual_sums", &g2rpo::residual_sums_cuda);
  m.impl("residual_sums_backward", &g2rpo::residual_sums_backward_cuda);
}
