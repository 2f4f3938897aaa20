// Local part of the vocab-parallel cross entropy over this rank's logits [n, v_local] (row stride given).
// Stats: one streaming pass per row with an online max / sum of exponentials (each thread rescales its
// running sum when its max grows), plus the sum of logits and the target's logit. Backward: the
// gradient written over the logits in place; each element is read and written by the same thread.
// Columns at or past n_valid = vocab_size - vocab_start are padding: excluded, and zero in the gradient.
#include "common.cuh"
#include "ops.h"

namespace mtk {
namespace {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr int64_t kMaxRowBlocks = int64_t(1) << 24;

__host__ __device__ inline int64_t valid_columns(int64_t v_local, int64_t vocab_start, int64_t vocab_size) {
  const int64_t valid = vocab_size - vocab_start;
  return valid < 0 ? 0 : (valid < v_local ? valid : v_local);
}

// Adds VEC logits to a thread's running (max, sum of exp(x - max), sum of x). Host too: tests/kernels checks it.
template <int VEC>
__host__ __device__ __forceinline__ void accumulate(const float (&v)[VEC], float& run_max, float& run_sum,
                                                    float& logit_sum) {
  float chunk_max = v[0];
#pragma unroll
  for (int e = 1; e < VEC; ++e) chunk_max = fmaxf(chunk_max, v[e]);
  if (chunk_max > run_max) {
    run_sum *= fast_exp(run_max - chunk_max);  // run_max = -inf: 0 * 0, the sum was empty
    run_max = chunk_max;
  }
  // -inf logits (masked-out tokens) add exp(-inf) = 0. While every logit seen is -inf, run_max is -inf too
  // and exp(v - run_max) would be exp(-inf + inf) = NaN: nothing to add yet.
  if (run_max != kNegInf) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) run_sum += fast_exp(v[e] - run_max);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) logit_sum += v[e];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
cross_entropy_stats_kernel(const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ target,
                           int64_t n, int64_t n_valid, int64_t vocab_start, float* __restrict__ local_max,
                           float* __restrict__ sum_exp, float* __restrict__ target_logit,
                           float* __restrict__ sum_logits) {
  __shared__ float scratch[33];
  const int64_t packed_end = n_valid / VEC * VEC;  // [0, packed_end) in packs, the rest one by one
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* x = logits + row * row_stride;
    float run_max = kNegInf, run_sum = 0.0f, logit_sum = 0.0f;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < packed_end; j += static_cast<int64_t>(blockDim.x) * VEC) {
      float v[VEC];
      load_pack<T, VEC>(x + j, v);
      accumulate<VEC>(v, run_max, run_sum, logit_sum);
    }
    for (int64_t j = packed_end + threadIdx.x; j < n_valid; j += blockDim.x) {
      const float v[1] = {to_float(x[j])};
      accumulate<1>(v, run_max, run_sum, logit_sum);
    }
    const float row_max = block_reduce(run_max, MaxOp(), scratch);
    // Threads that saw no column hold (-inf, 0): they add 0, and never exp(-inf - (-inf)) = NaN.
    const float rescaled = run_max == kNegInf ? 0.0f : run_sum * fast_exp(run_max - row_max);
    const float total = block_reduce(rescaled, SumOp(), scratch);
    const float logits_total = block_reduce(logit_sum, SumOp(), scratch);
    if (threadIdx.x == 0) {
      const int64_t t = target[row] - vocab_start;
      local_max[row] = row_max;
      sum_exp[row] = total;
      target_logit[row] = (t >= 0 && t < n_valid) ? to_float(x[t]) : 0.0f;
      sum_logits[row] = logits_total;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
cross_entropy_backward_kernel(T* logits, int64_t row_stride, const int64_t* __restrict__ target,
                              const float* __restrict__ lse, const float* __restrict__ grad_loss, int64_t n,
                              int64_t v_local, int64_t n_valid, int64_t vocab_start, float smooth_each,
                              float target_weight) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    T* x = logits + row * row_stride;
    const int64_t t = target[row] - vocab_start;  // outside [0, n_valid): no one-hot term on this rank
    const float row_lse = lse[row], g = grad_loss[row];
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < v_local; j += static_cast<int64_t>(blockDim.x) * VEC) {
      float v[VEC];
      load_pack<T, VEC>(x + j, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t col = j + e;
        const float onehot = col == t ? target_weight : 0.0f;
        v[e] = col < n_valid ? g * (fast_exp(v[e] - row_lse) - smooth_each - onehot) : 0.0f;
      }
      store_pack<T, VEC>(x + j, v);
    }
  }
}

