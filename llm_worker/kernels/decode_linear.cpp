// Linears at decode batch sizes on CPU: y = x·Wᵀ (+ b) for a few rows of x,
// for the lean decode step (llm_worker/decode_step.py).
//
// Why not oneDNN or MKL: at 1–16 rows a linear is a pass over its weight,
// and their gemv/small-gemm paths streamed weights at a third to a half of
// what a plain sum reads on 2-core EPYCs and Xeons (README, issue 14). Here
// each thread walks its own contiguous run of weight rows once, in tiles of
// 16 sums (16, 8 or 4 weight rows against 1, 2 or up to 4 rows of x in
// registers: `out_block`), and the weight stays in the plain [out, in]
// layout the model already holds (no packed copy).
//
// Sums run in float32 whatever the dtype (as oneDNN's do), in another order,
// so results match torch's linear to float rounding, not bit for bit.
//
// Build: llm_worker/decode_linear.py, through llm_worker/cpp_kernel.py
// (-O3 -march=native -ffast-math), as decode_attention.cpp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "vec16.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int kTile = 16;     // sums per block: one reduce16
constexpr int kRowBlock = 4;  // rows of x in registers at most

// Weight rows walked together for a batch of `rows`: the tile holds 16
// sums, so one row walks 16 weight rows, two walk 8 and more walk 4 (each
// block's rows stay in L1 while every row of x passes over them). One row
// with 4 weight rows spent as long reducing as multiplying (bf16, Zen 4).
inline int out_block(int64_t rows) { return rows == 1 ? 16 : rows == 2 ? 8 : 4; }

// The same cache lines of the next block: the hardware prefetcher alone
// left a 113 MB lm_head streaming at ~20 of ~30 GB/s (Zen 4, float32 and
// bf16); one block ahead gave ×1.25–1.3, more no better.
template <int O, typename T>
inline void prefetch_next(const T* w, int64_t in, int64_t k) {
  for (int i = 0; i < O; ++i) __builtin_prefetch(w + (O + i) * in + k);
}

// A loaded value the compiler must keep in a register: left to itself, GCC
// reloaded each weight vector from memory for every row it meets (twice the
// loads per multiply-add, and half the speed at 4 rows and more).
template <typename V>
inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

// sums[i * R + r] = the sum of acc[i * R + r]'s lanes, for the O × R used
// accumulators (the rest are zeros). Every sum runs the same tree whatever
// its place in the tile, so a row's outputs do not depend on its batch.
template <int O, int R>
inline void reduce_tile(const v16f* acc, float* sums) {
  const v16f s = reduce16(acc);  // lane l: the sum of acc[kBitrev[l]]
  for (int l = 0; l < kTile; ++l)
    if (kBitrev[l] < O * R) sums[kBitrev[l]] = s[l];
}

// Weight rows [0, O) of w against x rows [0, R): O × R sums.
// x: float32 [R, in]; in: a multiple of 16.
template <typename T, int O, int R>
inline void block(const float* x, int64_t in, const T* w, float* sums) {
  static_assert(O * R <= kTile);
  v16f acc[kTile] = {};
  for (int64_t k = 0; k < in; k += 16) {
    prefetch_next<O>(w, in, k);
    v16f xk[R];
    for (int r = 0; r < R; ++r) xk[r] = in_register(load16(x + r * in + k));
    for (int i = 0; i < O; ++i) {
      const v16f wk = R > 1 ? in_register(load16(w + i * in + k)) : load16(w + i * in + k);
      for (int r = 0; r < R; ++r) acc[i * R + r] += wk * xk[r];
    }
  }
  reduce_tile<O, R>(acc, sums);
}

#if defined(__AVX512BF16__)
// bf16 on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later): the
// CPU's bf16 dot product takes 32 weights and 32 inputs a step, in bf16 as
// the model holds them, and sums each pair into float32 lanes, so no
// conversion runs per weight. x: bf16 [R, in]; in: a multiple of 32.
constexpr bool kDpBf16 = true;
template <int O, int R>
inline void block_dp(const c10::BFloat16* x, int64_t in, const c10::BFloat16* w, float* sums) {
  static_assert(O * R <= kTile);
  __m512 acc[kTile];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += 32) {
    prefetch_next<O>(w, in, k);
    __m512bh xk[R];
    for (int r = 0; r < R; ++r) xk[r] = in_register((__m512bh)_mm512_loadu_si512(x + r * in + k));
    for (int i = 0; i < O; ++i) {
      const __m512bh wk = in_register((__m512bh)_mm512_loadu_si512(w + i * in + k));
      for (int r = 0; r < R; ++r) acc[i * R + r] = _mm512_dpbf16_ps(acc[i * R + r], wk, xk[r]);
    }
  }
  v16f lanes[kTile];
  std::memcpy(lanes, acc, sizeof lanes);
  reduce_tile<O, R>(lanes, sums);
}
#else
constexpr bool kDpBf16 = false;
template <int O, int R>
inline void block_dp(const c10::BFloat16*, int64_t, const c10::BFloat16*, float*) {}
#endif

