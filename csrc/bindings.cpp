// specext._native: unpacks DLPack capsules, checks every argument, calls the kernels.
// Outputs are allocated by the caller; nothing here allocates tensors or returns them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>


#include "common.h"
#include "dlpack.h"
#include "kernels.h"
#include "parallel.h"

namespace py = pybind11;
using namespace specext;

namespace {

enum class Dev { CPU, CUDA };

struct View {
  std::string name;
  void* data = nullptr;
  std::vector<int64_t> shape, strides;
  DType dtype = DType::F32;
  Dev dev = Dev::CPU;
  int device_id = 0;
  bool readonly = false;
  std::string unsupported;  // a dtype no kernel takes ("int16"); expect_dtype names it with what was expected
  int64_t ndim() const { return int64_t(shape.size()); }
  std::string where() const { return dev == Dev::CPU ? "cpu" : "cuda:" + std::to_string(device_id); }
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

// Owns a consumed capsule: renames it so its producer's destructor does not free it
// again, and calls the DLPack deleter once we are done (with the GIL held, since numpy's
// deleter touches Python objects).
class Consumed {
 public:
  Consumed() = default;
  Consumed(const Consumed&) = delete;
  Consumed& operator=(const Consumed&) = delete;
  ~Consumed() {
    if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
    if (legacy_ && legacy_->deleter) legacy_->deleter(legacy_);
  }

  View take(py::handle obj, const char* name) {
    View v;
    v.name = name;
    SPECEXT_CHECK(PyCapsule_CheckExact(obj.ptr()), TypeError,
                  name << " must be a DLPack capsule (the Python layer passes tensor.__dlpack__())");
    PyObject* cap = obj.ptr();
    const DLTensor* t = nullptr;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
      versioned_ = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
      PyCapsule_SetName(cap, "used_dltensor_versioned");
      SPECEXT_CHECK(versioned_->version.major == 1, TypeError,
                    name << ": DLPack major version " << versioned_->version.major << " is not supported (expected 1)");
      t = &versioned_->dl_tensor;
      v.readonly = (versioned_->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
      legacy_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
      PyCapsule_SetName(cap, "used_dltensor");
      t = &legacy_->dl_tensor;
    } else {
      SPECEXT_CHECK(false, ValueError, name << ": DLPack capsule was already consumed or is not a dltensor");
    }
    const int nd = t->ndim;
    v.shape.assign(t->shape, t->shape + nd);
    if (t->strides) {
      v.strides.assign(t->strides, t->strides + nd);
    } else {  // NULL strides: compact row-major
      v.strides.assign(size_t(nd), 1);
      for (int i = nd - 2; i >= 0; --i) v.strides[i] = v.strides[i + 1] * v.shape[i + 1];
    }
    v.data = t->data ? static_cast<char*>(t->data) + t->byte_offset : nullptr;
    const DLDataType d = t->dtype;
    SPECEXT_CHECK(d.lanes == 1, TypeError, name << ": vector dtypes (lanes=" << d.lanes << ") are not supported");
    if (d.code == kDLFloat && d.bits == 32) v.dtype = DType::F32;
    else if (d.code == kDLFloat && d.bits == 16) v.dtype = DType::F16;
    else if (d.code == kDLFloat && d.bits == 64) v.dtype = DType::F64;
    else if (d.code == kDLBfloat && d.bits == 16) v.dtype = DType::BF16;
    else if (d.code == kDLInt && d.bits == 32) v.dtype = DType::I32;
    else if (d.code == kDLInt && d.bits == 64) v.dtype = DType::I64;
    else {  // refused by the argument's expect_dtype, which says what it takes
      const char* kind = d.code == kDLInt ? "int" : d.code == kDLUInt ? "uint" : d.code == kDLBool ? "bool" : "float";
      v.unsupported = (d.code == kDLBool ? std::string("bool") : kind + std::to_string(int(d.bits)));
      v.dtype = static_cast<DType>(-1);
    }
    if (t->device.device_type == kDLCPU || t->device.device_type == kDLCUDAHost) {
      v.dev = Dev::CPU;
    } else if (t->device.device_type == kDLCUDA) {
      v.dev = Dev::CUDA;
      v.device_id = t->device.device_id;
    } else {
      SPECEXT_CHECK(false, ValueError, name << ": device type " << t->device.device_type << " is not supported (cpu or cuda)");
    }
    // torch and numpy always hand over element-aligned data; another producer might not, and
    // a misaligned load is a sticky error that ends the whole CUDA context.
    SPECEXT_CHECK(!v.unsupported.empty() || reinterpret_cast<uintptr_t>(v.data) % uintptr_t(dtype_size(v.dtype)) == 0,
                  ValueError,
                  name << ": data address is not aligned to its " << dtype_size(v.dtype)
                       << "-byte elements (DLPack data + byte_offset); pass a copy");
    for (int i = 0; i < nd; ++i)
      SPECEXT_CHECK(v.strides[i] >= 0, ValueError,
                    name << " has a negative stride " << shape_str(v.strides) << "; pass a copy (.copy() / .contiguous())");
    return v;
  }

