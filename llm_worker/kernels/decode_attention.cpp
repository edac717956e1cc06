// Decode attention on CPU: one query token per row against that row's cached
// keys and values, for the lean decode step (llm_worker/decode_step.py).
//
// Why not torch's SDPA: at one query per row its CPU flash kernel runs tiny
// gemms per (row, head) block and reads the padded cache at ~12 GB/s, a third
// of a 2-core Xeon's bandwidth; it was ~40 % of a 16-row bf16 step. Here each
// (row, kv head) is one pass over that row's real columns only (left padding
// is skipped, not masked), the keys and values are read once for all the
// query heads that share them (GQA), and the next tile is prefetched.
//
// Build: llm_worker/decode_attention.py compiles this once per machine
// (-O3 -march=native -ffast-math -fopenmp) into the conveyor cache. GCC
// vector extensions (GCC 12 or newer, or clang, for __builtin_shufflevector;
// an older compiler fails the build and SDPA serves), so any x86-64 or ARM
// target compiles; 16-float vectors are one AVX-512 register where the CPU has it.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace {

constexpr int kMaxGroup = 16;  // query heads per kv head
constexpr int kPrefetchTiles = 1;
constexpr int64_t kMaxSplits = 64;  // parts of one row's columns

inline void prefetch_row(const void* p, int bytes) {
  for (int b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// One (row, kv head) over n of its keys/values, rows `stride` elements
// apart: for each of its `groups` query heads, the scores' max, the sum of
// their exponentials and the exponential-weighted sum of values (not yet
// divided), so parts of one row's columns merge exactly (`merge`).
// scores: scratch of groups * n floats.
template <typename T, int D>
void attend(const T* q, int64_t q_stride, int groups, const T* k, const T* v, int64_t stride, int64_t n,
            float scale, float* top, float* total, float* acc_out, float* scores) {
  constexpr int C = D / 16;
  if (n == 0) {  // an empty part: nothing to weigh (exp(-3e38 - max) is 0)
    for (int g = 0; g < groups; ++g) top[g] = -3.0e38f, total[g] = 0.f;
    std::memset(acc_out, 0, sizeof(float) * D * groups);
    return;
  }
  v16f qf[kMaxGroup][C];
  for (int g = 0; g < groups; ++g)
    for (int c = 0; c < C; ++c) qf[g][c] = load16(q + g * q_stride + 16 * c) * scale;

  // Scores, sixteen keys at a time, then the tail one by one.
  const int64_t tiles = n / 16;
  v16f kt[16][C];
  for (int64_t t = 0; t < tiles; ++t) {
    if (t + kPrefetchTiles < tiles)  // one core's demand misses alone stream at a third of bandwidth
      for (int j = 0; j < 16; ++j) prefetch_row(k + ((t + kPrefetchTiles) * 16 + j) * stride, D * sizeof(T));
    for (int j = 0; j < 16; ++j) {
      const T* row = k + (t * 16 + kBitrev[j]) * stride;
      for (int c = 0; c < C; ++c) kt[j][c] = load16(row + 16 * c);
    }
    for (int g = 0; g < groups; ++g) {
      v16f partial[16];
      for (int j = 0; j < 16; ++j) {
        v16f a = qf[g][0] * kt[j][0];
        for (int c = 1; c < C; ++c) a += qf[g][c] * kt[j][c];
        partial[j] = a;
      }
      v16f s = reduce16(partial);
      std::memcpy(scores + g * n + t * 16, &s, sizeof s);
    }
  }
  for (int64_t l = tiles * 16; l < n; ++l) {
    const T* row = k + l * stride;
    v16f kc[C];
    for (int c = 0; c < C; ++c) kc[c] = load16(row + 16 * c);
    for (int g = 0; g < groups; ++g) {
      v16f a = qf[g][0] * kc[0];
      for (int c = 1; c < C; ++c) a += qf[g][c] * kc[c];
      scores[g * n + l] = hsum(a);
    }
  }

  for (int g = 0; g < groups; ++g) {
    float* s = scores + g * n;
    float m = s[0];
    for (int64_t l = 1; l < n; ++l) m = std::max(m, s[l]);
    float sum = 0.f;
    for (int64_t l = 0; l < n; ++l) {
      s[l] = std::exp(s[l] - m);
      sum += s[l];
    }
    top[g] = m;
    total[g] = sum;
  }

  v16f acc[kMaxGroup][C];
  for (int g = 0; g < groups; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = v16f{};
  for (int64_t l = 0; l < n; ++l) {
    const T* row = v + l * stride;
    if (l + 16 * kPrefetchTiles < n) prefetch_row(row + 16 * kPrefetchTiles * stride, D * sizeof(T));
    v16f vc[C];
    for (int c = 0; c < C; ++c) vc[c] = load16(row + 16 * c);
    for (int g = 0; g < groups; ++g) {
      const float p = scores[g * n + l];
      for (int c = 0; c < C; ++c) acc[g][c] += p * vc[c];
    }
  }
  std::memcpy(acc_out, acc, sizeof(v16f) * C * groups);
}

template <typename T, int D>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* starts, float scale,
         at::Tensor& out) {
  const int64_t rows = q.size(0), kv_heads = k.size(1), columns = k.size(2);
  const int groups = int(q.size(1) / kv_heads);
  const int64_t items = rows * kv_heads;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Few (row, kv head) items (one row has as many as kv heads) split their
  // columns into parts, so every thread has work; the parts merge below.
  const int64_t splits = std::max<int64_t>(1, std::min({(4 * threads + items - 1) / items, columns / 64, kMaxSplits}));
  const int64_t units = items * splits;
  auto span = [&](int64_t u) {  // unit u's columns [first, last)
    const int64_t s = starts[u / splits / kv_heads], n = columns - s, part = u % splits;
    return std::pair<int64_t, int64_t>(s + n * part / splits, s + n * (part + 1) / splits);
  };
  // Contiguous runs of units of about equal work per thread: rows' lengths
  // differ, and an even split of items left one thread idle.
  std::vector<int64_t> work(units + 1, 0);
  for (int64_t u = 0; u < units; ++u) {
    auto [a, b] = span(u);
    work[u + 1] = work[u] + (b - a) + 16;
  }
  std::vector<float> top(units * groups), total(units * groups), acc(units * groups * D);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t parts = std::min(threads, units);
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<float> scores(size_t(groups) * columns);
    auto first_unit = [&](int64_t part) {
      if (part >= parts) return units;
      return int64_t(std::lower_bound(work.begin(), work.end(), work[units] * part / parts) - work.begin());
    };
    for (int64_t u = first_unit(part_begin), end = first_unit(part_end); u < end; ++u) {
      const int64_t i = u / splits, r = i / kv_heads, h = i % kv_heads;
      auto [a, b] = span(u);
      attend<T, D>(qp + r * q.stride(0) + h * groups * q.stride(1), q.stride(1), groups,
                   kp + r * k.stride(0) + h * k.stride(1) + a * k.stride(2),
                   vp + r * v.stride(0) + h * v.stride(1) + a * v.stride(2), k.stride(2), b - a, scale,
                   &top[u * groups], &total[u * groups], &acc[u * groups * D], scores.data());
    }
  });
  // merge: each part's sums rescaled to the item's max, then divided.
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / kv_heads, h = i % kv_heads;
    for (int g = 0; g < groups; ++g) {
      float m = top[(i * splits) * groups + g];
      for (int64_t p = 1; p < splits; ++p) m = std::max(m, top[(i * splits + p) * groups + g]);
      float sum = 0.f, weight[kMaxSplits];
      for (int64_t p = 0; p < splits; ++p) {
        const int64_t u = i * splits + p;
        weight[p] = std::exp(top[u * groups + g] - m);
        sum += weight[p] * total[u * groups + g];
      }
      T* o = op + r * out.stride(0) + (h * groups + g) * out.stride(1);
      for (int d = 0; d < D; ++d) {
        float x = 0.f;
        for (int64_t p = 0; p < splits; ++p) x += weight[p] * acc[((i * splits + p) * groups + g) * D + d];
        o[d] = T(x / sum);
      }
    }
  }
}

}  // namespace

