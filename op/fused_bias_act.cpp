// Host side of the fused bias + leaky ReLU + gain op: argument checks and Python bindings.
// Slim headers instead of <torch/extension.h>: they cut the compile time by ~3x.
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
#include <c10/cuda/CUDAGuard.h>

at::Tensor fused_lrelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                               double slope, double scale);
at::Tensor lrelu_grad_cuda(const at::Tensor& grad, const at::Tensor& out, double slope,
                              double scale);

static void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor");
}

// out = leaky_relu(x + bias[channel], slope) * scale, the channel being dim 1.
at::Tensor fused_lrelu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                          double slope, double scale) {
  check_input(x, "input");
  TORCH_CHECK(x.dim() >= 2, "input must have a channel dimension (dim 1)");
  if (bias.has_value()) {
    check_input(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), "bias must have shape [channels]");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "bias must have the input's dtype and device");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  return fused_lrelu_cuda(x, bias, slope, scale);
}

// grad * (out > 0 ? scale : slope * scale): the derivative of fused_lrelu, read off its output.
at::Tensor lrelu_grad(const at::Tensor& grad, const at::Tensor& out, double slope,
                         double scale) {
  check_input(grad, "grad");
  check_input(out, "out");
  TORCH_CHECK(grad.sizes() == out.sizes() && grad.scalar_type() == out.scalar_type() &&
                  grad.device() == out.device(),
              "grad and out must have the same shape, dtype and device");
  const c10::cuda::CUDAGuard guard(grad.device());
  return lrelu_grad_cuda(grad, out, slope, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_lrelu", &fused_lrelu, "fused bias + leaky ReLU + gain (CUDA)");
  m.def("lrelu_grad", &lrelu_grad, "gradient mask of fused_lrelu (CUDA)");
}
