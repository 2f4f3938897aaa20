// LayerNorm / RMSNorm over the last dim (rows of `cols`), fp32 statistics, weights in T or fp32.
// Forward: one block per row, the row kept in registers when it fits (two-pass variance, no
// cancellation). Backward: each block walks a strided set of rows, keeps its share of the weight and
// bias gradient in registers, writes one partial row; a second kernel sums the partials per column.
#include "common.cuh"
#include "ops.h"

namespace mtk {
namespace {

template <typename W, int VEC>
__device__ __forceinline__ void load_weight(const W* p, int64_t j, bool vec_ok, float (&out)[VEC]) {
  if (vec_ok) {
    load_pack<W, VEC>(p + j, out);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = to_float(p[j + e]);
  }
}

// weight_vec: the weight (and bias) pointers are aligned for VEC-wide loads of W (checked by the launcher).
template <typename T, typename W, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kRowThreads)
norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                    T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows,
                    int64_t cols, float eps, bool rms, bool weight_vec) {
  __shared__ float scratch[33];
  constexpr int SLOTS = CHUNKS > 0 ? CHUNKS : 1;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* in = x + row * cols;
    float cache[SLOTS][VEC];
    auto load_row = [&](int k, int64_t j, float (&v)[VEC]) {
      if constexpr (CHUNKS > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = cache[k][e];
      } else {
        load_pack<T, VEC>(in + j, v);
      }
    };

    float mean = 0.0f;
    if (!rms) {
      float local = 0.0f;
      for_each_chunk<VEC, CHUNKS>(cols, [&](int k, int64_t j) {
        float v[VEC];
        load_pack<T, VEC>(in + j, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          local += v[e];
          if constexpr (CHUNKS > 0) cache[k][e] = v[e];
        }
      });
      mean = block_reduce(local, SumOp(), scratch) * inv_cols;
    }
    float local_sq = 0.0f;
    for_each_chunk<VEC, CHUNKS>(cols, [&](int k, int64_t j) {
      float v[VEC];
      if (rms) {
        load_pack<T, VEC>(in + j, v);  // the first read of the row for RMSNorm
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if constexpr (CHUNKS > 0) cache[k][e] = v[e];
        }
      } else {
        load_row(k, j, v);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) local_sq += (v[e] - mean) * (v[e] - mean);
    });
    const float rstd = rsqrtf(block_reduce(local_sq, SumOp(), scratch) * inv_cols + eps);
    if (threadIdx.x == 0) {
      if (!rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    for_each_chunk<VEC, CHUNKS>(cols, [&](int k, int64_t j) {
      float v[VEC], w[VEC];
      load_row(k, j, v);
      load_weight<W, VEC>(weight, j, weight_vec, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = (v[e] - mean) * rstd * w[e];
      if (bias != nullptr) {
        float b[VEC];
        load_weight<W, VEC>(bias, j, weight_vec, b);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] += b[e];
      }
      store_pack<T, VEC>(y + row * cols + j, v);
    });
  }
}

