// The stale-weight guard's per-call check, in C++: reading `_version` from Python costs
// ~50-190 ns a tensor (a ResNet-50 guards ~320 tensors: 61 us a call on the H100's host);
// here it is a pointer compare and a counter read. See fxsparse/runtime/guards.py.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

int64_t version_of(PyObject* obj) {
  return static_cast<int64_t>(THPVariable_Unpack(obj)._version());
}

struct VersionGuard {
  std::vector<Py_ssize_t> positions;  // where the guarded tensors sit among the call's arguments
  py::tuple expected;                 // the guarded tensors, then the tensors the graph hands out
  std::vector<int64_t> versions;

  VersionGuard(std::vector<Py_ssize_t> positions_, py::tuple expected_)
      : positions(std::move(positions_)), expected(std::move(expected_)) {
    for (auto item : expected) {
      if (!THPVariable_Check(item.ptr())) throw py::type_error("VersionGuard guards tensors only");
      versions.push_back(version_of(item.ptr()));
    }
  }

  // Same objects at the same positions, and no version counter moved. `args` is the call's
  // argument tuple (or a list); its items are borrowed while it is alive.
  bool holds(py::handle args) const {
    PyObject* seq = args.ptr();
    const bool is_tuple = PyTuple_Check(seq);
    if (!is_tuple && !PyList_Check(seq)) throw py::type_error("VersionGuard.holds takes a tuple or a list");
    const Py_ssize_t n_args = is_tuple ? PyTuple_GET_SIZE(seq) : PyList_GET_SIZE(seq);
    PyObject* const* items = is_tuple ? &PyTuple_GET_ITEM(seq, 0) : &PyList_GET_ITEM(seq, 0);
    PyObject* const* want = &PyTuple_GET_ITEM(expected.ptr(), 0);
    for (size_t i = 0; i < positions.size(); ++i) {
      if (positions[i] >= n_args || items[positions[i]] != want[i]) return false;
    }
    for (size_t i = 0; i < versions.size(); ++i) {
      if (version_of(want[i]) != versions[i]) return false;
    }
    return true;
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<VersionGuard>(m, "VersionGuard")
      .def(py::init<std::vector<Py_ssize_t>, py::tuple>())
      .def("holds", &VersionGuard::holds);
}
