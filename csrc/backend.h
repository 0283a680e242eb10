// Backend routing shared by the operators in csrc/<op>.cpp.
//
// Each public op (diffkernels::group_norm_silu, ::attention, ::diffusion_step) is one C++
// operator with CPU and CUDA kernels. After its argument checks, the kernel asks `route` which
// implementation runs: the native C++/CUDA kernel, or -- when the thread selected "reference"
// or "triton" (dk.backend(...)), or the native kernel cannot do these arguments -- the Python
// implementation registered by diffkernels/ops/_python_backends.py as
// diffkernels::_<op>_backend(str backend, ...). Either way the profiler shows the one op.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceType.h>

#include <cstdint>

namespace diffkernels {

// The values diffkernels/_backend.py passes to diffkernels._C._set_backend.
enum class Backend : int64_t { Auto = 0, Reference = 1, Cpu = 2, Triton = 3, Cuda = 4 };

// This thread's selection (Python's dk.set_backend / dk.backend are per thread too).
Backend selected_backend();
void select_backend(Backend b);

// Set once by Python at import: whether the Triton backend can run, and whether it runs on CPU
// tensors (TRITON_INTERPRET=1), where "auto" then prefers it (the interpreter test suite).
void set_triton_availability(bool available, bool interpret);

// What runs a call on `device`: Cpu/Cuda (the native kernel), Triton or Reference.
// native_ok / triton_ok: whether those kernels handle these arguments (dtype, head dim, ...).
Backend route(c10::DeviceType device, bool native_ok, bool triton_ok);

const char* backend_name(Backend b);

// The Python implementation diffkernels::<name> (registered by the Python package); a clear
// error when it is missing (libtorch without the diffkernels Python package). Call sites keep
// the handle in a function-local static: the lookup runs once.
c10::OperatorHandle python_backend_op(const char* name);

}  // namespace diffkernels
