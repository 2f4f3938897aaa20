// Scaled masked / causal softmax over the last dim of attention scores [batch, heads, sq, sk].
// One block per row; the row stays in registers when it fits (see plan_row), else it is streamed.
#include "common.cuh"
#include "ops.h"

namespace mtk {
namespace {

constexpr float kNegInf = -__builtin_huge_valf();

template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kRowThreads)
softmax_forward_kernel(const T* __restrict__ scores, T* __restrict__ probs, MaskView mask, bool causal, int64_t rows,
                       int64_t heads, int64_t sq, int64_t sk, float scale) {
  __shared__ float scratch[33];
  constexpr int SLOTS = CHUNKS > 0 ? CHUNKS : 1;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t query = row % sq;
    const T* in = scores + row * sk;
    T* out = probs + row * sk;
    const bool* mask_row = nullptr;
    if (mask.data != nullptr) {
      const int64_t head = (row / sq) % heads, batch = row / (sq * heads);
      mask_row = mask.data + batch * mask.stride_batch + head * mask.stride_head + query * mask.stride_query;
    }
    // scale * scores with the excluded entries at -inf; a chunk wholly in the future is not read at all.
    auto load_scaled = [&](int64_t j, float (&v)[VEC]) {
      if (causal && j > query) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = kNegInf;
        return;
      }
      load_pack<T, VEC>(in + j, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool excluded = (causal && j + e > query) || (mask_row != nullptr && mask_row[(j + e) * mask.stride_key]);
        v[e] = excluded ? kNegInf : v[e] * scale;
      }
    };

    float cache[SLOTS][VEC];
    float local_max = kNegInf;
    for_each_chunk<VEC, CHUNKS>(sk, [&](int k, int64_t j) {
      float v[VEC];
      load_scaled(j, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        local_max = fmaxf(local_max, v[e]);
        if constexpr (CHUNKS > 0) cache[k][e] = v[e];
      }
    });
    const float row_max = block_reduce(local_max, MaxOp(), scratch);
    // A fully excluded row has max -inf: shift by 0 instead, so every exp is exp(-inf) = 0 (not NaN) and
    // the zero total below gives zero probabilities.
    const float shift = row_max == kNegInf ? 0.0f : row_max;

    float local_sum = 0.0f;
    for_each_chunk<VEC, CHUNKS>(sk, [&](int k, int64_t j) {
      float v[VEC];
      if constexpr (CHUNKS > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = cache[k][e];
      } else {
        load_scaled(j, v);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float p = fast_exp(v[e] - shift);
        local_sum += p;
        if constexpr (CHUNKS > 0) cache[k][e] = p;
      }
    });
    const float total = block_reduce(local_sum, SumOp(), scratch);
    const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;

    for_each_chunk<VEC, CHUNKS>(sk, [&](int k, int64_t j) {
      float v[VEC];
      if constexpr (CHUNKS > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = cache[k][e] * inv_total;
      } else {
        load_scaled(j, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = fast_exp(v[e] - shift) * inv_total;
      }
      store_pack<T, VEC>(out + j, v);
    });
  }
}

template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kRowThreads)
softmax_backward_kernel(const T* __restrict__ grad_probs, const T* __restrict__ probs, T* __restrict__ grad_scores,
                        bool causal, int64_t rows, int64_t sq, int64_t sk, float scale) {
  __shared__ float scratch[33];
  constexpr int SLOTS = CHUNKS > 0 ? CHUNKS : 1;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t query = row % sq;
    const int64_t offset = row * sk;
    // Probabilities of the causal future are 0, so their gradient is 0: those chunks are not read.
    auto load = [&](int64_t j, float (&g)[VEC], float (&p)[VEC]) {
      if (causal && j > query) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[e] = p[e] = 0.0f;
        return;
      }
      load_pack<T, VEC>(grad_probs + offset + j, g);
      load_pack<T, VEC>(probs + offset + j, p);
    };

    float grad_cache[SLOTS][VEC], prob_cache[SLOTS][VEC];
    float local_dot = 0.0f;
    for_each_chunk<VEC, CHUNKS>(sk, [&](int k, int64_t j) {
      float g[VEC], p[VEC];
      load(j, g, p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        local_dot += g[e] * p[e];
        if constexpr (CHUNKS > 0) {
          grad_cache[k][e] = g[e];
          prob_cache[k][e] = p[e];
        }
      }
    });
    const float dot = block_reduce(local_dot, SumOp(), scratch);

    for_each_chunk<VEC, CHUNKS>(sk, [&](int k, int64_t j) {
      float g[VEC], p[VEC];
      if constexpr (CHUNKS > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[e] = grad_cache[k][e];
          p[e] = prob_cache[k][e];
        }
      } else {
        load(j, g, p);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[e] = scale * p[e] * (g[e] - dot);
      store_pack<T, VEC>(grad_scores + offset + j, g);
    });
  }
}

constexpr int64_t kMaxRowBlocks = int64_t(1) << 24;

}  // namespace

template <typename T>
cudaError_t softmax_forward(const T* scores, T* probs, MaskView mask, bool causal, int64_t batch, int64_t heads,
                            int64_t sq, int64_t sk, float scale, cudaStream_t stream) {
  const int64_t rows = batch * heads * sq;
  if (rows == 0 || sk == 0) return cudaSuccess;
  const bool vec_ok = sk % max_vec<T>() == 0 && aligned_to(scores, 16) && aligned_to(probs, 16);
  const RowPlan plan = plan_row(sk, max_vec<T>(), vec_ok);
  const unsigned grid = grid_for(rows, 1, kMaxRowBlocks);
  dispatch_row_plan<T>(plan, [&](auto vec, auto chunks) {
    softmax_forward_kernel<T, decltype(vec)::value, decltype(chunks)::value>
        <<<grid, plan.threads, 0, stream>>>(scores, probs, mask, causal, rows, heads, sq, sk, scale);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_backward(const T* grad_probs, const T* probs, T* grad_scores, bool causal, int64_t rows,
                             int64_t sq, int64_t sk, float scale, cudaStream_t stream) {
  if (rows == 0 || sk == 0) return cudaSuccess;
  const bool vec_ok = sk % max_vec<T>() == 0 && aligned_to(grad_probs, 16) && aligned_to(probs, 16) &&
                      aligned_to(grad_scores, 16);
  const RowPlan plan = plan_row(sk, max_vec<T>(), vec_ok);
  const unsigned grid = grid_for(rows, 1, kMaxRowBlocks);
  dispatch_row_plan<T>(plan, [&](auto vec, auto chunks) {
    softmax_backward_kernel<T, decltype(vec)::value, decltype(chunks)::value>
        <<<grid, plan.threads, 0, stream>>>(grad_probs, probs, grad_scores, causal, rows, sq, sk, scale);
  });
  return cudaGetLastError();
}

#define MTK_INSTANTIATE(T)                                                                                      \
  template cudaError_t softmax_forward<T>(const T*, T*, MaskView, bool, int64_t, int64_t, int64_t, int64_t, float, \
                                          cudaStream_t);                                                       \
  template cudaError_t softmax_backward<T>(const T*, const T*, T*, bool, int64_t, int64_t, int64_t, float,          \
                                           cudaStream_t);
MTK_INSTANTIATE(float)
MTK_INSTANTIATE(__half)
MTK_INSTANTIATE(__nv_bfloat16)
#undef MTK_INSTANTIATE

}  // namespace mtk
