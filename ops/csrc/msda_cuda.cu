// CUDA multi-scale deformable attention, forward and backward.
//
// Main kernels (float32, float16, bfloat16, float64 value; float32/float64 locations and weights):
// a group of G threads (G a power of two <= 32, inside one warp) serves one (n, q, m) row; each
// thread owns VEC consecutive channels (16-byte loads: 4 floats, 8 halves, 2 doubles), so one
// bilinear corner of a row is G vector loads instead of d scalar ones. Backward reduces the
// location/weight gradients across the group with warp shuffles (no shared memory, no barriers)
// and accumulates grad_value with atomics in float32/float64 (16-byte vector atomics on sm_90+).
//
// Classic kernels (float32, float64): the Deformable-DETR design kept as the benchmark baseline,
// one thread per output element (n, q, m, d) with scalar bilinear gathers; backward with one block
// of d threads per row, a shared-memory reduction by thread 0 and scalar atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "msda_checks.h"
#include "msda_common.h"

namespace msda {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
  }
#else
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* dst, const double* v) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
}

struct Shape {
  int64_t rows;  // n * q * m
  int64_t q, s;
  int m, l, p, d;
};

// ---------------------------------------------------------------- main kernels

// Threads: rows * group; thread t serves row t / group and channel chunks c = lane, lane + group, ...
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                   const acc_t* __restrict__ attn, scalar_t* __restrict__ out, Shape k, int group, int log2g) {
  const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t row = tid >> log2g;
  if (row >= k.rows) return;
  const int lane = (int)(tid & (group - 1));
  const int m = (int)(row % k.m);
  const int64_t n = row / k.m / k.q;
  const int64_t sstride = (int64_t)k.m * k.d;
  const scalar_t* v_nm = value + n * k.s * sstride + (int64_t)m * k.d;
  const acc_t* loc_r = loc + row * k.l * k.p * 2;
  const acc_t* attn_r = attn + row * k.l * k.p;
  const int chunks = k.d / VEC;
  for (int c = lane; c < chunks; c += group) {
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
    const int d0 = c * VEC;
    for (int l = 0; l < k.l; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      const scalar_t* v_l = v_nm + starts[l] * sstride + d0;
      for (int p = 0; p < k.p; ++p) {
        const int i = l * k.p + p;
        const Footprint<acc_t> f = locate<acc_t>(loc_r[2 * i], loc_r[2 * i + 1], h, w);
        if (!f.inside) continue;
        const acc_t a = attn_r[i];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (!f.valid(corner, h, w)) continue;
          const acc_t cw = a * f.weight(corner);
          const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(v_l + f.offset(corner, w) * sstride);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += cw * static_cast<acc_t>(v.v[j]);
        }
      }
    }
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(out + row * k.d + d0) = o;
  }
}

// grad_value is an acc_t buffer shaped like value. Whole groups leave together (rows * group
// threads, group divides 32, blocks are whole warps), so the group shuffles see every lane.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                    const acc_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn,
                    Shape k, int group, int log2g) {
  const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t row = tid >> log2g;
  if (row >= k.rows) return;
  const int lane = (int)(tid & (group - 1));
  const unsigned mask =
      group == 32 ? 0xffffffffu : (((1u << group) - 1u) << ((threadIdx.x & 31) & ~(unsigned)(group - 1)));
  const int m = (int)(row % k.m);
  const int64_t n = row / k.m / k.q;
  const int64_t sstride = (int64_t)k.m * k.d;
  const int64_t base = n * k.s * sstride + (int64_t)m * k.d;
  const int lp = k.l * k.p;
  const acc_t* loc_r = loc + row * lp * 2;
  const acc_t* attn_r = attn + row * lp;
  const scalar_t* g_r = grad_out + row * k.d;
  const int chunks = k.d / VEC;
  for (int l = 0; l < k.l; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    const int64_t base_l = base + starts[l] * sstride;
    for (int p = 0; p < k.p; ++p) {
      const int i = l * k.p + p;
      const Footprint<acc_t> f = locate<acc_t>(loc_r[2 * i], loc_r[2 * i + 1], h, w);
      const acc_t a = attn_r[i];
      acc_t ga = 0, gx = 0, gy = 0;  // d out / d weight, d out / d x, d out / d y (partial over channels)
      if (f.inside) {
        for (int c = lane; c < chunks; c += group) {
          const int d0 = c * VEC;
          const Pack<scalar_t, VEC> gp = load_pack<scalar_t, VEC>(g_r + d0);
          acc_t g[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) g[j] = static_cast<acc_t>(gp.v[j]);
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            if (!f.valid(corner, h, w)) continue;
            const int64_t off = base_l + f.offset(corner, w) * sstride + d0;
            const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(value + off);
            acc_t dot = 0;
#pragma unroll
            for (int j = 0; j < VEC; ++j) dot += static_cast<acc_t>(v.v[j]) * g[j];
            ga += f.weight(corner) * dot;
            gx += f.dweight_dx(corner) * dot;
            gy += f.dweight_dy(corner) * dot;
            const acc_t cw = a * f.weight(corner);
            acc_t contrib[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) contrib[j] = cw * g[j];
            atomic_add_vec<VEC>(grad_value + off, contrib);
          }
        }
      }
      for (int offset = group >> 1; offset > 0; offset >>= 1) {
        ga += __shfl_xor_sync(mask, ga, offset, group);
        gx += __shfl_xor_sync(mask, gx, offset, group);
        gy += __shfl_xor_sync(mask, gy, offset, group);
      }
      if (lane == 0) {
        grad_attn[row * lp + i] = ga;
        grad_loc[(row * lp + i) * 2] = a * gx * acc_t(w);  // d x_pixel / d loc_x = w
        grad_loc[(row * lp + i) * 2 + 1] = a * gy * acc_t(h);
      }
    }
  }
}

