// The stale-weight guard's per-call check, in C++ (see fxsparse/runtime/guards.py). Read from
// Python, a tensor's version costs 50-190 ns; here each guarded tensor costs the two cache
// lines its TensorImpl and version counter sit on, which is what a few hundred tensors cost
// per call on a host whose caches the rest of the call has just flushed.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

// What a tensor's value rests on: its version counter (bumped by every in-place write) and
// where its data lives (`.data = t` and `set_` swap the storage under the same object; the
// former leaves the version as it was).
struct Footprint {
  c10::TensorImpl* impl;
  const c10::StorageImpl* storage;  // null where the tensor has no storage
  int64_t offset;
  uint32_t version;
};

// (unsafe_storage: the inline read of the member; storage() is a virtual call that checks
// whether the tensor may expose its storage, which ours, parameters and buffers, do)
Footprint footprint_of(const at::Tensor& t) {
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const bool stored = impl->has_storage();
  return {impl, stored ? impl->unsafe_storage().unsafeGetStorageImpl() : nullptr,
          stored ? impl->storage_offset() : 0, impl->version_counter().current_version()};
}

bool unchanged(const Footprint& f) {
  const c10::TensorImpl* impl = f.impl;
  return impl->version_counter().current_version() == f.version &&
         impl->unsafe_storage().unsafeGetStorageImpl() == f.storage && impl->storage_offset() == f.offset;
}

struct VersionGuard {
  std::vector<Py_ssize_t> positions;  // where the guarded tensors sit among the call's arguments
  py::tuple expected;                 // the guarded tensors, then the tensors held by the graph
  std::vector<at::Tensor> tensors;    // the same, kept alive (their TensorImpls stay put)
  std::vector<c10::Storage> storages; // their storages as compacted, kept alive so that no new
                                      // storage can take an old one's address
  std::vector<Footprint> footprints;

  VersionGuard(std::vector<Py_ssize_t> positions_, py::tuple expected_)
      : positions(std::move(positions_)), expected(std::move(expected_)) {
    for (auto item : expected) {
      if (!THPVariable_Check(item.ptr())) throw py::type_error("VersionGuard guards tensors only");
      const at::Tensor& t = THPVariable_Unpack(item.ptr());
      tensors.push_back(t);
      if (t.unsafeGetTensorImpl()->has_storage()) storages.push_back(t.storage());
      footprints.push_back(footprint_of(t));
    }
  }

  // Same objects at the same positions, and no tensor written or given other data. `args` is
  // the call's argument tuple (or a list); its items are borrowed while it is alive.
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
    for (const Footprint& f : footprints) {
      if (!unchanged(f)) return false;
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
