// CPU multi-scale deformable attention, forward and backward (float32, float64).
// Kernel bodies: msda_cpu_kernels.h. This file: checks, instruction-set dispatch, op registration.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "msda_checks.h"
#include "msda_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MSDA_X86_AVX2 1
#else
#define MSDA_X86_AVX2 0
#endif

namespace msda {
namespace {

struct Levels {
  std::vector<int64_t> hw;     // [l, 2] (h, w)
  std::vector<int64_t> start;  // [l]
};

Levels read_levels(const at::Tensor& shapes, const at::Tensor& starts, int64_t s) {
  const int64_t l = shapes.size(0);
  Levels lv{std::vector<int64_t>(shapes.data_ptr<int64_t>(), shapes.data_ptr<int64_t>() + 2 * l),
            std::vector<int64_t>(starts.data_ptr<int64_t>(), starts.data_ptr<int64_t>() + l)};
  int64_t total = 0;
  for (int64_t i = 0; i < l; ++i) {
    TORCH_CHECK(lv.hw[2 * i] >= 0 && lv.hw[2 * i + 1] >= 0, "ms_deform_attn: spatial_shapes must be >= 0, got (",
                lv.hw[2 * i], ", ", lv.hw[2 * i + 1], ") at level ", i);
    TORCH_CHECK(lv.start[i] == total, "ms_deform_attn: level_start_index[", i, "] must be ", total,
                " (exclusive cumsum of h * w), got ", lv.start[i]);
    total += lv.hw[2 * i] * lv.hw[2 * i + 1];
  }
  TORCH_CHECK(total == s, "ms_deform_attn: value has s = ", s, " positions but spatial_shapes sum to ", total);
  return lv;
}

}  // namespace

// The kernels, compiled for the baseline instruction set and (x86-64 with GCC) again for AVX2 + FMA;
// MSDA_PICK chooses at run time, so one build serves every CPU of the architecture.
namespace generic {
#include "msda_cpu_kernels.h"
}  // namespace generic
#if MSDA_X86_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "msda_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

#if MSDA_X86_AVX2
bool use_avx2() {  // BIFIT_MSDA_NO_AVX2=1 forces the baseline kernels (tests compare both)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("BIFIT_MSDA_NO_AVX2") == nullptr;
  return ok;
}
#define MSDA_PICK(...) (use_avx2() ? &avx2::__VA_ARGS__ : &generic::__VA_ARGS__)
#else
#define MSDA_PICK(...) (&generic::__VA_ARGS__)
#endif

void check_cpu(const at::Tensor& value, const at::Tensor& loc) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn (cpu kernel): tensors must be on cpu, got ", value.device());
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn (cpu kernel): value must be float32 or float64, got ", value.scalar_type());
  TORCH_CHECK(loc.scalar_type() == value.scalar_type(), "ms_deform_attn (cpu kernel): sampling_locations must be ",
              value.scalar_type(), " like value, got ", loc.scalar_type());
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                       const at::Tensor& loc, const at::Tensor& attn) {
  const Dims k = check_inputs(value, shapes, starts, loc, attn);
  check_cpu(value, loc);
  const Levels lv = read_levels(shapes, starts, k.s);
  at::Tensor out = at::empty({k.n, k.q, k.m * k.d}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_forward_cpu", [&] {
    auto run = [&](auto kd) {
      constexpr int kD = decltype(kd)::value;
      auto kernel = MSDA_PICK(forward_kernel<scalar_t, kD>);
      kernel(value.data_ptr<scalar_t>(), lv, loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
             out.data_ptr<scalar_t>(), k);
    };
    if (k.d == 32) run(std::integral_constant<int, 32>{});
    else run(std::integral_constant<int, 0>{});
  });
  return out;
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                     const at::Tensor& loc, const at::Tensor& attn, const at::Tensor& grad_out) {
  const Dims k = check_inputs(value, shapes, starts, loc, attn);
  check_cpu(value, loc);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type() && grad_out.dim() == 3 &&
                  grad_out.size(0) == k.n && grad_out.size(1) == k.q && grad_out.size(2) == k.m * k.d,
              "ms_deform_attn (cpu kernel): grad_output must be contiguous ", value.scalar_type(), " [", k.n, ", ",
              k.q, ", ", k.m * k.d, "], got ", grad_out.scalar_type(), " ", grad_out.sizes());
  const Levels lv = read_levels(shapes, starts, k.s);
  // Fewer heads than threads: split the queries too, each split with its own grad_value buffer.
  const int64_t threads = at::get_num_threads(), heads = std::max<int64_t>(k.n * k.m, 1);
  const int64_t splits = heads >= threads ? 1 : std::clamp<int64_t>((threads + heads - 1) / heads, 1,
                                                                   std::max<int64_t>(k.q / 64, 1));
  at::Tensor parts = at::empty({splits, k.n, k.s, k.m, k.d}, value.options());
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  if (parts.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_backward_cpu", [&] {
      auto run = [&](auto kd) {
        constexpr int kD = decltype(kd)::value;
        auto kernel = MSDA_PICK(backward_kernel<scalar_t, kD>);
        kernel(value.data_ptr<scalar_t>(), lv, loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
            grad_out.data_ptr<scalar_t>(), parts.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
            grad_attn.data_ptr<scalar_t>(), k, splits);
      };
      if (k.d == 32) run(std::integral_constant<int, 32>{});
      else run(std::integral_constant<int, 0>{});
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {splits == 1 ? parts[0] : parts.sum(0), grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda

// The namespace is the extension name chosen by ops/build.py (unique per source hash and flags).
#define MSDA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
MSDA_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights) -> Tensor",
        &msda::forward_cpu);
  m.def("backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights, Tensor grad_output) -> Tensor[]",
        &msda::backward_cpu);
}
