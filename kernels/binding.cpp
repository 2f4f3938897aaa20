// Python binding of the fused kernels: input checks, dtype dispatch, output allocation and the current
// CUDA stream. Compiled only by the real build (torch.utils.cpp_extension with a CUDA torch): the
// kernels and their launchers in the .cu files see raw pointers and sizes only.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace {

using at::Tensor;

// Calls f(T*) with a null pointer of the CUDA element type matching `dtype`.
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (float32, float16 and bfloat16 only)");
  }
}

template <typename P>
using Elem = std::remove_pointer_t<P>;

template <typename T>
const T* cptr(const Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mptr(const Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <typename T>
const T* optional_ptr(const std::optional<Tensor>& t) { return t.has_value() ? cptr<T>(*t) : nullptr; }

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
}

void check_tensor(const Tensor& t, const char* op, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
}

void check_rows(const Tensor& t, const char* op, const char* name, const Tensor& like) {
  check_tensor(t, op, name, like);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
}

void check_bias(const std::optional<Tensor>& bias, const char* op, const Tensor& x, int64_t size) {
  if (!bias.has_value()) return;
  check_rows(*bias, op, "bias", x);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == size, op, ": bias must have shape [", size, "]");
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// ---- softmax ----

Tensor softmax_forward(const Tensor& scores, const std::optional<Tensor>& mask, double scale, bool causal) {
  const char* op = "softmax_forward";
  check_rows(scores, op, "scores", scores);
  TORCH_CHECK(scores.dim() == 4, op, ": scores must be [b, np, sq, sk]");
  mtk::MaskView view{nullptr, 0, 0, 0, 0};
  if (causal) {
    TORCH_CHECK(scores.size(2) == scores.size(3), op, ": causal softmax needs sq == sk");
  } else {
    TORCH_CHECK(mask.has_value(), op, ": a mask is required unless causal");
    check_tensor(*mask, op, "mask", scores);
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool");
    TORCH_CHECK(mask->sizes() == scores.sizes(), op, ": mask must be expanded to the scores' shape");
    view = mtk::MaskView{mask->data_ptr<bool>(), mask->stride(0), mask->stride(1), mask->stride(2), mask->stride(3)};
  }
  const c10::cuda::CUDAGuard guard(scores.device());
  Tensor probs = at::empty_like(scores);
  dispatch_float(scores.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::softmax_forward<T>(cptr<T>(scores), mptr<T>(probs), view, causal, scores.size(0),
                                         scores.size(1), scores.size(2), scores.size(3), static_cast<float>(scale),
                                         stream()),
                 op);
  });
  return probs;
}

Tensor softmax_backward(const Tensor& grad_probs, const Tensor& probs, double scale, bool causal) {
  const char* op = "softmax_backward";
  check_rows(probs, op, "probs", probs);
  check_rows(grad_probs, op, "grad_probs", probs);
  TORCH_CHECK(probs.dim() == 4 && grad_probs.sizes() == probs.sizes(), op, ": grad and probs must be equal [b, np, sq, sk]");
  const c10::cuda::CUDAGuard guard(probs.device());
  Tensor grad_scores = at::empty_like(probs);
  dispatch_float(probs.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::softmax_backward<T>(cptr<T>(grad_probs), cptr<T>(probs), mptr<T>(grad_scores), causal,
                                          probs.size(0) * probs.size(1) * probs.size(2), probs.size(2),
                                          probs.size(3), static_cast<float>(scale), stream()),
                 op);
  });
  return grad_scores;
}

// ---- norms: x [rows, cols]; weight (and bias) [cols] in x's dtype or fp32 ----

// Calls f(T*, W*) for x's dtype and the weight's (W = T, or float).
template <typename F>
void dispatch_norm(const Tensor& x, const Tensor& weight, const char* op, F&& f) {
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    if (weight.scalar_type() == x.scalar_type()) {
      f(static_cast<T*>(nullptr), static_cast<T*>(nullptr));
    } else {
      TORCH_CHECK(weight.scalar_type() == at::kFloat, op, ": weight dtype ", weight.scalar_type(),
                  " must equal the input's (", x.scalar_type(), ") or be float32");
      f(static_cast<T*>(nullptr), static_cast<float*>(nullptr));
    }
  });
}

void check_norm_params(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const char* op) {
  check_rows(x, op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be [rows, cols]");
  check_tensor(weight, op, "weight", x);
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1), op,
              ": weight must be contiguous [", x.size(1), "]");
  if (bias.has_value()) {
    check_rows(*bias, op, "bias", weight);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), op, ": bias must be [", x.size(1), "]");
  }
}

