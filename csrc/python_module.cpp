// gptext._C, the Python module: importing it runs the op registrations (ops.cpp,
// cuda_ops.cpp), and it holds two fast entry points per public op, which gptext/ops.py
// calls in place of torch.ops.gptext.<op> outside torch.compile:
//
//   _try_<op>   what each public op calls first. It serves the call when the direct path
//               is on (_set_direct: backend not 'reference', no profiling observer), the
//               first argument is a plain CPU tensor of a kernel dtype, no CPU autocast
//               region is open (ops.py casts the arguments inside one), and the arguments
//               pass the op's C++ checks (ops_common.h). Otherwise it returns None, and
//               ops.py runs its own checks, which raise the error in the op's words or call
//               _call_<op>. torch.compile traces a polyfill in its place that always
//               returns None (ops.py registers it), so no is_compiling test is needed here.
//   _call_<op>  the op, raising on bad arguments: the checked path's call.
//
// An entry point parses its Python arguments itself and calls the op through the
// dispatcher's typed handle, so every dispatch key still applies (the autograd formula,
// fake and functional tensors, dispatch modes, the profiler's records). What it saves is
// the overhead around that: calling an OpOverload from Python costs about 3 us more than
// the kernel on a CPU (argument matching against the schema, boxing into IValues), and the
// autograd wrapper that torch.library puts in front of the op costs several more even
// when no gradient can flow. When none can (grad mode off, or no tensor argument needing
// one), the call goes below autograd, straight to the kernel, as the Python path did with
// torch._C._AutoDispatchBelowAutograd. The GIL is released around the call, as torch's
// own bindings release it. On a 1x1024 CPU softmax the Python checks and the
// is_compiling test that _try_<op> stands in for cost about 0.9 us, more than the kernel.
#include <ATen/autocast_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

namespace gptext {
namespace {

using OptTensor = std::optional<at::Tensor>;

// ---- arguments --------------------------------------------------------------------------

// The arguments of one call, read one by one from Python's fastcall array; a bad one
// raises TypeError naming the op and the argument's position (c10::TypeError, which
// HANDLE_TH_ERRORS turns into Python's, and which a _try_<op> entry point answers with
// None).
class Args {
 public:
  Args(const char* op, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t expected) : op_(op), args_(args) {
    TORCH_CHECK_TYPE(nargs == expected, "gptext._C._call_", op, " takes ", expected, " arguments, got ", nargs);
  }

  const at::Tensor& tensor() {
    PyObject* obj = next();
    if (!THPVariable_Check(obj)) bad("a Tensor");
    note_tensor(obj);
    return THPVariable_Unpack(obj);
  }
  OptTensor optional_tensor() {
    if (peek() == Py_None) {
      next();
      return std::nullopt;
    }
    return tensor();
  }
  // Any int-like (__index__) or float-like (__float__) value, as Python's own conversions
  // take them; their TypeError propagates.
  int64_t integer() {
    const long long value = PyLong_AsLongLong(next());
    if (value == -1 && PyErr_Occurred()) throw python_error();
    return value;
  }
  double real() {
    const double value = PyFloat_AsDouble(next());
    if (value == -1.0 && PyErr_Occurred()) throw python_error();
    return value;
  }
  bool boolean() {
    PyObject* obj = next();
    if (!PyBool_Check(obj)) bad("a bool");
    return obj == Py_True;
  }
  std::string string() {
    PyObject* obj = next();
    if (!PyUnicode_Check(obj)) bad("a str");
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
    if (data == nullptr) throw python_error();
    return std::string(data, size_t(size));
  }

  // Whether the call must go through autograd: grad mode is on and some tensor argument
  // requires grad or is a tensor subclass (a fake or functional tensor, which keeps the
  // full path; nn.Parameter counts as a plain tensor).
  bool needs_autograd() const { return c10::GradMode::is_enabled() && autograd_; }

 private:
  PyObject* peek() const { return args_[index_]; }
  PyObject* next() { return args_[index_++]; }
  [[noreturn]] void bad(const char* what) const {
    TORCH_CHECK_TYPE(false, "gptext._C._call_", op_, ": argument ", index_, " must be ", what, ", not ",
                     Py_TYPE(args_[index_ - 1])->tp_name);
  }
  void note_tensor(PyObject* obj) {
    autograd_ = autograd_ || !THPVariable_CheckExact(obj) || THPVariable_Unpack(obj).requires_grad();
  }

