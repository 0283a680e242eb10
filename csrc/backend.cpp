#include "backend.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace diffkernels {
namespace {

thread_local Backend tls_backend = Backend::Auto;
std::atomic<bool> triton_available{false};
std::atomic<bool> triton_on_cpu{false};

}  // namespace

Backend selected_backend() { return tls_backend; }
void select_backend(Backend b) { tls_backend = b; }

void set_triton_availability(bool available, bool interpret) {
  triton_available = available;
  triton_on_cpu = available && interpret;
}

Backend route(c10::DeviceType device, bool native_ok, bool triton_ok) {
  const bool cuda = device == c10::DeviceType::CUDA;
  const Backend native = cuda ? Backend::Cuda : Backend::Cpu;
  const bool triton_here = triton_ok && triton_available && (cuda || triton_on_cpu);
#ifndef DIFFKERNELS_WITH_CUDA
  if (cuda) native_ok = false;
#endif
  switch (tls_backend) {
    case Backend::Auto:
      if (triton_here && !cuda) return Backend::Triton;  // only under TRITON_INTERPRET=1
      if (native_ok) return native;
      return triton_here ? Backend::Triton : Backend::Reference;
    case Backend::Triton:
      return triton_here ? Backend::Triton : Backend::Reference;
    case Backend::Cpu:
    case Backend::Cuda:
      // A case the selected backend cannot do runs on the reference: the same answer.
      return tls_backend == native && native_ok ? native : Backend::Reference;
    default:
      return Backend::Reference;
  }
}

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::Cpu: return "cpu";
    case Backend::Triton: return "triton";
    case Backend::Cuda: return "cuda";
    case Backend::Reference: return "reference";
    default: return "auto";
  }
}

c10::OperatorHandle python_backend_op(const char* name) {
  auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(op.has_value(), name, " is not registered: the reference and triton backends are "
              "implemented in the diffkernels Python package (import diffkernels first)");
  return *op;
}

}  // namespace diffkernels
