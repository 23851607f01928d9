// The operators inside a torch.autocast region, under the Autocast keys of CPU and CUDA.
//
// They run in the dtypes they are given: the public Python functions (hypercolumn_ops/ops.py)
// have already applied autocast's policy to their arguments (the fused operators in the autocast
// dtype, as conv2d and linear; the sampling operators in the widest features' dtype, as cat).
// What this file adds is that autocast stays off while an operator runs: the matrix products of
// the score maps (at::mm, at::bmm) would otherwise be autocast to float16 or bfloat16 behind the
// kernels' back, a result of another dtype than the kernel reads, or a silent loss of precision.
// Backward operators too, for a backward pass run inside the region. As torchvision's autocast
// kernels do, the call is redispatched with the Autocast keys excluded.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace hypercolumn_ops {
namespace {

void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_without_autocast(torch::Library& m) {
  for (const char* name :
       {"sparse_hypercolumn", "sparse_hypercolumn_backward", "box_hypercolumn", "box_hypercolumn_backward",
        "fused_hypercolumn", "fused_hypercolumn_backward", "fused_hypercolumn_points",
        "fused_hypercolumn_points_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hypercolumn_ops, AutocastCPU, m) { register_without_autocast(m); }

TORCH_LIBRARY_IMPL(hypercolumn_ops, AutocastCUDA, m) { register_without_autocast(m); }

}  // namespace hypercolumn_ops
