// Shared by the CPU and CUDA kernels: where one sampling point lands on one feature level.
//
// Matches F.grid_sample(bilinear, padding_mode="zeros", align_corners=False) applied to
// grid = 2 * loc - 1: the pixel coordinate is ((grid + 1) * size - 1) / 2, i.e. loc * size - 0.5,
// and the four neighbouring pixels contribute with bilinear weights; pixels outside the map are zero.
#pragma once

#include <math.h>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HD __host__ __device__ __forceinline__
#else
#define MSDA_HD inline
#endif

namespace msda {

MSDA_HD float floor_(float v) { return floorf(v); }
MSDA_HD double floor_(double v) { return floor(v); }

// Corner k of the bilinear footprint: k = 2 * dy + dx with (dy, dx) in {0, 1}^2.
template <typename T>
struct Footprint {
  int y0, x0;       // top-left neighbour (may be -1)
  T ly, lx;         // fractional offsets from (y0, x0)
  T hy, hx;         // 1 - ly, 1 - lx
  bool inside;      // false when all four neighbours are outside the map (then nothing else is set)

  MSDA_HD bool valid(int k, int64_t h, int64_t w) const {
    const int y = y0 + (k >> 1), x = x0 + (k & 1);
    return y >= 0 && x >= 0 && y < h && x < w;
  }
  MSDA_HD int64_t offset(int k, int64_t w) const {  // flat index y * w + x of corner k
    return (int64_t)(y0 + (k >> 1)) * w + (x0 + (k & 1));
  }
  MSDA_HD T weight(int k) const {
    return (k >> 1 ? ly : hy) * (k & 1 ? lx : hx);
  }
  MSDA_HD T dweight_dx(int k) const {  // d weight / d x (pixel units)
    return (k & 1 ? T(1) : T(-1)) * (k >> 1 ? ly : hy);
  }
  MSDA_HD T dweight_dy(int k) const {  // d weight / d y (pixel units)
    return (k >> 1 ? T(1) : T(-1)) * (k & 1 ? lx : hx);
  }
};

// loc_x, loc_y in [0, 1] of the level (x along w); h, w the level's size.
template <typename T>
MSDA_HD Footprint<T> locate(T loc_x, T loc_y, int64_t h, int64_t w) {
  Footprint<T> f;
  const T x = ((T(2) * loc_x - T(1) + T(1)) * T(w) - T(1)) / T(2);
  const T y = ((T(2) * loc_y - T(1) + T(1)) * T(h) - T(1)) / T(2);
  f.inside = x > T(-1) && y > T(-1) && x < T(w) && y < T(h);
  if (!f.inside) return f;
  const T fx = floor_(x), fy = floor_(y);
  f.x0 = (int)fx;
  f.y0 = (int)fy;
  f.lx = x - fx;
  f.ly = y - fy;
  f.hx = T(1) - f.lx;
  f.hy = T(1) - f.ly;
  return f;
}

}  // namespace msda