// grad_x = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)); RMSNorm drops the mean(g*w) term.
// Block b handles rows b, b + gridDim.x, ... and writes its weight / bias gradient share to partial row b.
template <typename T, typename W, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kRowThreads)
norm_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const W* __restrict__ weight,
                     const float* __restrict__ mean_in, const float* __restrict__ rstd_in, T* __restrict__ grad_x,
                     float* __restrict__ partial_w, float* __restrict__ partial_b, int64_t rows, int64_t cols,
                     bool rms, bool weight_vec) {
  __shared__ float scratch[33];
  constexpr int SLOTS = CHUNKS > 0 ? CHUNKS : 1;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  float* my_partial_w = partial_w + blockIdx.x * cols;
  float* my_partial_b = partial_b == nullptr ? nullptr : partial_b + blockIdx.x * cols;
  float acc_w[SLOTS][VEC], acc_b[SLOTS][VEC];
#pragma unroll
  for (int k = 0; k < SLOTS; ++k) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc_w[k][e] = acc_b[k][e] = 0.0f;
  }
  if constexpr (CHUNKS == 0) {  // streaming: accumulate straight into this block's partial row
    for_each_chunk<VEC, CHUNKS>(cols, [&](int, int64_t j) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        my_partial_w[j + e] = 0.0f;
        if (my_partial_b != nullptr) my_partial_b[j + e] = 0.0f;
      }
    });
  }

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float mean = rms ? 0.0f : mean_in[row];
    const float rstd = rstd_in[row];
    const T* x_row = x + row * cols;
    const T* g_row = grad_y + row * cols;
    float local_gw = 0.0f, local_gwx = 0.0f;
    for_each_chunk<VEC, CHUNKS>(cols, [&](int k, int64_t j) {
      float v[VEC], g[VEC], w[VEC];
      load_pack<T, VEC>(x_row + j, v);
      load_pack<T, VEC>(g_row + j, g);
      load_weight<W, VEC>(weight, j, weight_vec, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = (v[e] - mean) * rstd;
        local_gw += g[e] * w[e];
        local_gwx += g[e] * w[e] * xhat;
        if constexpr (CHUNKS > 0) {
          acc_w[k][e] += g[e] * xhat;
          acc_b[k][e] += g[e];
        } else {
          my_partial_w[j + e] += g[e] * xhat;
          if (my_partial_b != nullptr) my_partial_b[j + e] += g[e];
        }
      }
    });
    const float mean_gw = rms ? 0.0f : block_reduce(local_gw, SumOp(), scratch) * inv_cols;
    const float mean_gwx = block_reduce(local_gwx, SumOp(), scratch) * inv_cols;
    // Second read of the row: it was just read by this block, so it comes from L1 / L2.
    for_each_chunk<VEC, CHUNKS>(cols, [&](int, int64_t j) {
      float v[VEC], g[VEC], w[VEC];
      load_pack<T, VEC>(x_row + j, v);
      load_pack<T, VEC>(g_row + j, g);
      load_weight<W, VEC>(weight, j, weight_vec, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = (v[e] - mean) * rstd;
        v[e] = rstd * (g[e] * w[e] - mean_gw - xhat * mean_gwx);
      }
      store_pack<T, VEC>(grad_x + row * cols + j, v);
    });
  }

  if constexpr (CHUNKS > 0) {
    for_each_chunk<VEC, CHUNKS>(cols, [&](int k, int64_t j) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        my_partial_w[j + e] = acc_w[k][e];
        if (my_partial_b != nullptr) my_partial_b[j + e] = acc_b[k][e];
      }
    });
  }
}

// out[j] = sum over p of partial[p, j]: 32 columns per block, 16 threads down each column, then a
// shared-memory sum; fixed order, so the result is deterministic.
template <typename W>
__global__ void sum_partials_kernel(const float* __restrict__ partial, W* __restrict__ out, int64_t partials,
                                    int64_t cols) {
  __shared__ float sums[16][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (col < cols) {
    for (int64_t p = threadIdx.y; p < partials; p += 16) acc += partial[p * cols + col];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) total += sums[i][threadIdx.x];
    out[col] = from_float<W>(total);
  }
}

constexpr int64_t kMaxRowBlocks = int64_t(1) << 24;

// rows_aligned: every row pointer the kernel touches is 16-byte aligned. Weights (and bias) get VEC-wide
// loads only when rows do and they are aligned for VEC elements of W.
template <typename T, typename W>
RowPlan norm_plan(int64_t cols, bool rows_aligned, const W* weight, const W* bias, bool* weight_vec,
                  int chunks_per_thread) {
  constexpr int vec = max_vec<T>();
  const bool rows_vec = cols % vec == 0 && rows_aligned;
  *weight_vec = rows_vec && aligned_to(weight, sizeof(W) * vec) && (bias == nullptr || aligned_to(bias, sizeof(W) * vec));
  return plan_row(cols, vec, rows_vec, chunks_per_thread);
}

}  // namespace

