// Loading a vector of fp32 values from a cache or weight of fp32, bf16 or fp16, with ATen's SIMD
// types (the width is ATen's CPU_CAPABILITY of the build). Shared by raycake's CPU kernels.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace raycake_cpu {

using Vec = at::vec::Vectorized<float>;

inline Vec load_float(const float* p) { return Vec::loadu(p); }
inline Vec load_float(const at::BFloat16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}
inline Vec load_float(const at::Half* p) {
  Vec out;
  at::vec::load_fp32_from_fp16(p, out);
  return out;
}

}  // namespace raycake_cpu
