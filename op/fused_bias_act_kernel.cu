// Element-wise CUDA kernels of the fused bias + leaky ReLU + gain op.
// The arithmetic follows the reference's order (add bias, leaky ReLU, times scale; backward: times
// scale, then times slope), so float32/float64 results match it to the last bit. Half types compute
// in float and round once.
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

namespace {

constexpr int kThreads = 256;

inline int num_blocks(int64_t n) {
  // Grid-stride loops below cover the rest; keep the grid a modest size.
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

template <typename scalar_t>
__global__ void fused_lrelu_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ bias, int64_t n, int64_t channels,
                                   int64_t inner, at::opmath_type<scalar_t> slope,
                                   at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    opmath_t v = static_cast<opmath_t>(x[i]);
    if (bias != nullptr) v += static_cast<opmath_t>(bias[(i / inner) % channels]);
    out[i] = static_cast<scalar_t>((v > opmath_t(0) ? v : v * slope) * scale);
  }
}

template <typename scalar_t>
__global__ void lrelu_grad_kernel(scalar_t* __restrict__ gin, const scalar_t* __restrict__ grad,
                                  const scalar_t* __restrict__ out, int64_t n,
                                  at::opmath_type<scalar_t> slope, at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    // out > 0 exactly where input + bias > 0, because slope >= 0 and scale > 0 (checked in Python).
    const opmath_t g = static_cast<opmath_t>(grad[i]) * scale;
    gin[i] = static_cast<scalar_t>(static_cast<opmath_t>(out[i]) > opmath_t(0) ? g : g * slope);
  }
}

}  // namespace

at::Tensor fused_lrelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                               double slope, double scale) {
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int64_t channels = x.size(1);
  const int64_t inner = n / (x.size(0) * channels);  // elements per (sample, channel)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "fused_lrelu_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    fused_lrelu_kernel<scalar_t><<<num_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, n, channels, inner,
        static_cast<opmath_t>(slope), static_cast<opmath_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lrelu_grad_cuda(const at::Tensor& grad, const at::Tensor& out, double slope,
                              double scale) {
  auto gin = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, grad.scalar_type(),
                                  "lrelu_grad_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    lrelu_grad_kernel<scalar_t><<<num_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gin.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
        static_cast<opmath_t>(slope), static_cast<opmath_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gin;
}
