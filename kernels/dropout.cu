// Bias + dropout + residual add, and the dropout backward. The keep decision of element i is a pure
// function of (seed, i): Philox4x32-10 keyed by the seed, counter i / 4, output word i % 4. So the
// backward regenerates the forward's mask from the saved seed (no mask in memory), and the mask does
// not depend on the launch configuration. The seed itself is drawn by the caller from the default
// generator of the device, which is what makes a restored generator state replay the mask.
#include "common.cuh"
#include "ops.h"

namespace mtk {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.x += 0x9E3779B9u;
      key.y += 0xBB67AE85u;
    }
    const uint32_t lo0 = counter.x * 0xD2511F53u, hi0 = __umulhi(counter.x, 0xD2511F53u);
    const uint32_t lo1 = counter.z * 0xCD9E8D57u, hi1 = __umulhi(counter.z, 0xCD9E8D57u);
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
  }
  return counter;
}

// What the kernels need to decide "keep": no seed means no randomness (prob 0: keep all; prob >= 1: none).
struct DropoutRule {
  const int64_t* seed;
  float prob;
  float keep_scale;  // 1 / (1 - prob)
};

// Keep flags of the 4 elements 4 * group .. 4 * group + 3.
__device__ __forceinline__ void keep_flags(const DropoutRule& rule, uint2 key, int64_t group, bool (&keep)[4]) {
  if (rule.seed == nullptr) {
#pragma unroll
    for (int e = 0; e < 4; ++e) keep[e] = rule.prob < 1.0f;
    return;
  }
  const uint64_t g = static_cast<uint64_t>(group);
  const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, 0u), key);
  const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) keep[e] = static_cast<float>(words[e] >> 8) * (1.0f / 16777216.0f) >= rule.prob;
}

// The ELEMS = 4 * GROUPS flags of thread t: one philox draw per group of 4 elements, so the
// forward and the backward (which regenerates the mask) see the same flags.
template <int GROUPS>
__device__ __forceinline__ void thread_keep_flags(const DropoutRule& rule, uint2 key, int64_t t,
                                                  bool (&keep)[4 * GROUPS]) {
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    bool k4[4];
    keep_flags(rule, key, t * GROUPS + g, k4);
#pragma unroll
    for (int e = 0; e < 4; ++e) keep[4 * g + e] = k4[e];
  }
}

__device__ __forceinline__ uint2 philox_key(const DropoutRule& rule) {
  if (rule.seed == nullptr) return make_uint2(0u, 0u);
  const uint64_t s = static_cast<uint64_t>(*rule.seed);
  return make_uint2(static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

// Each thread handles ELEMS = 4 * GROUPS consecutive elements; VEC: one packed access for all of them
// (numel % ELEMS == 0 and aligned pointers), else element by element with bounds checks.
template <typename T, int GROUPS, bool VEC>
__global__ void bias_dropout_add_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                        const T* __restrict__ residual, T* __restrict__ out, int64_t numel,
                                        int64_t cols, DropoutRule rule) {
  constexpr int ELEMS = 4 * GROUPS;
  const uint2 key = philox_key(rule);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t * ELEMS < numel; t += stride) {
    const int64_t first = t * ELEMS;
    bool keep[ELEMS];
    thread_keep_flags<GROUPS>(rule, key, t, keep);
    float v[ELEMS], r[ELEMS];
    if constexpr (VEC) {
      load_pack<T, ELEMS>(x + first, v);
      load_pack<T, ELEMS>(residual + first, r);
    } else {
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        v[e] = first + e < numel ? to_float(x[first + e]) : 0.0f;
        r[e] = first + e < numel ? to_float(residual[first + e]) : 0.0f;
      }
    }
    if (bias != nullptr) {
      int64_t col = first % cols;
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        if (first + e < numel) v[e] += to_float(bias[col]);
        col = col + 1 == cols ? 0 : col + 1;
      }
    }
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) v[e] = r[e] + (keep[e] ? v[e] * rule.keep_scale : 0.0f);
    if constexpr (VEC) {
      store_pack<T, ELEMS>(out + first, v);
    } else {
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        if (first + e < numel) out[first + e] = from_float<T>(v[e]);
      }
    }
  }
}

