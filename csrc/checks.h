// Argument checks shared by the operators in csrc/<op>.cpp. Each error names the argument and
// what was expected, and raises the Python exception type a user expects: ValueError for a wrong
// shape or value, TypeError for a wrong dtype, RuntimeError for a wrong device. The fake
// kernels (diffkernels/ops/*.py) raise the same messages; tests/test_native_ops.py checks that.
#pragma once

#include <ATen/ATen.h>

#include <charconv>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

namespace diffkernels {

// "float32", as Python prints torch.float32 without the "torch." prefix.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

// A double as Python's repr prints it (shortest round trip, "-1.0", "1e-05").
inline std::string py_float(double v) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof(buf), v).ptr;
  std::string s(buf, end);
  if (s.find_first_of(".ein") == std::string::npos) s += ".0";
  return s;
}

inline bool dtype_in(at::ScalarType t, std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes)
    if (d == t) return true;
  return false;
}

inline void check_dtype(const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> dtypes) {
  if (dtype_in(t.scalar_type(), dtypes)) return;
  std::ostringstream names;
  const char* sep = "";
  for (auto d : dtypes) names << sep << dtype_name(d), sep = ", ";
  TORCH_CHECK_TYPE(false, name, ": expected dtype in (", names.str(), "), got ",
                   dtype_name(t.scalar_type()));
}

// A required tensor argument: the dispatcher turns None into an undefined tensor.
inline void check_defined(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected a torch.Tensor, got NoneType");
}

inline void check_device(const char* name, const at::Tensor& t, const at::Tensor& like,
                         const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected a tensor on ", like.device(),
              " (the device of ", like_name, "), got ", t.device());
}

// An optional parameter tensor of a fixed shape on like's device.
inline void check_param(const char* name, const std::optional<at::Tensor>& t,
                        at::IntArrayRef shape, const at::Tensor& like,
                        std::initializer_list<at::ScalarType> dtypes, const char* like_name) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->sizes() == shape, name, ": expected shape ", shape, ", got ", t->sizes());
  check_dtype(name, *t, dtypes);
  check_device(name, *t, like, like_name);
}

inline constexpr std::initializer_list<at::ScalarType> kFloatDtypes = {at::kHalf, at::kBFloat16,
                                                                at::kFloat, at::kDouble};

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

}  // namespace diffkernels
