// CPU kernel bodies, included once per instruction set by msda_cpu.cpp (inside a namespace, after
// the standard and ATen headers and the `Levels`, `Dims`, `Footprint` definitions).
//
// value [n, s, m, d] keeps d contiguous, so every bilinear corner is one contiguous row of d
// channels: the inner loops run over d and vectorise. Forward parallelises over (n q); backward
// over (n m) heads (times q-splits when there are fewer heads than threads), so each task is the
// only writer of its grad_value slice and no atomics are needed.

// Multiply-adds below which a chunk of work runs on the calling thread (waking threads costs more).
constexpr int64_t kParallelWork = 1 << 20;

// out[0:d] += c0 * v0[0:d] + c1 * v1[0:d] + c2 * v2[0:d] + c3 * v3[0:d]
template <typename T, int kD>
inline void gather4(T* __restrict__ out, const T* __restrict__ v0, const T* __restrict__ v1,
                    const T* __restrict__ v2, const T* __restrict__ v3, T c0, T c1, T c2, T c3, int64_t d) {
  const int64_t len = kD > 0 ? kD : d;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] += c0 * v0[i] + c1 * v1[i] + c2 * v2[i] + c3 * v3[i];
}

// dot_k = <v_k, g> and gv_k += c_k * g for the four corners k.
template <typename T, int kD>
inline void scatter4(const T* __restrict__ g, const T* __restrict__ v0, const T* __restrict__ v1,
                     const T* __restrict__ v2, const T* __restrict__ v3, T* __restrict__ gv0,
                     T* __restrict__ gv1, T* __restrict__ gv2, T* __restrict__ gv3, const T* c, T* dot,
                     int64_t d) {
  const int64_t len = kD > 0 ? kD : d;
  const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < len; ++i) {
    const T gi = g[i];
    s0 += v0[i] * gi;
    s1 += v1[i] * gi;
    s2 += v2[i] * gi;
    s3 += v3[i] * gi;
    gv0[i] += c0 * gi;
    gv1[i] += c1 * gi;
    gv2[i] += c2 * gi;
    gv3[i] += c3 * gi;
  }
  dot[0] = s0, dot[1] = s1, dot[2] = s2, dot[3] = s3;
}

template <typename T, int kD>
void forward_kernel(const T* value, const Levels& lv, const T* loc, const T* attn, T* out, const Dims& k) {
  const int64_t sstride = k.m * k.d, lp = k.l * k.p;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, k.m * lp * 4 * k.d));
  at::parallel_for(0, k.n * k.q, grain, [&](int64_t begin, int64_t end) {
    const std::vector<T> zeros(k.d, T(0));  // stands in for corners outside the map
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / k.q;
      for (int64_t m = 0; m < k.m; ++m) {
        const int64_t row = nq * k.m + m;  // (n q m)
        T* o = out + row * k.d;
        std::fill(o, o + k.d, T(0));
        const T* v_nm = value + n * k.s * sstride + m * k.d;
        const T* loc_r = loc + row * lp * 2;
        const T* attn_r = attn + row * lp;
        for (int64_t l = 0; l < k.l; ++l) {
          const int64_t h = lv.hw[2 * l], w = lv.hw[2 * l + 1];
          const T* v_l = v_nm + lv.start[l] * sstride;
          for (int64_t p = 0; p < k.p; ++p) {
            const int64_t i = l * k.p + p;
            const Footprint<T> f = locate<T>(loc_r[2 * i], loc_r[2 * i + 1], h, w);
            if (!f.inside) continue;
            const T a = attn_r[i];
            const T* v[4];
            T c[4];
            for (int j = 0; j < 4; ++j) {
              const bool ok = f.valid(j, h, w);
              v[j] = ok ? v_l + f.offset(j, w) * sstride : zeros.data();
              c[j] = ok ? a * f.weight(j) : T(0);
            }
            gather4<T, kD>(o, v[0], v[1], v[2], v[3], c[0], c[1], c[2], c[3], k.d);
          }
        }
      }
    }
  });
}

// grad_value_parts [splits, n, s, m, d]: split j accumulates queries [j q / splits, (j + 1) q / splits).
template <typename T, int kD>
void backward_kernel(const T* value, const Levels& lv, const T* loc, const T* attn, const T* grad_out,
                     T* grad_value_parts, T* grad_loc, T* grad_attn, const Dims& k, int64_t splits) {
  const int64_t sstride = k.m * k.d, lp = k.l * k.p, part = k.n * k.s * sstride;
  const int64_t task_work = std::max<int64_t>(1, (k.q / splits) * lp * 4 * k.d + k.s * k.d);
  at::parallel_for(0, k.n * k.m * splits, std::max<int64_t>(1, kParallelWork / task_work),
                   [&](int64_t begin, int64_t end) {
    const std::vector<T> zeros(k.d, T(0));
    std::vector<T> scratch(4 * k.d);  // write target for corners outside the map
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, nm = task / splits;
      const int64_t n = nm / k.m, m = nm % k.m;
      const T* v_nm = value + n * k.s * sstride + m * k.d;
      T* gv_nm = grad_value_parts + split * part + n * k.s * sstride + m * k.d;
      for (int64_t s = 0; s < k.s; ++s) std::fill(gv_nm + s * sstride, gv_nm + s * sstride + k.d, T(0));
      for (int64_t q = split * k.q / splits; q < (split + 1) * k.q / splits; ++q) {
        const int64_t row = (n * k.q + q) * k.m + m;  // (n q m)
        const T* g = grad_out + row * k.d;
        const T* loc_r = loc + row * lp * 2;
        const T* attn_r = attn + row * lp;
        T* gloc_r = grad_loc + row * lp * 2;
        T* gattn_r = grad_attn + row * lp;
        for (int64_t l = 0; l < k.l; ++l) {
          const int64_t h = lv.hw[2 * l], w = lv.hw[2 * l + 1];
          const int64_t off_l = lv.start[l] * sstride;
          for (int64_t p = 0; p < k.p; ++p) {
            const int64_t i = l * k.p + p;
            const Footprint<T> f = locate<T>(loc_r[2 * i], loc_r[2 * i + 1], h, w);
            if (!f.inside) {
              gattn_r[i] = gloc_r[2 * i] = gloc_r[2 * i + 1] = T(0);
              continue;
            }
            const T a = attn_r[i];
            const T* v[4];
            T* gv[4];
            T c[4], dot[4];
            for (int j = 0; j < 4; ++j) {
              const bool ok = f.valid(j, h, w);
              const int64_t off = off_l + (ok ? f.offset(j, w) * sstride : 0);
              v[j] = ok ? v_nm + off : zeros.data();
              gv[j] = ok ? gv_nm + off : scratch.data() + j * k.d;
              c[j] = ok ? a * f.weight(j) : T(0);
            }
            scatter4<T, kD>(g, v[0], v[1], v[2], v[3], gv[0], gv[1], gv[2], gv[3], c, dot, k.d);
            T ga = 0, gx = 0, gy = 0;
            for (int j = 0; j < 4; ++j) {
              ga += f.weight(j) * dot[j];
              gx += f.dweight_dx(j) * dot[j];
              gy += f.dweight_dy(j) * dot[j];
            }
            gattn_r[i] = ga;
            gloc_r[2 * i] = a * gx * T(w);  // d x_pixel / d loc_x = w
            gloc_r[2 * i + 1] = a * gy * T(h);
          }
        }
      }
    }
  });
}