// ---------------------------------------------------------------- classic kernels (baseline)

constexpr int kClassicThreads = 1024;  // the classic design's block size (CUDA_NUM_THREADS)

template <typename scalar_t>
__global__ void __launch_bounds__(kClassicThreads)
    classic_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                           const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                           const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, Shape k) {
  const int64_t total = k.rows * k.d;
  const int64_t sstride = (int64_t)k.m * k.d;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const int d = (int)(idx % k.d);
    const int64_t row = idx / k.d;
    const int m = (int)(row % k.m);
    const int64_t n = row / k.m / k.q;
    const scalar_t* v_nmd = value + n * k.s * sstride + (int64_t)m * k.d + d;
    const scalar_t* loc_r = loc + row * k.l * k.p * 2;
    const scalar_t* attn_r = attn + row * k.l * k.p;
    scalar_t acc = 0;
    for (int l = 0; l < k.l; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      const scalar_t* v_l = v_nmd + starts[l] * sstride;
      for (int p = 0; p < k.p; ++p) {
        const int i = l * k.p + p;
        const Footprint<scalar_t> f = locate<scalar_t>(loc_r[2 * i], loc_r[2 * i + 1], h, w);
        if (!f.inside) continue;
        scalar_t sample = 0;
        for (int corner = 0; corner < 4; ++corner) {
          if (f.valid(corner, h, w)) sample += f.weight(corner) * v_l[f.offset(corner, w) * sstride];
        }
        acc += attn_r[i] * sample;
      }
    }
    out[idx] = acc;
  }
}

// One block of d threads per row; dynamic shared memory holds 3 * d partial gradients.
template <typename scalar_t>
__global__ void __launch_bounds__(kClassicThreads)
    classic_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                            const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                            const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                            scalar_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                            scalar_t* __restrict__ grad_attn, Shape k) {
  extern __shared__ unsigned char shared_raw[];
  scalar_t* cache = reinterpret_cast<scalar_t*>(shared_raw);
  const int d = threadIdx.x;
  const int64_t sstride = (int64_t)k.m * k.d;
  const int lp = k.l * k.p;
  for (int64_t row = blockIdx.x; row < k.rows; row += gridDim.x) {
    const int m = (int)(row % k.m);
    const int64_t n = row / k.m / k.q;
    const int64_t base = n * k.s * sstride + (int64_t)m * k.d + d;
    const scalar_t g = grad_out[row * k.d + d];
    for (int l = 0; l < k.l; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      for (int p = 0; p < k.p; ++p) {
        const int i = l * k.p + p;
        const Footprint<scalar_t> f = locate<scalar_t>(loc[(row * lp + i) * 2], loc[(row * lp + i) * 2 + 1], h, w);
        const scalar_t a = attn[row * lp + i];
        scalar_t ga = 0, gx = 0, gy = 0;
        if (f.inside) {
          for (int corner = 0; corner < 4; ++corner) {
            if (!f.valid(corner, h, w)) continue;
            const int64_t off = base + (starts[l] + f.offset(corner, w)) * sstride;
            const scalar_t v = value[off];
            ga += f.weight(corner) * v * g;
            gx += f.dweight_dx(corner) * v * g;
            gy += f.dweight_dy(corner) * v * g;
            atomicAdd(grad_value + off, a * f.weight(corner) * g);
          }
        }
        cache[d] = ga;
        cache[k.d + d] = gx;
        cache[2 * k.d + d] = gy;
        __syncthreads();
        if (d == 0) {
          for (int j = 1; j < k.d; ++j) {
            ga += cache[j];
            gx += cache[k.d + j];
            gy += cache[2 * k.d + j];
          }
          grad_attn[row * lp + i] = ga;
          grad_loc[(row * lp + i) * 2] = a * gx * scalar_t(w);
          grad_loc[(row * lp + i) * 2 + 1] = a * gy * scalar_t(h);
        }
        __syncthreads();
      }
    }
  }
}

// ---------------------------------------------------------------- host side

