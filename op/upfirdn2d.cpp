// Host side of upfirdn2d: argument checks and Python bindings.
// Slim headers instead of <torch/extension.h>: they cut the compile time by ~3x.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
#include <c10/cuda/CUDAGuard.h>

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& kernel, int64_t up,
                             int64_t down, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                             int64_t pad_y1);

// x [B, C, H, W], kernel [kh, kw]: zero-insert (up), pad (negative = crop), convolve, keep every
// down-th sample; the same `up`/`down` on both axes, pads given per axis.
at::Tensor upfirdn2d(const at::Tensor& x, const at::Tensor& kernel, int64_t up, int64_t down,
                        int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1) {
  TORCH_CHECK(x.is_cuda() && kernel.is_cuda(), "input and kernel must be CUDA tensors");
  TORCH_CHECK(x.device() == kernel.device(), "input and kernel must be on the same device");
  TORCH_CHECK(x.is_contiguous() && kernel.is_contiguous(), "input and kernel must be contiguous");
  TORCH_CHECK(x.is_floating_point() && x.scalar_type() == kernel.scalar_type(),
              "input and kernel must have the same floating-point dtype");
  TORCH_CHECK(x.dim() == 4 && kernel.dim() == 2, "input must be [B, C, H, W] and kernel [kh, kw]");
  TORCH_CHECK(up >= 1 && down >= 1, "up and down must be >= 1");
  const int64_t out_h = (x.size(2) * up + pad_y0 + pad_y1 - kernel.size(0)) / down + 1;
  const int64_t out_w = (x.size(3) * up + pad_x0 + pad_x1 - kernel.size(1)) / down + 1;
  TORCH_CHECK(x.size(2) * up + pad_y0 + pad_y1 >= kernel.size(0) &&
                  x.size(3) * up + pad_x0 + pad_x1 >= kernel.size(1),
              "padded input is smaller than the kernel");
  TORCH_CHECK(out_h < (1 << 30) && out_w < (1 << 30) && x.size(2) * up < (1 << 30) &&
                  x.size(3) * up < (1 << 30),
              "image too large");
  const c10::cuda::CUDAGuard guard(x.device());
  return upfirdn2d_cuda(x, kernel, up, down, pad_x0, pad_x1, pad_y0, pad_y1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upfirdn2d", &upfirdn2d, "upsample, pad, FIR filter, downsample (CUDA)");
}
