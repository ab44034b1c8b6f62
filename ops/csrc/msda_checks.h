// Input validation shared by the CPU and CUDA entry points (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace msda {

struct Dims {
  int64_t n, s, m, d, q, l, p;
};

// value [n, s, m, d]; spatial_shapes [l, 2] int64; level_start_index [l] int64;
// sampling_locations [n, q, m, l, p, 2]; attention_weights [n, q, m, l, p]; all contiguous, one device.
inline Dims check_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                         const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [n, s, m, d], got ", value.sizes());
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(1) == 2 && shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64 [l, 2], got ", shapes.scalar_type(), " ",
              shapes.sizes());
  const int64_t l = shapes.size(0);
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == l && starts.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64 [l] with l = ", l, ", got ",
              starts.scalar_type(), " ", starts.sizes());
  Dims k{value.size(0), value.size(1), value.size(2), value.size(3), 0, l, 0};
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == k.n && loc.size(2) == k.m && loc.size(3) == l && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [n, q, m, l, p, 2] = [", k.n, ", q, ", k.m, ", ", l,
              ", p, 2], got ", loc.sizes());
  k.q = loc.size(1);
  k.p = loc.size(4);
  TORCH_CHECK(attn.sizes() == loc.sizes().slice(0, 5), "ms_deform_attn: attention_weights must be [n, q, m, l, p] = ",
              loc.sizes().slice(0, 5), ", got ", attn.sizes());
  TORCH_CHECK(loc.scalar_type() == attn.scalar_type(),
              "ms_deform_attn: sampling_locations and attention_weights must share a dtype, got ",
              loc.scalar_type(), " and ", attn.scalar_type());
  for (const at::Tensor* t : {&value, &shapes, &starts, &loc, &attn}) {
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: inputs must be contiguous (the Python wrapper makes them so)");
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on ", value.device(),
                ", got one on ", t->device());
  }
  return k;
}

}  // namespace msda
