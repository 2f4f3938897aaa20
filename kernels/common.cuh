// Device helpers shared by the kernels: fp32 conversion, vector access, warp/block reductions,
// and the per-row launch plan. CUDA headers only (no torch), so every .cu compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace mtk {

// ---- conversions: every kernel loads into fp32, computes in fp32, stores with round-to-nearest ----

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// exp through the hardware exp2 unit; relative error about 2^-21 for the arguments softmax produces.
__host__ __device__ __forceinline__ float fast_exp(float x) { return exp2f(x * 1.4426950408889634f); }

// ---- vector access: VEC consecutive elements in one 16-byte (or smaller) transaction ----

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The caller guarantees that p is aligned to sizeof(T) * VEC (the launchers check before choosing VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(pack.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pack.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

template <typename T> constexpr int max_vec() { return 16 / sizeof(T); }

inline bool aligned_to(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---- reductions. Blocks are 1-D with blockDim.x a multiple of 32, so every warp is full and the
// full-mask shuffles are valid; threads without data contribute the identity (0 or -inf). ----

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ static float identity() { return 0.0f; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ static float identity() { return __int_as_float(0xff800000); }  // -inf
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Every thread of the block must call this; all of them get the result. `scratch` holds 33 floats.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  if (warps == 1) return v;
  __syncthreads();  // the previous call's readers of scratch are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? scratch[lane] : Op::identity();
    w = warp_reduce(w, op);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// ---- one block per row: how many threads, and how much of the row each thread keeps in registers ----
//
// A thread owns the chunks c = threadIdx.x + k * blockDim.x (k < CHUNKS) of VEC elements, so a warp's
// accesses are consecutive. CHUNKS == 0 means the row is too long to keep: the kernel streams it and
// reads it again in each pass (L2 serves the re-reads). CHUNKS * VEC <= 32 keeps registers in check
// under __launch_bounds__(kRowThreads).

constexpr int kRowThreads = 512;

struct RowPlan {
  int threads;
  int vec;
  int chunks;
};

// The smallest power of two >= v, but at most `cap`. Callers only want a thread or chunk count, which has
// a ceiling anyway; stopping there means no row length can overflow the doubling (an int doubled past
// 2^30 wraps and the loop never ends).
inline int64_t pow2_at_least(int64_t v, int64_t cap) {
  int64_t p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

// vec_ok: the launcher checked that cols % vec == 0 and every row start is aligned to vec elements.
// chunks_per_thread: how many chunks a thread should get when the row is short enough (fewer: more
// threads per row, i.e. fewer rows in flight per SM).
inline RowPlan plan_row(int64_t cols, int vec, bool vec_ok, int chunks_per_thread = 2) {
  if (!vec_ok) vec = 1;
  const int64_t chunks = (cols + vec - 1) / vec;
  int64_t threads = pow2_at_least((chunks + chunks_per_thread - 1) / chunks_per_thread, kRowThreads);
  threads = threads < 32 ? 32 : threads;
  // Capped at 16: anything above 8 chunks per thread is streamed, however long the row.
  const int64_t per_thread = pow2_at_least((chunks + threads - 1) / threads, 16);
  const int cached = (per_thread <= 8 && per_thread * vec <= 32) ? static_cast<int>(per_thread) : 0;
  return RowPlan{static_cast<int>(threads), vec, cached};
}

// Calls f(std::integral_constant<int, VEC>, std::integral_constant<int, CHUNKS>) for the plan, so each
// launcher writes its kernel launch once. VEC is 1 or max_vec<T>().
template <typename T, typename F>
inline void dispatch_row_plan(const RowPlan& plan, F&& f) {
  using V1 = std::integral_constant<int, 1>;
  using VN = std::integral_constant<int, max_vec<T>()>;
  auto by_chunks = [&](auto vec) {
    switch (plan.chunks) {
      case 1: f(vec, std::integral_constant<int, 1>{}); break;
      case 2: f(vec, std::integral_constant<int, 2>{}); break;
      case 4: f(vec, std::integral_constant<int, 4>{}); break;
      case 8:
        if constexpr (decltype(vec)::value * 8 <= 32) f(vec, std::integral_constant<int, 8>{});
        else f(vec, std::integral_constant<int, 0>{});
        break;
      default: f(vec, std::integral_constant<int, 0>{}); break;
    }
  };
  if (plan.vec == 1) by_chunks(V1{});
  else by_chunks(VN{});
}

// Calls f(k, j) for each chunk this thread owns: k is the register slot (0 when streaming), j the first column.
template <int VEC, int CHUNKS, typename F>
__device__ __forceinline__ void for_each_chunk(int64_t cols, F&& f) {
  if constexpr (CHUNKS > 0) {
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      const int64_t j = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * VEC;
      if (j < cols) f(k, j);
    }
  } else {
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < cols; j += static_cast<int64_t>(blockDim.x) * VEC) f(0, j);
  }
}

// Grid size for grid-stride loops: enough blocks to fill the GPU several times, never past the limit.
inline unsigned grid_for(int64_t work_items, int64_t per_block, int64_t cap = 1 << 20) {
  int64_t blocks = (work_items + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

inline int sm_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

}  // namespace mtk
