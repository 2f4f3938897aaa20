// Rotary position embedding, rotate-half convention: with t = [t1, t2] (halves of the head dim d),
// out = [t1*cos - t2*sin, t2*cos + t1*sin]; the backward is the same rotation with sin negated.
// One block per (position, batch) pair, its threads over heads x chunks of the half dim; the input may
// be a strided view (a slice of fused qkv), the output is contiguous [s, b, n, d].
#include "common.cuh"
#include "ops.h"

namespace mtk {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void rotary_kernel(const T* __restrict__ t, T* __restrict__ out, const float* __restrict__ cos,
                              const float* __restrict__ sin, int64_t s, int64_t b, int n, int half,
                              int64_t stride_s, int64_t stride_b, int64_t stride_n, float sin_sign) {
  const int chunks_per_head = half / VEC;
  const int items = n * chunks_per_head;
  for (int64_t pair = blockIdx.x; pair < s * b; pair += gridDim.x) {
    const int64_t pos = pair / b, batch = pair - pos * b;
    const T* src = t + pos * stride_s + batch * stride_b;
    T* dst = out + pair * static_cast<int64_t>(n) * 2 * half;
    const float* cos_row = cos + pos * half;
    const float* sin_row = sin + pos * half;
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
      const int head = item / chunks_per_head, p = (item - head * chunks_per_head) * VEC;
      const T* src_head = src + head * stride_n;
      T* dst_head = dst + static_cast<int64_t>(head) * 2 * half;
      float x1[VEC], x2[VEC];
      load_pack<T, VEC>(src_head + p, x1);
      load_pack<T, VEC>(src_head + half + p, x2);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float c = cos_row[p + e], sn = sin_sign * sin_row[p + e];
        const float a = x1[e], bb = x2[e];
        x1[e] = a * c - bb * sn;
        x2[e] = bb * c + a * sn;
      }
      store_pack<T, VEC>(dst_head + p, x1);
      store_pack<T, VEC>(dst_head + half + p, x2);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t rotary(const T* t, T* out, const float* cos, const float* sin, int64_t s, int64_t b, int64_t n,
                   int64_t d, int64_t stride_s, int64_t stride_b, int64_t stride_n, bool inverse,
                   cudaStream_t stream) {
  if (s * b * n * d == 0) return cudaSuccess;
  const int half = static_cast<int>(d / 2);
  constexpr int vec = max_vec<T>();
  // Packed access needs every head's halves to start on a 16-byte boundary, in and out.
  const bool vec_ok = half % vec == 0 && stride_s % vec == 0 && stride_b % vec == 0 && stride_n % vec == 0 &&
                      aligned_to(t, 16) && aligned_to(out, 16);
  const unsigned grid = grid_for(s * b, 1, int64_t(1) << 24);
  const float sign = inverse ? -1.0f : 1.0f;
  // As many threads as a (position, batch) pair has items, in whole warps, at most kThreads.
  const int64_t items = n * (vec_ok ? half / vec : half);
  const int64_t wanted = pow2_at_least(items, kThreads);
  const int threads = static_cast<int>(wanted < 32 ? 32 : wanted);
  if (vec_ok) {
    rotary_kernel<T, vec><<<grid, threads, 0, stream>>>(t, out, cos, sin, s, b, static_cast<int>(n), half, stride_s,
                                                       stride_b, stride_n, sign);
  } else {
    rotary_kernel<T, 1><<<grid, threads, 0, stream>>>(t, out, cos, sin, s, b, static_cast<int>(n), half, stride_s,
                                                     stride_b, stride_n, sign);
  }
  return cudaGetLastError();
}

#define MTK_INSTANTIATE(T)                                                                                     \
  template cudaError_t rotary<T>(const T*, T*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, \
                                 int64_t, int64_t, int64_t, bool, cudaStream_t);
MTK_INSTANTIATE(float)
MTK_INSTANTIATE(__half)
MTK_INSTANTIATE(__nv_bfloat16)
#undef MTK_INSTANTIATE

}  // namespace mtk
