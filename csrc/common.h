// Shared definitions for every kernel: dtypes, statistics, errors, scalar conversions.
// No torch, no pybind11, no CUDA headers: this file is included by .cpp and .cu alike.
#pragma once
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace specext {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, I32 = 4, I64 = 5 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
  }
  return "?";
}

inline int dtype_size(DType d) {
  switch (d) {
    case DType::F16:
    case DType::BF16: return 2;
    case DType::F32:
    case DType::I32: return 4;
    case DType::F64:
    case DType::I64: return 8;
  }
  return 0;
}

// Per-token statistic accumulated by category_accumulate.
enum class Stat : int { Abs = 0, Square = 1, Relu = 2, Signed = 3 };

// Errors carry a Python exception kind; the binding translates them.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct RuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define SPECEXT_STR(...) #__VA_ARGS__
#define SPECEXT_XSTR(...) SPECEXT_STR(__VA_ARGS__)

// __FILE__ without the build machine's directories: from the last "csrc/" on
// ("csrc/accumulate_cpu.cpp"), else the file name. The compiler may give an absolute path
// (a pip build in /tmp/...); an error message shows the repository-relative one.
inline const char* source_path(const char* file) {
  const char* tail = nullptr;
  for (const char* p = file; *p; ++p) {
    if ((p == file || p[-1] == '/' || p[-1] == '\\') && std::strncmp(p, "csrc", 4) == 0 &&
        (p[4] == '/' || p[4] == '\\'))
      tail = p;
  }
  if (tail) return tail;
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/' || *p == '\\') base = p + 1;
  return base;
}

// SPECEXT_CHECK(cond, ValueError, "labels must be ..." << x): throws with the message
// followed by the C++ source location (csrc/file.cpp:line), so a report points at the
// check that fired.
#define SPECEXT_CHECK(cond, Kind, msg)                                                  \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::ostringstream specext_os_;                                                   \
      specext_os_ << msg << " [" << ::specext::source_path(__FILE__) << ":" << __LINE__ \
                  << "]";                                                               \
      throw ::specext::Kind(specext_os_.str());                                         \
    }                                                                                   \
  } while (0)

}  // namespace specext
