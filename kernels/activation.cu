// Bias + GeLU (tanh form) and bias + SwiGLU, forward and backward: elementwise, grid-stride, 16-byte
// accesses when the row length and the pointers allow (VEC > 1), element by element otherwise.
#include "common.cuh"
#include "ops.h"

namespace mtk {
namespace {

constexpr int kThreads = 256;
constexpr float kGeluAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluBeta = 0.044715f;

__device__ __forceinline__ float gelu_tanh(float y) {
  return 0.5f * y * (1.0f + tanhf(kGeluAlpha * (y + kGeluBeta * y * y * y)));
}

__device__ __forceinline__ float gelu_tanh_grad(float y) {
  const float t = tanhf(kGeluAlpha * (y + kGeluBeta * y * y * y));
  return 0.5f * (1.0f + t) + 0.5f * y * (1.0f - t * t) * kGeluAlpha * (1.0f + 3.0f * kGeluBeta * y * y);
}

// 1 / (1 + exp(-a)): exp overflows to inf for a < -88 and the result is 0, never NaN.
__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + fast_exp(-a)); }

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t index_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// x + bias for VEC elements starting at flat index i (all in one row, since cols % VEC == 0 when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_biased(const T* x, const T* bias, int64_t i, int64_t col, float (&v)[VEC]) {
  load_pack<T, VEC>(x + i, v);
  if (bias != nullptr) {
    float b[VEC];
    load_pack<T, VEC>(bias + col, b);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] += b[e];
  }
}

template <typename T, int VEC>
__global__ void bias_gelu_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                         int64_t chunks, int64_t cols) {
  for (int64_t c = first_index(); c < chunks; c += index_stride()) {
    const int64_t i = c * VEC;
    float v[VEC];
    load_biased<T, VEC>(x, bias, i, i % cols, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = gelu_tanh(v[e]);
    store_pack<T, VEC>(y + i, v);
  }
}

template <typename T, int VEC>
__global__ void bias_gelu_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                          const T* __restrict__ bias, T* __restrict__ grad_x, int64_t chunks,
                                          int64_t cols) {
  for (int64_t c = first_index(); c < chunks; c += index_stride()) {
    const int64_t i = c * VEC;
    float v[VEC], g[VEC];
    load_biased<T, VEC>(x, bias, i, i % cols, v);
    load_pack<T, VEC>(grad_y + i, g);
#pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] *= gelu_tanh_grad(v[e]);
    store_pack<T, VEC>(grad_x + i, g);
  }
}

// y [rows, half] from x [rows, 2 * half]: chunk c covers y[row, j .. j + VEC).
template <typename T, int VEC>
__global__ void bias_swiglu_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                           int64_t chunks, int64_t half) {
  for (int64_t c = first_index(); c < chunks; c += index_stride()) {
    const int64_t i = c * VEC, row = i / half, j = i - row * half;
    const T* x_row = x + row * 2 * half;
    float gate[VEC], up[VEC];
    load_biased<T, VEC>(x_row, bias, j, j, gate);
    load_biased<T, VEC>(x_row, bias, half + j, half + j, up);
#pragma unroll
    for (int e = 0; e < VEC; ++e) gate[e] = gate[e] * sigmoid(gate[e]) * up[e];
    store_pack<T, VEC>(y + i, gate);
  }
}

template <typename T, int VEC>
__global__ void bias_swiglu_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                            const T* __restrict__ bias, T* __restrict__ grad_x, int64_t chunks,
                                            int64_t half) {
  for (int64_t c = first_index(); c < chunks; c += index_stride()) {
    const int64_t i = c * VEC, row = i / half, j = i - row * half;
    const T* x_row = x + row * 2 * half;
    float gate[VEC], up[VEC], g[VEC];
    load_biased<T, VEC>(x_row, bias, j, j, gate);
    load_biased<T, VEC>(x_row, bias, half + j, half + j, up);
    load_pack<T, VEC>(grad_y + i, g);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float s = sigmoid(gate[e]);
      const float grad_gate = g[e] * up[e] * s * (1.0f + gate[e] * (1.0f - s));
      up[e] = g[e] * gate[e] * s;  // d/d up
      gate[e] = grad_gate;
    }
    store_pack<T, VEC>(grad_x + row * 2 * half + j, gate);
    store_pack<T, VEC>(grad_x + row * 2 * half + half + j, up);
  }
}