unsigned threads_for(int64_t columns) {
  const int64_t threads = pow2_at_least((columns + 3) / 4, kRowThreads);
  return static_cast<unsigned>(threads < 32 ? 32 : threads);
}

template <typename T>
bool rows_packed(const T* logits, int64_t row_stride) {
  return aligned_to(logits, 16) && row_stride % max_vec<T>() == 0;
}

}  // namespace

template <typename T>
cudaError_t cross_entropy_stats(const T* logits, int64_t row_stride, const int64_t* target, int64_t n,
                                int64_t v_local, int64_t vocab_start, int64_t vocab_size, float* local_max,
                                float* sum_exp, float* target_logit, float* sum_logits, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t n_valid = valid_columns(v_local, vocab_start, vocab_size);
  const unsigned grid = grid_for(n, 1, kMaxRowBlocks);
  if (rows_packed(logits, row_stride)) {
    constexpr int vec = max_vec<T>();
    cross_entropy_stats_kernel<T, vec><<<grid, threads_for(n_valid / vec), 0, stream>>>(
        logits, row_stride, target, n, n_valid, vocab_start, local_max, sum_exp, target_logit, sum_logits);
  } else {
    cross_entropy_stats_kernel<T, 1><<<grid, threads_for(n_valid), 0, stream>>>(
        logits, row_stride, target, n, n_valid, vocab_start, local_max, sum_exp, target_logit, sum_logits);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t cross_entropy_backward(T* logits, int64_t row_stride, const int64_t* target, const float* lse,
                                   const float* grad_loss, int64_t n, int64_t v_local, int64_t vocab_start,
                                   int64_t vocab_size, float label_smoothing, cudaStream_t stream) {
  if (n == 0 || v_local == 0) return cudaSuccess;
  const int64_t n_valid = valid_columns(v_local, vocab_start, vocab_size);
  const float smooth_each = label_smoothing / static_cast<float>(vocab_size);
  const float target_weight = 1.0f - label_smoothing;
  const unsigned grid = grid_for(n, 1, kMaxRowBlocks);
  constexpr int vec = max_vec<T>();
  if (rows_packed(logits, row_stride) && v_local % vec == 0) {
    cross_entropy_backward_kernel<T, vec><<<grid, threads_for(v_local / vec), 0, stream>>>(
        logits, row_stride, target, lse, grad_loss, n, v_local, n_valid, vocab_start, smooth_each, target_weight);
  } else {
    cross_entropy_backward_kernel<T, 1><<<grid, threads_for(v_local), 0, stream>>>(
        logits, row_stride, target, lse, grad_loss, n, v_local, n_valid, vocab_start, smooth_each, target_weight);
  }
  return cudaGetLastError();
}

#define MTK_INSTANTIATE(T)                                                                                     \
  template cudaError_t cross_entropy_stats<T>(const T*, int64_t, const int64_t*, int64_t, int64_t, int64_t,     \
                                              int64_t, float*, float*, float*, float*, cudaStream_t);          \
  template cudaError_t cross_entropy_backward<T>(T*, int64_t, const int64_t*, const float*, const float*,       \
                                                 int64_t, int64_t, int64_t, int64_t, float, cudaStream_t);
MTK_INSTANTIATE(float)
MTK_INSTANTIATE(__half)
MTK_INSTANTIATE(__nv_bfloat16)
#undef MTK_INSTANTIATE

}  // namespace mtk
