// 16-float vectors (GCC vector extensions: one AVX-512 register where the CPU
// has it) and their loads and reductions, shared by the decode kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v16f load16(const c10::BFloat16* p) {  // bf16 is a float's top half
  v16h h;
  std::memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline v16f load16(const c10::Half* p) {
  v16f f;
  for (int i = 0; i < 16; ++i) f[i] = float(p[i]);
  return f;
}
inline float hsum(v16f v) {
  float s = 0;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// Sixteen dot products' partial sums reduced at once, with no horizontal sum
// per key: each fold halves every key's lanes and interleaves two vectors'
// keys, so after four folds lane i holds the whole sum of a[kBitrev[i]].
template <int W>
inline v16f fold(v16f x, v16f y);
template <>
inline v16f fold<16>(v16f x, v16f y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
template <>
inline v16f fold<8>(v16f x, v16f y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
template <>
inline v16f fold<4>(v16f x, v16f y) {
  return __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
template <>
inline v16f fold<2>(v16f x, v16f y) {
  return __builtin_shufflevector(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
constexpr int kBitrev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
inline v16f reduce16(const v16f* a) {
  v16f b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = fold<16>(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 4; ++i) c[i] = fold<8>(b[2 * i], b[2 * i + 1]);
  for (int i = 0; i < 2; ++i) d[i] = fold<4>(c[2 * i], c[2 * i + 1]);
  return fold<2>(d[0], d[1]);
}
