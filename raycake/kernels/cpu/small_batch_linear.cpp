// y = x @ W.T + b for a few rows of x (decode steps of 1-4 sequences), on CPU.
//
// oneDNN's matmul costs 22-25 us a call whatever the size at such shapes (its per-call setup),
// which at one request is most of a small model's linear time. This kernel streams W once in
// its own [out, in] layout (no packed copy), FMA-ing each chunk of 4 weight rows against every
// row of x in fp32 (x converted once per thread), and rounds once at the end, as oneDNN does.
// Registered as raycake_cpu::small_batch_linear; built by raycake/kernels/cpu_kernels.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "load_float.h"

namespace {

using raycake_cpu::load_float;
using raycake_cpu::Vec;

constexpr int64_t kMaxRows = 4;  // rows of x this kernel takes (more: use oneDNN)
constexpr int64_t kOutBlock = 4;  // weight rows computed together (x loaded once for them)

// Outputs [first, first + kBlock) for every row: kBlock x rows accumulators in registers.
template <typename scalar_t, int64_t kBlock>
inline void output_block(const float* xf, const scalar_t* w, const scalar_t* bias, scalar_t* y,
                         int64_t rows, int64_t in, int64_t out, int64_t first) {
  const int64_t vec_end = in - in % Vec::size();
  Vec acc[kBlock][kMaxRows];
  for (int64_t j = 0; j < kBlock; ++j)
    for (int64_t m = 0; m < rows; ++m) acc[j][m] = Vec(0.0f);
  for (int64_t i = 0; i < vec_end; i += Vec::size()) {
    Vec xv[kMaxRows];
    for (int64_t m = 0; m < rows; ++m) xv[m] = Vec::loadu(xf + m * in + i);
    for (int64_t j = 0; j < kBlock; ++j) {
      const Vec wv = load_float(w + (first + j) * in + i);
      for (int64_t m = 0; m < rows; ++m) acc[j][m] = at::vec::fmadd(xv[m], wv, acc[j][m]);
    }
  }
  auto sum = [](Vec& a, Vec& b) { return a + b; };
  for (int64_t j = 0; j < kBlock; ++j) {
    const scalar_t* wr = w + (first + j) * in;
    for (int64_t m = 0; m < rows; ++m) {
      float total = at::vec::vec_reduce_all<float>(sum, acc[j][m]);
      for (int64_t i = vec_end; i < in; ++i) total += xf[m * in + i] * static_cast<float>(wr[i]);
      if (bias != nullptr) total += static_cast<float>(bias[first + j]);
      y[m * out + first + j] = static_cast<scalar_t>(total);
    }
  }
}

template <typename scalar_t>
void small_batch_linear_kernel(const scalar_t* x, const scalar_t* w, const scalar_t* bias,
                               scalar_t* y, int64_t rows, int64_t in, int64_t out) {
  const int64_t blocks = out / kOutBlock;
  // Each thread takes whole blocks of outputs; the last few outputs go one at a time.
  at::parallel_for(0, blocks + out % kOutBlock, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(rows * in);
    for (int64_t i = 0; i < rows * in; ++i) xf[i] = static_cast<float>(x[i]);
    for (int64_t b = begin; b < end; ++b) {
      if (b < blocks) {
        output_block<scalar_t, kOutBlock>(xf.data(), w, bias, y, rows, in, out, b * kOutBlock);
      } else {
        output_block<scalar_t, 1>(xf.data(), w, bias, y, rows, in, out,
                                  blocks * kOutBlock + (b - blocks));
      }
    }
  });
}

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "x, weight: expected [..., in] and [out, in]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x, weight: expected both float32 or both bfloat16");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->numel() == weight.size(0) &&
                            bias->scalar_type() == x.scalar_type()),
              "bias: expected [out] in x's dtype");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  const int64_t in = x.size(-1), out = weight.size(0), rows = in ? xc.numel() / in : 0;
  TORCH_CHECK(rows <= kMaxRows, "x: expected at most ", kMaxRows, " rows, got ", rows);
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto y = at::empty(sizes, x.options());
  const auto bc = has_bias ? bias->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat) {
    small_batch_linear_kernel<float>(xc.data_ptr<float>(), wc.data_ptr<float>(),
                                     has_bias ? bc.data_ptr<float>() : nullptr,
                                     y.data_ptr<float>(), rows, in, out);
  } else {
    small_batch_linear_kernel<at::BFloat16>(
        xc.data_ptr<at::BFloat16>(), wc.data_ptr<at::BFloat16>(),
        has_bias ? bc.data_ptr<at::BFloat16>() : nullptr, y.data_ptr<at::BFloat16>(), rows, in,
        out);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(raycake_cpu, m) {
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(raycake_cpu, CPU, m) {
  m.impl("small_batch_linear", &small_batch_linear);
}