Shape shape_of(const Dims& k) {
  return Shape{k.n * k.q * k.m, k.q, k.s, (int)k.m, (int)k.l, (int)k.p, (int)k.d};
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_cuda(const at::Tensor& value, const at::Tensor& loc, bool classic) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (cuda kernel): tensors must be on a CUDA device, got ",
              value.device());
  const auto st = value.scalar_type();
  if (classic) {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble,
                "ms_deform_attn (classic cuda kernel): value must be float32 or float64, got ", st);
    TORCH_CHECK(loc.scalar_type() == st, "ms_deform_attn (classic cuda kernel): sampling_locations must be ", st,
                " like value, got ", loc.scalar_type());
    return;
  }
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "ms_deform_attn (cuda kernel): value must be float32, float16, bfloat16 or float64, got ", st);
  const auto want = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(loc.scalar_type() == want, "ms_deform_attn (cuda kernel): sampling_locations and attention_weights "
              "must be ", want, " for ", st, " value, got ", loc.scalar_type());
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& value, const Dims& k) {
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type() &&
                  grad_out.device() == value.device() && grad_out.dim() == 3 && grad_out.size(0) == k.n &&
                  grad_out.size(1) == k.q && grad_out.size(2) == k.m * k.d,
              "ms_deform_attn (cuda kernel): grad_output must be contiguous ", value.scalar_type(), " [", k.n, ", ",
              k.q, ", ", k.m * k.d, "] on ", value.device(), ", got ", grad_out.scalar_type(), " ", grad_out.sizes(),
              " on ", grad_out.device());
}

// Threads per row: the smallest power of two >= d / vec, at most a warp.
int group_size(int chunks, int* log2g) {
  int g = 1, lg = 0;
  while (g < chunks && g < 32) g <<= 1, ++lg;
  *log2g = lg;
  return g;
}

int64_t blocks_for(int64_t threads, int64_t per_block) {
  return (threads + per_block - 1) / per_block;
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                        const at::Tensor& loc, const at::Tensor& attn) {
  const Dims k = check_inputs(value, shapes, starts, loc, attn);
  check_cuda(value, loc, false);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({k.n, k.q, k.m * k.d}, value.options());
  if (out.numel() == 0) return out;
  const Shape sh = shape_of(k);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto launch = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      int log2g = 0;
      const int group = group_size(k.d / V, &log2g);
      forward_kernel<scalar_t, acc_t, V><<<blocks_for(sh.rows * group, kThreads), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), sh, group, log2g);
    };
    if (k.d % kVec == 0 && aligned16(value)) launch(std::integral_constant<int, kVec>{});
    else launch(std::integral_constant<int, 1>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                      const at::Tensor& loc, const at::Tensor& attn, const at::Tensor& grad_out) {
  const Dims k = check_inputs(value, shapes, starts, loc, attn);
  check_cuda(value, loc, false);
  check_grad_out(grad_out, value, k);
  const c10::cuda::CUDAGuard guard(value.device());
  // float32/float64 accumulation buffer, cast to value's dtype at the end
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(loc.scalar_type()));
  at::Tensor grad_loc = at::zeros(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::zeros(attn.sizes(), attn.options());
  const Shape sh = shape_of(k);
  if (sh.rows > 0 && k.d > 0 && k.l > 0 && k.p > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      constexpr int kVec = 16 / sizeof(scalar_t);
      auto launch = [&](auto vec) {
        constexpr int V = decltype(vec)::value;
        int log2g = 0;
        const int group = group_size(k.d / V, &log2g);
        backward_kernel<scalar_t, acc_t, V><<<blocks_for(sh.rows * group, kThreads), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), grad_out.data_ptr<scalar_t>(),
            grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(), sh, group, log2g);
      };
      if (k.d % kVec == 0 && aligned16(value) && aligned16(grad_out)) launch(std::integral_constant<int, kVec>{});
      else launch(std::integral_constant<int, 1>{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

at::Tensor forward_classic_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                const at::Tensor& loc, const at::Tensor& attn) {
  const Dims k = check_inputs(value, shapes, starts, loc, attn);
  check_cuda(value, loc, true);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({k.n, k.q, k.m * k.d}, value.options());
  if (out.numel() == 0) return out;
  const Shape sh = shape_of(k);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_forward_classic_cuda", [&] {
    classic_forward_kernel<scalar_t><<<blocks_for(out.numel(), kClassicThreads), kClassicThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> backward_classic_cuda(const at::Tensor& value, const at::Tensor& shapes,
                                              const at::Tensor& starts, const at::Tensor& loc,
                                              const at::Tensor& attn, const at::Tensor& grad_out) {
  const Dims k = check_inputs(value, shapes, starts, loc, attn);
  check_cuda(value, loc, true);
  check_grad_out(grad_out, value, k);
  TORCH_CHECK(k.d <= kClassicThreads, "ms_deform_attn (classic cuda kernel): d must be <= ", kClassicThreads,
              ", got ", k.d);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());
  at::Tensor grad_loc = at::zeros(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::zeros(attn.sizes(), attn.options());
  const Shape sh = shape_of(k);
  if (sh.rows > 0 && k.d > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_backward_classic_cuda", [&] {
      const int64_t blocks = std::min<int64_t>(sh.rows, 1 << 30);
      classic_backward_kernel<scalar_t><<<blocks, k.d, 3 * k.d * sizeof(scalar_t), stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
