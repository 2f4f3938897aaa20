// Launchers of the fused kernels: raw pointers, sizes and a stream; no torch. Each is defined in the .cu
// named in its section and explicitly instantiated for T in {float, __half, __nv_bfloat16} (and, for
// the norms, W in {T, float}). binding.cpp does the checks, the dtype dispatch and picks the stream.
// Every launcher returns the launch error (cudaSuccess when the kernel was queued).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mtk {

// ---- softmax.cu: probs = softmax(scale * scores) over the last dim of [batch, heads, sq, sk] ----

// Element strides of a bool mask broadcast to [batch, heads, sq, sk] (0 along broadcast dims).
struct MaskView {
  const bool* data;  // nullptr: no mask
  int64_t stride_batch, stride_head, stride_query, stride_key;
};

// causal: key j > query i excluded. mask (if data != nullptr): true = excluded. A fully excluded row gives 0.
template <typename T>
cudaError_t softmax_forward(const T* scores, T* probs, MaskView mask, bool causal, int64_t batch, int64_t heads,
                            int64_t sq, int64_t sk, float scale, cudaStream_t stream);

// grad_scores = scale * probs * (grad_probs - sum(grad_probs * probs)); masked entries have probs 0.
// causal lets the kernel skip the upper triangle (its gradient is 0).
template <typename T>
cudaError_t softmax_backward(const T* grad_probs, const T* probs, T* grad_scores, bool causal, int64_t rows,
                             int64_t sq, int64_t sk, float scale, cudaStream_t stream);

// ---- norm.cu: LayerNorm (rms = false) or RMSNorm (rms = true) over rows of `cols` ----

// mean may be nullptr when rms; bias may be nullptr. mean / rstd: fp32 [rows].
template <typename T, typename W>
cudaError_t norm_forward(const T* x, const W* weight, const W* bias, T* y, float* mean, float* rstd, int64_t rows,
                         int64_t cols, float eps, bool rms, cudaStream_t stream);

// How many partial rows of the weight / bias gradient the backward writes (workspace: fp32 [that, cols] each).
int64_t norm_backward_partials(int64_t rows);

// grad_bias may be nullptr (no bias); workspace_w / workspace_b are fp32 [norm_backward_partials(rows), cols].
template <typename T, typename W>
cudaError_t norm_backward(const T* grad_y, const T* x, const W* weight, const float* mean, const float* rstd,
                          T* grad_x, W* grad_weight, W* grad_bias, float* workspace_w, float* workspace_b,
                          int64_t rows, int64_t cols, bool rms, cudaStream_t stream);

// ---- activation.cu: x [rows, cols], bias [cols] or nullptr ----

template <typename T>
cudaError_t bias_gelu_forward(const T* x, const T* bias, T* y, int64_t rows, int64_t cols, cudaStream_t stream);
template <typename T>
cudaError_t bias_gelu_backward(const T* grad_y, const T* x, const T* bias, T* grad_x, int64_t rows, int64_t cols,
                               cudaStream_t stream);

// x [rows, 2 * half], y [rows, half]: y = silu(x[:, :half] + b[:half]) * (x[:, half:] + b[half:]).
template <typename T>
cudaError_t bias_swiglu_forward(const T* x, const T* bias, T* y, int64_t rows, int64_t half, cudaStream_t stream);
template <typename T>
cudaError_t bias_swiglu_backward(const T* grad_y, const T* x, const T* bias, T* grad_x, int64_t rows, int64_t half,
                                 cudaStream_t stream);

// ---- dropout.cu: out = residual + keep * (x + bias) / (1 - prob), keep from Philox(seed, element index) ----

// seed: one int64 on the device (nullptr when prob is 0 or >= 1: nothing random happens).
template <typename T>
cudaError_t bias_dropout_add_forward(const T* x, const T* bias, const T* residual, T* out, int64_t rows,
                                     int64_t cols, float prob, const int64_t* seed, cudaStream_t stream);
// grad_x = keep * grad_out / (1 - prob), the same keep as the forward with the same seed.
template <typename T>
cudaError_t dropout_backward(const T* grad_out, T* grad_x, int64_t numel, float prob, const int64_t* seed,
                             cudaStream_t stream);

// ---- rotary.cu: t [s, b, n, d] with element strides (last dim contiguous) -> out contiguous ----

// cos / sin fp32 [s, d/2]. inverse rotates by minus the angle (the backward).
template <typename T>
cudaError_t rotary(const T* t, T* out, const float* cos, const float* sin, int64_t s, int64_t b, int64_t n,
                   int64_t d, int64_t stride_s, int64_t stride_b, int64_t stride_n, bool inverse, cudaStream_t stream);

// ---- cross_entropy.cu: logits [n, v_local] with a row stride; global column = vocab_start + j ----

// Columns with global index >= vocab_size are padding and excluded. Outputs fp32 [n].
template <typename T>
cudaError_t cross_entropy_stats(const T* logits, int64_t row_stride, const int64_t* target, int64_t n,
                                int64_t v_local, int64_t vocab_start, int64_t vocab_size, float* local_max,
                                float* sum_exp, float* target_logit, float* sum_logits, cudaStream_t stream);

// In place: logits <- grad_loss * (exp(logits - lse) - (1 - eps) * onehot(target) - eps / vocab_size), 0 in padding.
template <typename T>
cudaError_t cross_entropy_backward(T* logits, int64_t row_stride, const int64_t* target, const float* lse,
                                   const float* grad_loss, int64_t n, int64_t v_local, int64_t vocab_start,
                                   int64_t vocab_size, float label_smoothing, cudaStream_t stream);

}  // namespace mtk