// One weight row (the tail when out is not a multiple of the block), as a
// 1 × 1 tile of the same path, so a row's result is the same whichever
// block size its batch gave (the tails differ).
template <typename T>
inline float dot(const float* x, const c10::BFloat16* xb, const T* w, int64_t in, bool dp) {
  float sum;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (dp) {
      block_dp<1, 1>(xb, in, w, &sum);
      return sum;
    }
  }
  block<T, 1, 1>(x, in, w, &sum);
  return sum;
}

// f(O, R) with compile-time O (weight rows, `out_block`) and R (rows of x).
template <typename F>
inline void by_tile(int o, int64_t r, F f) {
  using std::integral_constant;
  if (o == 16) return f(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  if (o == 8) return f(integral_constant<int, 8>{}, integral_constant<int, 2>{});
  switch (r) {
    case 1: return f(integral_constant<int, 4>{}, integral_constant<int, 1>{});
    case 2: return f(integral_constant<int, 4>{}, integral_constant<int, 2>{});
    case 3: return f(integral_constant<int, 4>{}, integral_constant<int, 3>{});
    default: return f(integral_constant<int, 4>{}, integral_constant<int, 4>{});
  }
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t rows = x.size(0), in = x.size(1), outs = weight.size(0);
  constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
  const bool dp = bf16 && kDpBf16 && in % 32 == 0;
  const int o = out_block(rows);
  const int64_t blocks = outs / o;
  // float32 x for the float path; bf16 as it came for block_dp.
  const at::Tensor xf = dp ? at::Tensor() : x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  const at::Tensor xb = dp ? x.contiguous() : at::Tensor();
  const float* xp = dp ? nullptr : xf.data_ptr<float>();
  const c10::BFloat16* xbp = dp ? xb.data_ptr<c10::BFloat16>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  auto put = [&](int64_t r, int64_t j, float v) { op[r * outs + j] = T(bp ? v + float(bp[j]) : v); };
  // Grain: enough blocks per task that each thread gets one contiguous run.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, blocks / threads);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    float sums[kTile];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j = b * o;
      const T* w = wp + j * in;
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        by_tile(o, rows - r0, [&](auto O, auto R) {
          if constexpr (bf16) {
            if (dp) block_dp<O(), R()>(xbp + r0 * in, in, w, sums);
            else block<T, O(), R()>(xp + r0 * in, in, w, sums);
          } else {
            block<T, O(), R()>(xp + r0 * in, in, w, sums);
          }
          for (int i = 0; i < O(); ++i)
            for (int r = 0; r < R(); ++r) put(r0 + r, j + i, sums[i * R() + r]);
        });
        if (o != 4) break;  // 16 × 1 and 8 × 2 tiles hold every row
      }
    }
  });
  for (int64_t j = blocks * o; j < outs; ++j)
    for (int64_t r = 0; r < rows; ++r)
      put(r, j, dot(dp ? nullptr : xp + r * in, dp ? xbp + r * in : nullptr, wp + j * in, in, dp));
}

}  // namespace

// x: [rows, in]; weight: [out, in] contiguous; bias: [out] or None; one dtype.
// Returns [rows, out] in x's dtype.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "decode_linear: x [rows, in] and weight [out, in]");
  TORCH_CHECK(x.size(1) == weight.size(1), "decode_linear: x has ", x.size(1), " features, the weight ", weight.size(1));
  TORCH_CHECK(weight.size(1) % 16 == 0, "decode_linear: in features a multiple of 16, not ", weight.size(1));
  TORCH_CHECK(weight.is_contiguous(), "decode_linear: weight not contiguous");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "decode_linear: one dtype for x and the weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == weight.scalar_type(),
                "decode_linear: bias");
  }
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return out;
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(x, weight, bias, out); break;
    case at::kBFloat16: run<c10::BFloat16>(x, weight, bias, out); break;
    case at::kHalf: run<c10::Half>(x, weight, bias, out); break;
    default: TORCH_CHECK(false, "decode_linear: dtype ", x.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as torch's own ops run.
  m.def("decode_linear", &decode_linear, "a linear over a few rows", py::arg("x"), py::arg("weight"),
        py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
}
