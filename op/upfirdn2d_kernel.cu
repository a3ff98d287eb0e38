// CUDA kernel of upfirdn2d: one thread per output sample, visiting only the kernel taps that land on
// real (not zero-inserted, not padding) input samples.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

namespace {

constexpr int kThreads = 256;

// First tap t >= 0 with base + t >= 0 and (base + t) divisible by up, i.e. the first tap of the
// filter window (starting at `base` in the zero-inserted signal) that hits an input sample.
__device__ __forceinline__ int first_tap(int base, int up) {
  int t = base < 0 ? -base : 0;
  const int r = (base + t) % up;
  return r == 0 ? t : t + up - r;
}

template <typename scalar_t>
__global__ void upfirdn2d_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ kernel, int64_t planes, int in_h,
                                 int in_w, int out_h, int out_w, int kh, int kw, int up, int down,
                                 int pad_x0, int pad_y0) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = planes * out_h * out_w;
  // Last index of the zero-inserted signal that holds an input sample.
  const int last_y = (in_h - 1) * up, last_x = (in_w - 1) * up;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int ox = static_cast<int>(i % out_w);
    const int oy = static_cast<int>((i / out_w) % out_h);
    const scalar_t* plane = x + (i / ((int64_t)out_w * out_h)) * in_h * in_w;
    // Output (oy, ox) correlates the flipped kernel with the zero-inserted signal starting at
    // (oy*down - pad_y0, ox*down - pad_x0): tap t meets kernel entry k-1-t.
    const int by = oy * down - pad_y0, bx = ox * down - pad_x0;
    const int tx0 = first_tap(bx, up);
    opmath_t acc = 0;
    for (int ty = first_tap(by, up); ty < kh && by + ty <= last_y; ty += up) {
      const scalar_t* row = plane + (int64_t)((by + ty) / up) * in_w;
      const scalar_t* krow = kernel + (kh - 1 - ty) * kw;
      for (int tx = tx0; tx < kw && bx + tx <= last_x; tx += up)
        acc += static_cast<opmath_t>(row[(bx + tx) / up]) * static_cast<opmath_t>(krow[kw - 1 - tx]);
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& kernel, int64_t up,
                             int64_t down, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                             int64_t pad_y1) {
  const int64_t b = x.size(0), c = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t kh = kernel.size(0), kw = kernel.size(1);
  const int64_t out_h = (in_h * up + pad_y0 + pad_y1 - kh) / down + 1;
  const int64_t out_w = (in_w * up + pad_x0 + pad_x1 - kw) / down + 1;
  auto out = at::empty({b, c, out_h, out_w}, x.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "upfirdn2d_cuda", [&] {
    upfirdn2d_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(), b * c,
        in_h, in_w, out_h, out_w, kh, kw, up, down, pad_x0, pad_y0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