  const char* op_;
  PyObject* const* args_;
  Py_ssize_t index_ = 0;
  bool autograd_ = false;
};

// ---- calling the op ---------------------------------------------------------------------

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// op(args...) through the dispatcher, below autograd when no gradient can flow, without
// the GIL.
template <typename Sig, typename... A>
auto dispatch(const c10::TypedOperatorHandle<Sig>& op, bool needs_autograd, const A&... args) {
  pybind11::gil_scoped_release no_gil;
  if (needs_autograd) return op.call(args...);
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(args...);
}

PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

template <typename... T>
PyObject* wrap(std::tuple<T...> values) {
  constexpr Py_ssize_t n = sizeof...(T);
  PyObject* tuple = PyTuple_New(n);
  if (tuple == nullptr) throw python_error();
  Py_ssize_t i = 0;
  std::apply([&](auto&... t) { ((PyTuple_SET_ITEM(tuple, i++, THPVariable_Wrap(std::move(t)))), ...); }, values);
  return tuple;
}

// ---- the entry points -------------------------------------------------------------------

// An argument of C++ type P, read from Python.
template <typename P>
auto parse(Args& a) {
  using T = std::decay_t<P>;
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return a.tensor();  // a reference, copied into the call's tuple
  } else if constexpr (std::is_same_v<T, OptTensor>) {
    return a.optional_tensor();
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return a.integer();
  } else if constexpr (std::is_same_v<T, double>) {
    return a.real();
  } else if constexpr (std::is_same_v<T, bool>) {
    return a.boolean();
  } else {
    static_assert(std::is_same_v<T, std::string>, "an argument type the entry points do not parse");
    return a.string();
  }
}

// Whether the _try_<op> entry points serve calls (gptext._C._set_direct).
std::atomic<bool> g_direct{false};

// Whether a _try_<op> entry point takes a call whose first argument is obj: a plain tensor
// (or nn.Parameter) on the CPU, of a dtype the kernels take, outside a CPU torch.autocast
// region (under one, ops.py casts the arguments first).
bool servable(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  const at::ScalarType dtype = t.scalar_type();
  return t.is_cpu() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

// Whether the Python error now set is one that sends a _try_<op> call on to ops.py's checks
// (TypeError, ValueError, IndexError); it clears it if so.
bool declined_python_error() {
  if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError) &&
      !PyErr_ExceptionMatches(PyExc_IndexError)) {
    return false;
  }
  PyErr_Clear();
  return true;
}

template <const char* Name, typename Sig>
struct Entry;

// gptext._C._call_<Name>(*args) and _try_<Name>(*args): the op gptext::<Name> with schema
// signature R(P...), its arguments parsed in order (a braced initialiser evaluates left to
// right).
template <const char* Name, typename R, typename... P>
struct Entry<Name, R(P...)> {
  static PyObject* run(PyObject* const* argv, Py_ssize_t argc) {
    static const auto op = typed_op<R(P...)>((std::string("gptext::") + Name).c_str());
    Args a(Name, argv, argc, Py_ssize_t(sizeof...(P)));
    const std::tuple<std::decay_t<P>...> values{parse<P>(a)...};
    const bool needs_autograd = a.needs_autograd();
    return wrap(std::apply([&](const auto&... v) { return dispatch(op, needs_autograd, v...); }, values));
  }

  static PyObject* call(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
    HANDLE_TH_ERRORS
    return run(argv, argc);
    END_HANDLE_TH_ERRORS
  }

  static PyObject* attempt(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
    HANDLE_TH_ERRORS
    if (!g_direct.load(std::memory_order_relaxed) || argc == 0 || !servable(argv[0])) Py_RETURN_NONE;
    try {
      return run(argv, argc);
    } catch (const c10::TypeError&) {
    } catch (const c10::ValueError&) {
    } catch (const c10::IndexError&) {
    } catch (python_error& error) {
      error.restore();  // a persisted error is set again; one never fetched is still set
      if (!declined_python_error()) return nullptr;
    }
    Py_RETURN_NONE;
    END_HANDLE_TH_ERRORS
  }
};

