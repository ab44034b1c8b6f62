// Registers the CUDA kernels (msda_cuda.cu) as torch.ops.<extension name>.{forward, backward,
// forward_classic, backward_classic}; the extension name is chosen by ops/build.py.
#include <torch/library.h>

#include <vector>

namespace msda {
at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                        const at::Tensor& loc, const at::Tensor& attn);
std::vector<at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                      const at::Tensor& loc, const at::Tensor& attn, const at::Tensor& grad_out);
at::Tensor forward_classic_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                const at::Tensor& loc, const at::Tensor& attn);
std::vector<at::Tensor> backward_classic_cuda(const at::Tensor& value, const at::Tensor& shapes,
                                              const at::Tensor& starts, const at::Tensor& loc,
                                              const at::Tensor& attn, const at::Tensor& grad_out);
}  // namespace msda

#define MSDA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
MSDA_LIBRARY(TORCH_EXTENSION_NAME, m) {
  const char* fwd = "(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
                    "Tensor attention_weights) -> Tensor";
  const char* bwd = "(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
                    "Tensor attention_weights, Tensor grad_output) -> Tensor[]";
  m.def((std::string("forward") + fwd).c_str(), &msda::forward_cuda);
  m.def((std::string("backward") + bwd).c_str(), &msda::backward_cuda);
  m.def((std::string("forward_classic") + fwd).c_str(), &msda::forward_classic_cuda);
  m.def((std::string("backward_classic") + bwd).c_str(), &msda::backward_classic_cuda);
}
