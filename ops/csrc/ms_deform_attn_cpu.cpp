// Multi-scale deformable attention, CPU kernels (forward and backward), float32 and float64.
//
// Shapes (all contiguous):
//   value               [n, s, m, d]        s = sum over levels of h_l * w_l
//   spatial_shapes      [l, 2]  int64       (h_l, w_l)
//   level_start_index   [l]     int64
//   sampling_locations  [n, q, m, l, p, 2]  (x, y) in [0, 1] of each level
//   attention_weights   [n, q, m, l, p]
//   output              [n, q, m * d]
// Sampling is bilinear with zero padding and align_corners=False, exactly as grid_sample(2 * loc - 1).
// Forward parallelises over (n, q); backward over (n, m), so each thread owns the grad_value slice of
// its head and no atomics are needed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
struct Corners {
  int64_t idx[4];  // row offsets into the level (h * w + x), -1 outside the map
  T w[4];          // bilinear weights
  T fx, fy;
};

template <typename T>
inline Corners<T> corners(T loc_x, T loc_y, int64_t h, int64_t w) {
  // pixel coordinates of grid_sample(align_corners=False): ((2 loc - 1) + 1) * size - 1) / 2
  const T x = ((loc_x * 2 - 1 + 1) * w - 1) / 2;
  const T y = ((loc_y * 2 - 1 + 1) * h - 1) / 2;
  const T x0f = std::floor(x), y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  Corners<T> c;
  c.fx = x - x0f;
  c.fy = y - y0f;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const T ws[4] = {(1 - c.fy) * (1 - c.fx), (1 - c.fy) * c.fx, c.fy * (1 - c.fx), c.fy * c.fx};
  for (int k = 0; k < 4; ++k) {
    const bool inside = xs[k] >= 0 && xs[k] < w && ys[k] >= 0 && ys[k] < h;
    c.idx[k] = inside ? ys[k] * w + xs[k] : -1;
    c.w[k] = ws[k];
  }
  return c;
}

template <typename T>
void forward_kernel(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn,
                    T* out, int64_t N, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P) {
  at::parallel_for(0, N * Q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / Q;
      T* o = out + nq * M * D;
      for (int64_t m = 0; m < M; ++m) {
        T* om = o + m * D;
        for (int64_t d = 0; d < D; ++d) om[d] = 0;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const T* vl = value + ((n * S + starts[l]) * M + m) * D;  // row stride M * D
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = ((nq * M + m) * L + l) * P + p;
            const T a = attn[i];
            const Corners<T> c = corners<T>(loc[2 * i], loc[2 * i + 1], h, w);
            for (int k = 0; k < 4; ++k) {
              if (c.idx[k] < 0) continue;
              const T cw = a * c.w[k];
              const T* v = vl + c.idx[k] * M * D;
              for (int64_t d = 0; d < D; ++d) om[d] += cw * v[d];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn,
                     const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn, int64_t N, int64_t S, int64_t M,
                     int64_t D, int64_t Q, int64_t L, int64_t P) {
  at::parallel_for(0, N * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / M, m = nm % M;
      for (int64_t q = 0; q < Q; ++q) {
        const T* go = grad_out + ((n * Q + q) * M + m) * D;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const int64_t row0 = (n * S + starts[l]) * M + m;
          const T* vl = value + row0 * D;
          T* gvl = grad_value + row0 * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = (((n * Q + q) * M + m) * L + l) * P + p;
            const T a = attn[i];
            const Corners<T> c = corners<T>(loc[2 * i], loc[2 * i + 1], h, w);
            T g[4] = {0, 0, 0, 0};  // <grad_out, value at corner k>
            for (int k = 0; k < 4; ++k) {
              if (c.idx[k] < 0) continue;
              const T* v = vl + c.idx[k] * M * D;
              T* gv = gvl + c.idx[k] * M * D;
              const T cw = a * c.w[k];
              T dot = 0;
              for (int64_t d = 0; d < D; ++d) {
                dot += go[d] * v[d];
                gv[d] += cw * go[d];
              }
              g[k] = dot;
            }
            grad_attn[i] = c.w[0] * g[0] + c.w[1] * g[1] + c.w[2] * g[2] + c.w[3] * g[3];
            // d/dx of the bilinear weights, times dx/dloc = w (and h for y)
            grad_loc[2 * i] = a * w * ((1 - c.fy) * (g[1] - g[0]) + c.fy * (g[3] - g[2]));
            grad_loc[2 * i + 1] = a * h * ((1 - c.fx) * (g[2] - g[0]) + c.fx * (g[3] - g[1]));
          }
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                  const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(!value.is_cuda(), "ms_deform_attn CPU kernel: value must be a CPU tensor");
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [n, s, m, d], got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2, "ms_deform_attn: sampling_locations must be [n, q, m, l, p, 2]");
  TORCH_CHECK(attn.dim() == 5, "ms_deform_attn: attention_weights must be [n, q, m, l, p]");
  TORCH_CHECK(value.scalar_type() == loc.scalar_type() && value.scalar_type() == attn.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype");
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(value.is_contiguous() && loc.is_contiguous() && attn.is_contiguous() && shapes.is_contiguous() &&
              starts.is_contiguous(), "ms_deform_attn: inputs must be contiguous");
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                  const at::Tensor& loc, const at::Tensor& attn) {
  check_inputs(value, shapes, starts, loc, attn);
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), P = loc.size(4);
  auto out = at::empty({N, Q, M * D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                             loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, S, M,
                             D, Q, L, P);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& shapes,
                                                const at::Tensor& starts, const at::Tensor& loc,
                                                const at::Tensor& attn, const at::Tensor& grad_out) {
  check_inputs(value, shapes, starts, loc, attn);
  TORCH_CHECK(grad_out.is_contiguous(), "ms_deform_attn: grad_output must be contiguous");
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), P = loc.size(4);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(loc);
  auto grad_attn = at::zeros_like(attn);
  if (N * Q * M == 0) return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                              loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attn.data_ptr<scalar_t>(), N, S, M, D, Q, L, P);
  });
  return {grad_value, grad_loc, grad_attn};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_forward, "multi-scale deformable attention forward (CPU)");
  m.def("backward", &ms_deform_attn_backward, "multi-scale deformable attention backward (CPU)");
}