PyObject* set_direct(PyObject*, PyObject* on) {
  const int value = PyObject_IsTrue(on);
  if (value < 0) return nullptr;
  g_direct.store(value != 0);
  Py_RETURN_NONE;
}

PyObject* get_direct(PyObject*, PyObject*) { return PyBool_FromLong(g_direct.load() ? 1 : 0); }

using Tensor = const at::Tensor&;
using Optional = const OptTensor&;
constexpr char kSoftmax[] = "softmax", kLayernorm[] = "layernorm", kLayernormResidual[] = "layernorm_residual",
               kRmsnorm[] = "rmsnorm", kRmsnormResidual[] = "rmsnorm_residual", kLinear[] = "linear", kFfn[] = "ffn", kAttention[] = "attention",
               kExpertLinear[] = "expert_linear", kRope[] = "rope";
// The schemas of csrc/ops.cpp, as C++ signatures (typed_op checks them when first called).
using Softmax = Entry<kSoftmax, at::Tensor(Tensor, int64_t, double, bool, int64_t)>;
using Layernorm = Entry<kLayernorm, std::tuple<at::Tensor, at::Tensor, at::Tensor>(Tensor, Tensor, Optional, double)>;
using LayernormResidual =
    Entry<kLayernormResidual,
          std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(Tensor, Tensor, Tensor, Optional, double)>;
using Rmsnorm = Entry<kRmsnorm, std::tuple<at::Tensor, at::Tensor>(Tensor, Tensor, double)>;
using RmsnormResidual =
    Entry<kRmsnormResidual, std::tuple<at::Tensor, at::Tensor, at::Tensor>(Tensor, Tensor, Tensor, double)>;
using Linear = Entry<kLinear, at::Tensor(Tensor, Tensor, Optional, const std::string&, Optional)>;
using Ffn = Entry<kFfn, at::Tensor(Tensor, Tensor, Optional, Tensor, Optional, Optional)>;
using Rope = Entry<kRope, at::Tensor(Tensor, Tensor, Tensor)>;
using ExpertLinear = Entry<kExpertLinear, at::Tensor(Tensor, Tensor, Optional, Tensor, const std::string&, double)>;
using Attention = Entry<kAttention, std::tuple<at::Tensor, at::Tensor>(Tensor, Tensor, Tensor, bool, int64_t, Optional,
                                                                        double, Optional, Optional)>;

#define GPTEXT_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn))
// The two entry points of one op (see the top of this file).
#define GPTEXT_ENTRIES(name, Entry)                                                                  \
  {"_call_" name, GPTEXT_FASTCALL(Entry::call), METH_FASTCALL, "torch.ops.gptext." name ", directly"}, \
      {"_try_" name, GPTEXT_FASTCALL(Entry::attempt), METH_FASTCALL, "_call_" name ", or None to decline"}
PyMethodDef methods[] = {
    GPTEXT_ENTRIES("softmax", Softmax),
    GPTEXT_ENTRIES("layernorm", Layernorm),
    GPTEXT_ENTRIES("layernorm_residual", LayernormResidual),
    GPTEXT_ENTRIES("rmsnorm", Rmsnorm),
    GPTEXT_ENTRIES("rmsnorm_residual", RmsnormResidual),
    GPTEXT_ENTRIES("linear", Linear),
    GPTEXT_ENTRIES("ffn", Ffn),
    GPTEXT_ENTRIES("rope", Rope),
    GPTEXT_ENTRIES("expert_linear", ExpertLinear),
    GPTEXT_ENTRIES("attention", Attention),
    {"_set_direct", set_direct, METH_O, "whether the _try_<op> entry points serve calls"},
    {"_direct", get_direct, METH_NOARGS, "whether the _try_<op> entry points serve calls"},
    {nullptr, nullptr, 0, nullptr},
};
#undef GPTEXT_ENTRIES
#undef GPTEXT_FASTCALL

}  // namespace
}  // namespace gptext

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "gptext's compiled ops (see torch.ops.gptext)", -1,
                               gptext::methods};
  return PyModule_Create(&module);
}