 private:
  DLManagedTensor* legacy_ = nullptr;
  DLManagedTensorVersioned* versioned_ = nullptr;
};

void expect_dtype(const View& v, std::initializer_list<DType> ok) {
  for (DType d : ok)
    if (v.dtype == d) return;
  std::string names;
  size_t i = 0;
  for (DType d : ok) names += std::string(i++ ? (i == ok.size() ? " or " : ", ") : "") + dtype_name(d);
  SPECEXT_CHECK(false, TypeError,
                v.name << " must be " << names << ", got " << (v.unsupported.empty() ? dtype_name(v.dtype) : v.unsupported));
}

void expect_ndim(const View& v, int64_t nd, const char* what) {
  SPECEXT_CHECK(v.ndim() == nd, ValueError,
                v.name << " must be " << nd << "-D " << what << ", got " << v.ndim() << "-D with shape " << shape_str(v.shape));
}

// Unit stride along the last dimension (size-1 dimensions are exempt).
void expect_unit_last(const View& v) {
  SPECEXT_CHECK(v.shape.back() <= 1 || v.strides.back() == 1, ValueError,
                v.name << " must have unit stride along its last dimension, got strides " << shape_str(v.strides)
                       << " for shape " << shape_str(v.shape) << "; pass a contiguous copy");
}

void expect_writable(const View& v) {
  SPECEXT_CHECK(!v.readonly, ValueError, v.name << " is read-only but is written by this kernel");
}

void expect_same_device(const View& a, const View& b) {
  SPECEXT_CHECK(a.dev == b.dev && a.device_id == b.device_id, ValueError,
                a.name << " and " << b.name << " must be on the same device, got " << a.where() << " and " << b.where());
}

void expect_cuda_built(const View& v) {
#ifndef SPECEXT_WITH_CUDA
  SPECEXT_CHECK(v.dev != Dev::CUDA, RuntimeError,
                v.name << " is on " << v.where()
                       << " but specext was built without CUDA (specext.build_info()['cuda'] is False); "
                          "reinstall with SPECEXT_CUDA=ON and nvcc on PATH");
#else
  (void)v;
#endif
}

// --- aliasing (issue 13) -----------------------------------------------------------------
// Kernels write their outputs without reading them through another argument, so an output
// must own its elements: no element reachable by two indices (a stride-0 tensor from
// expand()/broadcast_to() would sum every category into one shared row), and no byte shared
// with any other argument. Inputs may be broadcast (stride 0): they are only read.

// Byte range [lo, hi] an argument can touch (strides are >= 0, checked in take()); empty
// tensors touch nothing.
struct Extent {
  uintptr_t lo = 0, hi = 0;
  bool empty = true;
};

Extent extent(const View& v) {
  Extent e;
  if (!v.data) return e;
  uintptr_t span = 0;
  for (size_t i = 0; i < v.shape.size(); ++i) {
    if (v.shape[i] == 0) return e;
    span += uintptr_t(v.shape[i] - 1) * uintptr_t(v.strides[i]);
  }
  const uintptr_t item = uintptr_t(dtype_size(v.dtype));
  e.lo = reinterpret_cast<uintptr_t>(v.data);
  e.hi = e.lo + span * item + item - 1;
  e.empty = false;
  return e;
}

// An output whose elements are all distinct: sorted by stride, each stride must step past
// everything the smaller dimensions reach (sufficient, and exact for every layout torch and
// numpy produce without as_strided).
void expect_own_memory(const View& v) {
  std::vector<size_t> dims;
  for (size_t i = 0; i < v.shape.size(); ++i)
    if (v.shape[i] > 1) dims.push_back(i);
  for (size_t i : dims)
    SPECEXT_CHECK(v.strides[i] != 0, ValueError,
                  v.name << " has stride 0 along dimension " << i << " (shape " << shape_str(v.shape) << ", strides "
                         << shape_str(v.strides)
                         << "): every index along it is the same memory (a view from expand() or broadcast_to()), "
                            "and the kernel writes it; pass an output with its own memory (torch.zeros / np.zeros, "
                            "or .contiguous() / .copy())");
  std::sort(dims.begin(), dims.end(), [&](size_t a, size_t b) { return v.strides[a] < v.strides[b]; });
  int64_t reach = 0;  // elements spanned by the dimensions with smaller strides
  for (size_t i : dims) {
    SPECEXT_CHECK(v.strides[i] > reach, ValueError,
                  v.name << " has overlapping elements (shape " << shape_str(v.shape) << ", strides "
                         << shape_str(v.strides) << ": dimension " << i
                         << " steps back into memory that other indices already use), and the kernel writes it; "
                            "pass an output with its own memory (.contiguous() / .copy())");
    reach += (v.shape[i] - 1) * v.strides[i];
  }
}

// No output shares a byte range with any other argument. Conservative: byte ranges, not
// elements, so interleaved views that share no element (x[:, 0::2] and x[:, 1::2]) are
// refused too.
void expect_no_alias(std::initializer_list<const View*> inputs, std::initializer_list<const View*> outputs) {
  std::vector<const View*> all;
  for (const View* v : outputs) all.push_back(v);
  const size_t n_out = all.size();
  for (const View* v : inputs) all.push_back(v);
  for (size_t i = 0; i < n_out; ++i) expect_own_memory(*all[i]);
  for (size_t i = 0; i < n_out; ++i) {
    const Extent a = extent(*all[i]);
    if (a.empty) continue;
    for (size_t j = i + 1; j < all.size(); ++j) {
      if (all[j]->dev != all[i]->dev || all[j]->device_id != all[i]->device_id) continue;
      const Extent b = extent(*all[j]);
      if (b.empty || a.hi < b.lo || b.hi < a.lo) continue;
      SPECEXT_CHECK(false, ValueError,
                    all[i]->name << " and " << all[j]->name << " overlap in memory, and " << all[i]->name
                                 << (j < n_out ? " and " + all[j]->name + " are both written" : std::string(" is written"))
                                 << " by this kernel; outputs must not share memory with any other argument "
                                    "(the check compares byte ranges, so interleaved views that share no element are "
                                    "refused too); pass separate tensors");
    }
  }
}

Stat parse_stat(const std::string& s) {
  if (s == "abs") return Stat::Abs;
  if (s == "square") return Stat::Square;
  if (s == "relu") return Stat::Relu;
  if (s == "signed") return Stat::Signed;
  SPECEXT_CHECK(false, ValueError, "stat must be one of 'abs', 'square', 'relu', 'signed', got '" << s << "'");
  return Stat::Abs;
}

void* as_stream(uintptr_t s) { return reinterpret_cast<void*>(s); }

void py_category_accumulate(py::handle acts_c, py::handle labels_c, py::handle weights_c, py::handle sums_c,
                            py::handle counts_c, const std::string& stat, uintptr_t stream, py::handle errors_c) {
  Consumed o_acts, o_labels, o_weights, o_sums, o_counts, o_errors;
  View acts = o_acts.take(acts_c, "acts");
  View labels = o_labels.take(labels_c, "labels");
  View sums = o_sums.take(sums_c, "sums");
  View counts = o_counts.take(counts_c, "counts");
  const bool has_w = !weights_c.is_none();
  View weights;
  if (has_w) weights = o_weights.take(weights_c, "weights");
  const bool has_e = !errors_c.is_none();  // unchecked mode (kernels.h, AccumulateArgs::errors)
  View errors;
  if (has_e) errors = o_errors.take(errors_c, "errors");

  AccumulateArgs a;
  a.stat = parse_stat(stat);
  expect_ndim(acts, 2, "(tokens, neurons)");
  expect_dtype(acts, {DType::F32, DType::F16, DType::BF16});
  expect_unit_last(acts);
  expect_ndim(labels, 1, "(tokens,)");
  expect_dtype(labels, {DType::I32, DType::I64});
  SPECEXT_CHECK(labels.shape[0] == acts.shape[0], ValueError,
                "labels has " << labels.shape[0] << " entries but acts has " << acts.shape[0] << " rows (tokens)");
  expect_ndim(sums, 2, "(categories, neurons)");
  expect_dtype(sums, {DType::F32});
  expect_unit_last(sums);
  expect_writable(sums);
  SPECEXT_CHECK(sums.shape[1] == acts.shape[1], ValueError,
                "sums has " << sums.shape[1] << " columns but acts has " << acts.shape[1] << " neurons");
  expect_ndim(counts, 1, "(categories,)");
  expect_dtype(counts, {DType::F32});
  expect_writable(counts);
  SPECEXT_CHECK(counts.shape[0] == sums.shape[0], ValueError,
                "counts has " << counts.shape[0] << " entries but sums has " << sums.shape[0] << " rows (categories)");
  for (const View* v : {&labels, &sums, &counts}) expect_same_device(acts, *v);
  if (has_w) {
    expect_ndim(weights, 1, "(tokens,)");
    expect_dtype(weights, {DType::F32});
    SPECEXT_CHECK(weights.shape[0] == acts.shape[0], ValueError,
                  "weights has " << weights.shape[0] << " entries but acts has " << acts.shape[0] << " rows (tokens)");
    expect_same_device(acts, weights);
  }
  if (has_e) {
    expect_ndim(errors, 1, "(3,) [bad tokens, first bad label, its token index]");
    expect_dtype(errors, {DType::I64});
    SPECEXT_CHECK(errors.shape[0] == 3, ValueError, "errors must have 3 entries, got " << errors.shape[0]);
    expect_writable(errors);
    expect_same_device(acts, errors);
    // errors[1] == 0 means "no bad label recorded yet", so 0 must be a valid label.
    SPECEXT_CHECK(sums.shape[0] >= 1, ValueError, "sums must have at least one category (row) when errors is given");
  }
  {
    static const View none;
    expect_no_alias({&acts, &labels, has_w ? &weights : &none}, {&sums, &counts, has_e ? &errors : &none});
  }
  expect_cuda_built(acts);

  a.acts = acts.data;
  a.acts_dtype = acts.dtype;
  a.T = acts.shape[0];
  a.N = acts.shape[1];
  a.acts_stride0 = acts.strides[0];
  a.labels = labels.data;
  a.labels_dtype = labels.dtype;
  a.labels_stride = labels.strides[0];
  a.weights = has_w ? static_cast<const float*>(weights.data) : nullptr;
  a.weights_stride = has_w ? weights.strides[0] : 1;
  a.sums = static_cast<float*>(sums.data);
  a.C = sums.shape[0];
  a.sums_stride0 = sums.strides[0];
  a.counts = static_cast<float*>(counts.data);
  a.counts_stride = counts.strides[0];
  a.errors = has_e ? static_cast<int64_t*>(errors.data) : nullptr;
  a.errors_stride = has_e ? errors.strides[0] : 1;

  py::gil_scoped_release nogil;
  if (acts.dev == Dev::CPU) {
    category_accumulate_cpu(a);
  } else {
#ifdef SPECEXT_WITH_CUDA
    category_accumulate_cuda(a, acts.device_id, as_stream(stream));
#endif
  }
}

void py_neuron_specialization(py::handle mass_c, py::handle entropy_c, py::handle norm_entropy_c, py::handle gini_c,
                              py::handle top_category_c, py::handle top_share_c, py::handle total_c, uintptr_t stream) {
  Consumed o_mass, o1, o2, o3, o4, o5, o6;
  View mass = o_mass.take(mass_c, "mass");
  expect_ndim(mass, 2, "(categories, neurons)");
  expect_dtype(mass, {DType::F32});
  expect_unit_last(mass);
  SPECEXT_CHECK(mass.shape[0] > 0, ValueError, "mass must have at least one category (row), got shape " << shape_str(mass.shape));
  expect_cuda_built(mass);
  const int64_t N = mass.shape[1];
  View outs[6] = {o1.take(entropy_c, "entropy"),     o2.take(norm_entropy_c, "norm_entropy"),
                  o3.take(gini_c, "gini"),           o4.take(top_category_c, "top_category"),
                  o5.take(top_share_c, "top_share"), o6.take(total_c, "total")};
  for (View& v : outs) {
    expect_ndim(v, 1, "(neurons,)");
    expect_dtype(v, {&v == &outs[3] ? DType::I64 : DType::F32});
    SPECEXT_CHECK(v.shape[0] == N, ValueError, v.name << " has " << v.shape[0] << " entries, expected " << N);
    SPECEXT_CHECK(N <= 1 || v.strides[0] == 1, ValueError, v.name << " must be contiguous");
    expect_writable(v);
    expect_same_device(mass, v);
  }
  expect_no_alias({&mass}, {&outs[0], &outs[1], &outs[2], &outs[3], &outs[4], &outs[5]});
  SpecializationArgs a;
  a.mass = static_cast<const float*>(mass.data);
  a.C = mass.shape[0];
  a.N = N;
  a.mass_stride0 = mass.strides[0];
  a.entropy = static_cast<float*>(outs[0].data);
  a.norm_entropy = static_cast<float*>(outs[1].data);
  a.gini = static_cast<float*>(outs[2].data);
  a.top_category = static_cast<int64_t*>(outs[3].data);
  a.top_share = static_cast<float*>(outs[4].data);
  a.total = static_cast<float*>(outs[5].data);
  py::gil_scoped_release nogil;
  if (mass.dev == Dev::CPU) {
    neuron_specialization_cpu(a);
  } else {
#ifdef SPECEXT_WITH_CUDA
    neuron_specialization_cuda(a, mass.device_id, as_stream(stream));
#endif
  }
}

void py_value_vector_norms(py::handle weight_c, py::handle out_c, uintptr_t stream) {
  Consumed o_w, o_out;
  View w = o_w.take(weight_c, "weight");
  View out = o_out.take(out_c, "out");
  expect_ndim(w, 2, "(d_model, d_ff)");
  expect_dtype(w, {DType::F32, DType::F16, DType::BF16, DType::F64});
  expect_ndim(out, 1, "(d_ff,)");
  expect_dtype(out, {DType::F32});
  SPECEXT_CHECK(out.shape[0] == w.shape[1], ValueError,
                "out has " << out.shape[0] << " entries but weight has " << w.shape[1] << " columns (d_ff)");
  SPECEXT_CHECK(out.shape[0] <= 1 || out.strides[0] == 1, ValueError, "out must be contiguous");
  expect_writable(out);
  expect_same_device(w, out);
  expect_no_alias({&w}, {&out});
  expect_cuda_built(w);
  NormsArgs a;
  a.weight = w.data;
  a.dtype = w.dtype;
  a.R = w.shape[0];
  a.K = w.shape[1];
  a.stride0 = w.strides[0];
  a.stride1 = w.strides[1];
  a.out = static_cast<float*>(out.data);
  py::gil_scoped_release nogil;
  if (w.dev == Dev::CPU) {
    value_vector_norms_cpu(a);
  } else {
#ifdef SPECEXT_WITH_CUDA
    value_vector_norms_cuda(a, w.device_id, as_stream(stream));
#endif
  }
}

py::dict build_info() {
  py::dict d;
#ifdef SPECEXT_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(SPECEXT_XSTR(SPECEXT_CUDA_ARCHS));
  d["cuda_devices"] = cuda_device_count();
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_devices"] = 0;
#endif
  d["threads"] = specext::num_threads();
  d["simd"] = simd_level();
  d["simd_available"] = simd_levels_available();
  d["compiler"] = std::string(
#if defined(__clang__)
      "clang " __clang_version__
#elif defined(__GNUC__)
      "gcc " __VERSION__
#else
      "unknown"
#endif
  );
  return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "specext native kernels (CPU + optional CUDA) over DLPack capsules";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const specext::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const specext::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const specext::RuntimeError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
  m.def("category_accumulate", &py_category_accumulate, py::arg("acts"), py::arg("labels"), py::arg("weights"),
        py::arg("sums"), py::arg("counts"), py::arg("stat"), py::arg("stream") = 0, py::arg("errors") = py::none());
  m.def("neuron_specialization", &py_neuron_specialization, py::arg("mass"), py::arg("entropy"),
        py::arg("norm_entropy"), py::arg("gini"), py::arg("top_category"), py::arg("top_share"), py::arg("total"),
        py::arg("stream") = 0);
  m.def("value_vector_norms", &py_value_vector_norms, py::arg("weight"), py::arg("out"), py::arg("stream") = 0);
  m.def("build_info", &build_info);
  m.def("simd_level", &simd_level);
  m.def("simd_levels_available", &simd_levels_available);
  m.def("set_simd_level", &set_simd_level, py::arg("level"));
  m.def("num_threads", &specext::num_threads);
  m.def("set_num_threads", &specext::set_num_threads, py::arg("n"));
  m.def("cuda_device_count", []() {
#ifdef SPECEXT_WITH_CUDA
    return cuda_device_count();
#else
    return 0;
#endif
  });
}