std::vector<Tensor> norm_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, double eps,
                                 bool rms) {
  const char* op = "norm_forward";
  check_norm_params(x, weight, bias, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto fp32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({rms ? 0 : rows}, fp32);
  Tensor rstd = at::empty({rows}, fp32);
  dispatch_norm(x, weight, op, [&](auto t_tag, auto w_tag) {
    using T = Elem<decltype(t_tag)>;
    using W = Elem<decltype(w_tag)>;
    check_launch(mtk::norm_forward<T, W>(cptr<T>(x), cptr<W>(weight), optional_ptr<W>(bias), mptr<T>(y),
                                         rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, cols,
                                         static_cast<float>(eps), rms, stream()),
                 op);
  });
  return {y, mean, rstd};
}

std::vector<Tensor> norm_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& mean,
                                  const Tensor& rstd, bool rms, bool has_bias) {
  const char* op = "norm_backward";
  check_norm_params(x, weight, std::nullopt, op);
  check_rows(grad_y, op, "grad_y", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(rstd.numel() == rows && (rms || mean.numel() == rows), op, ": mean / rstd must hold one value per row");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x = at::empty_like(x);
  Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  Tensor grad_bias = has_bias ? at::empty_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  if (rows == 0) {  // nothing to reduce: the weight gradients are 0
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  const int64_t partials = mtk::norm_backward_partials(rows);
  const auto fp32 = x.options().dtype(at::kFloat);
  Tensor workspace_w = at::empty({partials, cols}, fp32);
  Tensor workspace_b = at::empty({has_bias ? partials : 0, cols}, fp32);
  dispatch_norm(x, weight, op, [&](auto t_tag, auto w_tag) {
    using T = Elem<decltype(t_tag)>;
    using W = Elem<decltype(w_tag)>;
    check_launch(mtk::norm_backward<T, W>(cptr<T>(grad_y), cptr<T>(x), cptr<W>(weight),
                                          rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                          mptr<T>(grad_x), mptr<W>(grad_weight), has_bias ? mptr<W>(grad_bias) : nullptr,
                                          workspace_w.data_ptr<float>(), has_bias ? workspace_b.data_ptr<float>() : nullptr,
                                          rows, cols, rms, stream()),
                 op);
  });
  return {grad_x, grad_weight, grad_bias};
}

// ---- activations: x [rows, cols] ----

void check_activation(const Tensor& x, const std::optional<Tensor>& bias, const char* op) {
  check_rows(x, op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be [rows, cols]");
  check_bias(bias, op, x, x.size(1));
}

Tensor bias_gelu_forward(const Tensor& x, const std::optional<Tensor>& bias) {
  const char* op = "bias_gelu_forward";
  check_activation(x, bias, op);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::bias_gelu_forward<T>(cptr<T>(x), optional_ptr<T>(bias), mptr<T>(y), x.size(0), x.size(1), stream()), op);
  });
  return y;
}

Tensor bias_gelu_backward(const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& bias) {
  const char* op = "bias_gelu_backward";
  check_activation(x, bias, op);
  check_rows(grad_y, op, "grad_y", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x = at::empty_like(x);
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::bias_gelu_backward<T>(cptr<T>(grad_y), cptr<T>(x), optional_ptr<T>(bias), mptr<T>(grad_x),
                                            x.size(0), x.size(1), stream()),
                 op);
  });
  return grad_x;
}

Tensor bias_swiglu_forward(const Tensor& x, const std::optional<Tensor>& bias) {
  const char* op = "bias_swiglu_forward";
  check_activation(x, bias, op);
  TORCH_CHECK(x.size(1) % 2 == 0, op, ": the last dim must be even");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t half = x.size(1) / 2;
  Tensor y = at::empty({x.size(0), half}, x.options());
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::bias_swiglu_forward<T>(cptr<T>(x), optional_ptr<T>(bias), mptr<T>(y), x.size(0), half, stream()), op);
  });
  return y;
}

Tensor bias_swiglu_backward(const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& bias) {
  const char* op = "bias_swiglu_backward";
  check_activation(x, bias, op);
  check_rows(grad_y, op, "grad_y", x);
  const int64_t half = x.size(1) / 2;
  TORCH_CHECK(x.size(1) % 2 == 0 && grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == half, op,
              ": grad_y must be [rows, cols / 2]");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x = at::empty_like(x);
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::bias_swiglu_backward<T>(cptr<T>(grad_y), cptr<T>(x), optional_ptr<T>(bias), mptr<T>(grad_x),
                                              x.size(0), half, stream()),
                 op);
  });
  return grad_x;
}

// ---- bias + dropout + residual ----

const int64_t* seed_ptr(const std::optional<Tensor>& seed, double prob, const Tensor& like, const char* op) {
  const bool random = prob > 0.0 && prob < 1.0;
  if (!random) return nullptr;
  TORCH_CHECK(seed.has_value(), op, ": a seed tensor is required when 0 < prob < 1");
  check_tensor(*seed, op, "seed", like);
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() >= 1, op, ": seed must hold one int64");
  return seed->data_ptr<int64_t>();
}

Tensor bias_dropout_add_forward(const Tensor& x, const std::optional<Tensor>& bias, const Tensor& residual, double prob,
                                const std::optional<Tensor>& seed) {
  const char* op = "bias_dropout_add_forward";
  check_activation(x, bias, op);
  check_rows(residual, op, "residual", x);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t* seed_data = seed_ptr(seed, prob, x, op);
  Tensor out = at::empty_like(x);
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::bias_dropout_add_forward<T>(cptr<T>(x), optional_ptr<T>(bias), cptr<T>(residual), mptr<T>(out),
                                                  x.size(0), x.size(1), static_cast<float>(prob), seed_data, stream()),
                 op);
  });
  return out;
}