// q: [rows, heads, D]; keys, values: [rows, kv_heads, columns, D], each with
// its last dim contiguous; starts: [rows] int64, each row's first real column.
// Returns [rows, heads, D] in q's dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& starts, double scale) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu() && starts.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(), "decode_attention: shapes");
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0, "decode_attention: no rows or no heads");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
              "decode_attention: one dtype for q, keys and values");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), columns = keys.size(2);
  TORCH_CHECK(keys.size(0) == rows && keys.size(3) == dim, "decode_attention: keys do not match q");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "decode_attention: heads per kv head");
  TORCH_CHECK(q.stride(2) == 1 && keys.stride(3) == 1 && values.stride(3) == 1, "decode_attention: last dim strided");
  TORCH_CHECK(keys.stride(2) == values.stride(2), "decode_attention: keys and values laid out apart");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.size(0) == rows && starts.is_contiguous(),
              "decode_attention: starts");
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(st[r] >= 0 && st[r] < columns, "decode_attention: row ", r, " has no column to attend to");
  at::Tensor out = at::empty({rows, heads, dim}, q.options());
  const float s = float(scale);
  switch (q.scalar_type()) {
#define CONVEYOR_CASE(DTYPE, T)                           \
  case DTYPE:                                             \
    if (dim == 64) run<T, 64>(q, keys, values, st, s, out); \
    else if (dim == 128) run<T, 128>(q, keys, values, st, s, out); \
    else TORCH_CHECK(false, "decode_attention: head dim ", dim, " (64 or 128)"); \
    break;
    CONVEYOR_CASE(at::kFloat, float)
    CONVEYOR_CASE(at::kBFloat16, c10::BFloat16)
    CONVEYOR_CASE(at::kHalf, c10::Half)
#undef CONVEYOR_CASE
    default:
      TORCH_CHECK(false, "decode_attention: dtype ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as torch's own ops run: the worker's event loop streams
  // tokens and answers health checks meanwhile.
  m.def("decode_attention", &decode_attention, "one query per row against its cached keys and values",
        py::call_guard<py::gil_scoped_release>());
}
