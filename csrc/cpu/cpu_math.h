// Small math helpers for the CPU kernels, written so that GCC auto-vectorises the loops that
// call them (no libm call inside the softmax loop).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace flashback {

// 2^x for x <= 0 with ~1e-8 relative error: round-to-nearest range reduction to |f| <= 0.5 and a
// degree-7 Taylor polynomial of e^(f ln 2). Inputs below -126 (including -inf) flush to 0.
inline float fast_exp2(float x) {
  const bool underflow = !(x >= -126.0f);
  x = underflow ? 0.0f : x;
  const float n = std::nearbyint(x);
  const float f = (x - n) * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

}  // namespace flashback