Tensor dropout_backward(const Tensor& grad_out, double prob, const std::optional<Tensor>& seed) {
  const char* op = "dropout_backward";
  check_rows(grad_out, op, "grad_out", grad_out);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t* seed_data = seed_ptr(seed, prob, grad_out, op);
  Tensor grad_x = at::empty_like(grad_out);
  dispatch_float(grad_out.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::dropout_backward<T>(cptr<T>(grad_out), mptr<T>(grad_x), grad_out.numel(), static_cast<float>(prob),
                                          seed_data, stream()),
                 op);
  });
  return grad_x;
}

// ---- rotary ----

Tensor rotary(const Tensor& t, const Tensor& cos, const Tensor& sin, bool inverse) {
  const char* op = "rotary";
  check_tensor(t, op, "t", t);
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, op, ": t must be [s, b, n, d] with a contiguous last dim");
  const int64_t s = t.size(0), d = t.size(3);
  TORCH_CHECK(d % 2 == 0, op, ": the head dim must be even");
  for (const Tensor* table : {&cos, &sin}) {
    check_tensor(*table, op, "cos/sin", t);
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                    table->size(0) == s && table->size(1) == d / 2,
                op, ": cos and sin must be contiguous float32 [s, d/2]");
  }
  const c10::cuda::CUDAGuard guard(t.device());
  Tensor out = at::empty(t.sizes(), t.options());  // contiguous
  dispatch_float(t.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::rotary<T>(cptr<T>(t), mptr<T>(out), cos.data_ptr<float>(), sin.data_ptr<float>(), s, t.size(1),
                                t.size(2), d, t.stride(0), t.stride(1), t.stride(2), inverse, stream()),
                 op);
  });
  return out;
}

// ---- cross entropy, local part ----

void check_logits(const Tensor& logits, const Tensor& target, const char* op) {
  check_tensor(logits, op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, op, ": logits must be [n, v_local] with contiguous rows");
  check_tensor(target, op, "target", logits);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == logits.size(0), op,
              ": target must be contiguous int64 [n]");
}

std::vector<Tensor> cross_entropy_stats(const Tensor& logits, const Tensor& target, int64_t vocab_start,
                                        int64_t vocab_size) {
  const char* op = "cross_entropy_stats";
  check_logits(logits, target, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const auto fp32 = logits.options().dtype(at::kFloat);
  Tensor local_max = at::empty({n}, fp32), sum_exp = at::empty({n}, fp32);
  Tensor target_logit = at::empty({n}, fp32), sum_logits = at::empty({n}, fp32);
  dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::cross_entropy_stats<T>(cptr<T>(logits), logits.stride(0), target.data_ptr<int64_t>(), n,
                                             logits.size(1), vocab_start, vocab_size, local_max.data_ptr<float>(),
                                             sum_exp.data_ptr<float>(), target_logit.data_ptr<float>(),
                                             sum_logits.data_ptr<float>(), stream()),
                 op);
  });
  return {local_max, sum_exp, target_logit, sum_logits};
}

void cross_entropy_backward_(const Tensor& logits, const Tensor& target, int64_t vocab_start, int64_t vocab_size,
                             const Tensor& lse, const Tensor& grad_loss, double label_smoothing) {
  const char* op = "cross_entropy_backward_";
  check_logits(logits, target, op);
  for (const Tensor* t : {&lse, &grad_loss}) {
    check_tensor(*t, op, "lse/grad_loss", logits);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == logits.size(0), op,
                ": lse and grad_loss must be contiguous float32 [n]");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    check_launch(mtk::cross_entropy_backward<T>(mptr<T>(logits), logits.stride(0), target.data_ptr<int64_t>(),
                                                lse.data_ptr<float>(), grad_loss.data_ptr<float>(), logits.size(0),
                                                logits.size(1), vocab_start, vocab_size,
                                                static_cast<float>(label_smoothing), stream()),
                 op);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatronish fused CUDA kernels (see megatronish/ops for the Python face)";
  m.def("softmax_forward", &softmax_forward);
  m.def("softmax_backward", &softmax_backward);
  m.def("norm_forward", &norm_forward);
  m.def("norm_backward", &norm_backward);
  m.def("bias_gelu_forward", &bias_gelu_forward);
  m.def("bias_gelu_backward", &bias_gelu_backward);
  m.def("bias_swiglu_forward", &bias_swiglu_forward);
  m.def("bias_swiglu_backward", &bias_swiglu_backward);
  m.def("bias_dropout_add_forward", &bias_dropout_add_forward);
  m.def("dropout_backward", &dropout_backward);
  m.def("rotary", &rotary);
  m.def("cross_entropy_stats", &cross_entropy_stats);
  m.def("cross_entropy_backward_", &cross_entropy_backward_);
}