// Launch with VEC = 16 bytes of T when `vec_ok`, else element by element.
template <typename T, typename F>
void launch_elementwise(int64_t numel, bool vec_ok, F&& launch) {
  constexpr int vec = max_vec<T>();
  if (vec_ok) {
    const int64_t chunks = numel / vec;
    launch(std::integral_constant<int, vec>{}, chunks, grid_for(chunks, kThreads));
  } else {
    launch(std::integral_constant<int, 1>{}, numel, grid_for(numel, kThreads));
  }
}

template <typename T>
bool all_aligned(const T* a, const T* b, const T* c, const T* d) {
  return aligned_to(a, 16) && aligned_to(b, 16) && aligned_to(c, 16) && (d == nullptr || aligned_to(d, 16));
}

}  // namespace

template <typename T>
cudaError_t bias_gelu_forward(const T* x, const T* bias, T* y, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t numel = rows * cols;
  if (numel == 0) return cudaSuccess;
  const bool vec_ok = cols % max_vec<T>() == 0 && all_aligned<T>(x, y, x, bias);
  launch_elementwise<T>(numel, vec_ok, [&](auto vec, int64_t chunks, unsigned grid) {
    bias_gelu_forward_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(x, bias, y, chunks, cols);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_gelu_backward(const T* grad_y, const T* x, const T* bias, T* grad_x, int64_t rows, int64_t cols,
                               cudaStream_t stream) {
  const int64_t numel = rows * cols;
  if (numel == 0) return cudaSuccess;
  const bool vec_ok = cols % max_vec<T>() == 0 && all_aligned<T>(grad_y, x, grad_x, bias);
  launch_elementwise<T>(numel, vec_ok, [&](auto vec, int64_t chunks, unsigned grid) {
    bias_gelu_backward_kernel<T, decltype(vec)::value>
        <<<grid, kThreads, 0, stream>>>(grad_y, x, bias, grad_x, chunks, cols);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_swiglu_forward(const T* x, const T* bias, T* y, int64_t rows, int64_t half, cudaStream_t stream) {
  const int64_t numel = rows * half;
  if (numel == 0) return cudaSuccess;
  const bool vec_ok = half % max_vec<T>() == 0 && all_aligned<T>(x, y, x, bias);
  launch_elementwise<T>(numel, vec_ok, [&](auto vec, int64_t chunks, unsigned grid) {
    bias_swiglu_forward_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(x, bias, y, chunks, half);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_swiglu_backward(const T* grad_y, const T* x, const T* bias, T* grad_x, int64_t rows, int64_t half,
                                 cudaStream_t stream) {
  const int64_t numel = rows * half;
  if (numel == 0) return cudaSuccess;
  const bool vec_ok = half % max_vec<T>() == 0 && all_aligned<T>(grad_y, x, grad_x, bias);
  launch_elementwise<T>(numel, vec_ok, [&](auto vec, int64_t chunks, unsigned grid) {
    bias_swiglu_backward_kernel<T, decltype(vec)::value>
        <<<grid, kThreads, 0, stream>>>(grad_y, x, bias, grad_x, chunks, half);
  });
  return cudaGetLastError();
}

#define MTK_INSTANTIATE(T)                                                                                  \
  template cudaError_t bias_gelu_forward<T>(const T*, const T*, T*, int64_t, int64_t, cudaStream_t);        \
  template cudaError_t bias_gelu_backward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, cudaStream_t); \
  template cudaError_t bias_swiglu_forward<T>(const T*, const T*, T*, int64_t, int64_t, cudaStream_t);      \
  template cudaError_t bias_swiglu_backward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, cudaStream_t);
MTK_INSTANTIATE(float)
MTK_INSTANTIATE(__half)
MTK_INSTANTIATE(__nv_bfloat16)
#undef MTK_INSTANTIATE

}  // namespace mtk