template <typename T, int GROUPS, bool VEC>
__global__ void dropout_backward_kernel(const T* __restrict__ grad_out, T* __restrict__ grad_x, int64_t numel,
                                        DropoutRule rule) {
  constexpr int ELEMS = 4 * GROUPS;
  const uint2 key = philox_key(rule);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t * ELEMS < numel; t += stride) {
    const int64_t first = t * ELEMS;
    bool keep[ELEMS];
    thread_keep_flags<GROUPS>(rule, key, t, keep);
    float v[ELEMS];
    if constexpr (VEC) {
      load_pack<T, ELEMS>(grad_out + first, v);
    } else {
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) v[e] = first + e < numel ? to_float(grad_out[first + e]) : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) v[e] = keep[e] ? v[e] * rule.keep_scale : 0.0f;
    if constexpr (VEC) {
      store_pack<T, ELEMS>(grad_x + first, v);
    } else {
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        if (first + e < numel) grad_x[first + e] = from_float<T>(v[e]);
      }
    }
  }
}

DropoutRule make_rule(float prob, const int64_t* seed) {
  const bool random = seed != nullptr && prob > 0.0f && prob < 1.0f;
  return DropoutRule{random ? seed : nullptr, prob, prob < 1.0f ? 1.0f / (1.0f - prob) : 0.0f};
}

// 16 bytes per thread: 4 fp32 or 8 fp16 / bf16 elements, i.e. 1 or 2 Philox groups.
template <typename T> constexpr int groups_per_thread() { return max_vec<T>() / 4; }

}  // namespace

template <typename T>
cudaError_t bias_dropout_add_forward(const T* x, const T* bias, const T* residual, T* out, int64_t rows,
                                     int64_t cols, float prob, const int64_t* seed, cudaStream_t stream) {
  const int64_t numel = rows * cols;
  if (numel == 0) return cudaSuccess;
  constexpr int groups = groups_per_thread<T>();
  constexpr int elems = 4 * groups;
  const DropoutRule rule = make_rule(prob, seed);
  const unsigned grid = grid_for((numel + elems - 1) / elems, kThreads);
  if (numel % elems == 0 && aligned_to(x, 16) && aligned_to(residual, 16) && aligned_to(out, 16)) {
    bias_dropout_add_kernel<T, groups, true><<<grid, kThreads, 0, stream>>>(x, bias, residual, out, numel, cols, rule);
  } else {
    bias_dropout_add_kernel<T, groups, false><<<grid, kThreads, 0, stream>>>(x, bias, residual, out, numel, cols, rule);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dropout_backward(const T* grad_out, T* grad_x, int64_t numel, float prob, const int64_t* seed,
                             cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int groups = groups_per_thread<T>();
  constexpr int elems = 4 * groups;
  const DropoutRule rule = make_rule(prob, seed);
  const unsigned grid = grid_for((numel + elems - 1) / elems, kThreads);
  if (numel % elems == 0 && aligned_to(grad_out, 16) && aligned_to(grad_x, 16)) {
    dropout_backward_kernel<T, groups, true><<<grid, kThreads, 0, stream>>>(grad_out, grad_x, numel, rule);
  } else {
    dropout_backward_kernel<T, groups, false><<<grid, kThreads, 0, stream>>>(grad_out, grad_x, numel, rule);
  }
  return cudaGetLastError();
}

#define MTK_INSTANTIATE(T)                                                                                       \
  template cudaError_t bias_dropout_add_forward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, float,     \
                                                   const int64_t*, cudaStream_t);                                \
  template cudaError_t dropout_backward<T>(const T*, T*, int64_t, float, const int64_t*, cudaStream_t);
MTK_INSTANTIATE(float)
MTK_INSTANTIATE(__half)
MTK_INSTANTIATE(__nv_bfloat16)
#undef MTK_INSTANTIATE

}  // namespace mtk