int64_t norm_backward_partials(int64_t rows) {
  // About 1024 threads' worth of rows in flight per SM, fewer partial rows when rows are few. The row
  // plan uses at least 32 threads, so 32 blocks per SM is the most that can be resident anyway.
  const int64_t wanted = static_cast<int64_t>(sm_count()) * 32;
  return rows < wanted ? (rows > 0 ? rows : 1) : wanted;
}

template <typename T, typename W>
cudaError_t norm_forward(const T* x, const W* weight, const W* bias, T* y, float* mean, float* rstd, int64_t rows,
                         int64_t cols, float eps, bool rms, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  bool weight_vec = false;
  const RowPlan plan = norm_plan<T, W>(cols, aligned_to(x, 16) && aligned_to(y, 16), weight, bias, &weight_vec, 2);
  const unsigned grid = grid_for(rows, 1, kMaxRowBlocks);
  dispatch_row_plan<T>(plan, [&](auto vec, auto chunks) {
    norm_forward_kernel<T, W, decltype(vec)::value, decltype(chunks)::value>
        <<<grid, plan.threads, 0, stream>>>(x, weight, bias, y, mean, rstd, rows, cols, eps, rms, weight_vec);
  });
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t norm_backward(const T* grad_y, const T* x, const W* weight, const float* mean, const float* rstd,
                          T* grad_x, W* grad_weight, W* grad_bias, float* workspace_w, float* workspace_b,
                          int64_t rows, int64_t cols, bool rms, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;  // the binding zero-fills the weight gradients of an empty input
  bool weight_vec = false;
  const bool rows_aligned = aligned_to(x, 16) && aligned_to(grad_y, 16) && aligned_to(grad_x, 16);
  // One chunk per thread where the row allows: more threads per row means fewer blocks fill the GPU,
  // hence fewer partial rows of the weight gradient to write and sum.
  const RowPlan plan = norm_plan<T, W>(cols, rows_aligned, weight, nullptr, &weight_vec, 1);
  // Blocks beyond about 1024 threads per SM would only add partial rows (norm_backward_partials, which
  // sized the workspace, assumed the smallest block).
  const int64_t partials = norm_backward_partials(rows);
  const int64_t resident = static_cast<int64_t>(sm_count()) * (1024 / plan.threads > 0 ? 1024 / plan.threads : 1);
  const int64_t blocks = partials < resident ? partials : resident;
  float* partial_b = grad_bias == nullptr ? nullptr : workspace_b;
  dispatch_row_plan<T>(plan, [&](auto vec, auto chunks) {
    norm_backward_kernel<T, W, decltype(vec)::value, decltype(chunks)::value><<<blocks, plan.threads, 0, stream>>>(
        grad_y, x, weight, mean, rstd, grad_x, workspace_w, partial_b, rows, cols, rms, weight_vec);
  });
  const dim3 reduce_block(32, 16);
  const unsigned reduce_grid = grid_for(cols, 32, int64_t(1) << 30);
  sum_partials_kernel<W><<<reduce_grid, reduce_block, 0, stream>>>(workspace_w, grad_weight, blocks, cols);
  if (grad_bias != nullptr) {
    sum_partials_kernel<W><<<reduce_grid, reduce_block, 0, stream>>>(workspace_b, grad_bias, blocks, cols);
  }
  return cudaGetLastError();
}

#define MTK_INSTANTIATE(T, W)                                                                                       \
  template cudaError_t norm_forward<T, W>(const T*, const W*, const W*, T*, float*, float*, int64_t, int64_t, float, \
                                          bool, cudaStream_t);                                                     \
  template cudaError_t norm_backward<T, W>(const T*, const T*, const W*, const float*, const float*, T*, W*, W*,     \
                                           float*, float*, int64_t, int64_t, bool, cudaStream_t);
MTK_INSTANTIATE(float, float)
MTK_INSTANTIATE(__half, __half)
MTK_INSTANTIATE(__half, float)
MTK_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
MTK_INSTANTIATE(__nv_bfloat16, float)
#undef MTK_INSTANTIATE

}  // namespace mtk
