// Sequence packing for the packed (varlen) batch layout.
//
// Concatenates per-sample token ids and labels into one row, restarts position ids at 0 for
// every sample and writes the cumulative sequence lengths flash-attention's varlen kernels
// take. The label of each sample's first token is set to -100: the model shifts labels by one,
// so that label is what the previous sample's last token would otherwise learn to predict.
//
// The Python reference (fastground/data/packing.py: pack_reference) defines the semantics;
// this file only exists because the per-batch Python loop shows up in data-loader profiles
// with thousands of short samples.
// Narrow headers instead of <torch/extension.h>: the op is built on the user's first call,
// and the full header set triples the compile time for no benefit here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kIgnoreIndex = -100;

at::Tensor as_long_1d(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, "[", i, "] must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, what, "[", i, "] must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()),
              what, "[", i, "] must hold integers, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack(
    const std::vector<at::Tensor>& ids, const std::vector<at::Tensor>& labels) {
  TORCH_CHECK_VALUE(ids.size() == labels.size(), "pack: ", ids.size(), " id tensors but ",
              labels.size(), " label tensors");
  const size_t n = ids.size();

  std::vector<at::Tensor> ids_c;
  std::vector<at::Tensor> labels_c;
  ids_c.reserve(n);
  labels_c.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    ids_c.push_back(as_long_1d(ids[i], "ids", i));
    labels_c.push_back(as_long_1d(labels[i], "labels", i));
    TORCH_CHECK_VALUE(ids_c[i].numel() == labels_c[i].numel(), "pack: sample ", i, " has ",
                ids_c[i].numel(), " ids but ", labels_c[i].numel(), " labels");
    total += ids_c[i].numel();
  }
  // cu_seqlens is int32 because that is what the varlen attention kernels accept.
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "pack: ", total,
              " tokens do not fit the int32 cu_seqlens");

  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor out_ids = at::empty({total}, long_opts);
  at::Tensor out_labels = at::empty({total}, long_opts);
  at::Tensor out_pos = at::empty({total}, long_opts);
  at::Tensor cu = at::empty({static_cast<int64_t>(n) + 1}, at::TensorOptions().dtype(at::kInt));

  int64_t* pid = out_ids.data_ptr<int64_t>();
  int64_t* plab = out_labels.data_ptr<int64_t>();
  int64_t* ppos = out_pos.data_ptr<int64_t>();
  int32_t* pcu = cu.data_ptr<int32_t>();
  {
    // Plain memory work from here on: let other Python threads (loader threads) run.
    pybind11::gil_scoped_release no_gil;
    int64_t off = 0;
    pcu[0] = 0;
    for (size_t i = 0; i < n; ++i) {
      const int64_t len = ids_c[i].numel();
      if (len > 0) {
        std::memcpy(pid + off, ids_c[i].data_ptr<int64_t>(), sizeof(int64_t) * len);
        std::memcpy(plab + off, labels_c[i].data_ptr<int64_t>(), sizeof(int64_t) * len);
        plab[off] = kIgnoreIndex;
        for (int64_t j = 0; j < len; ++j) ppos[off + j] = j;
      }
      off += len;
      pcu[i + 1] = static_cast<int32_t>(off);
    }
  }
  return {out_ids, out_labels, out_pos, cu};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack,
        "Concatenate per-sample ids/labels -> (ids, labels, position_ids, cu_seqlens int32); "
        "the first label of every sample becomes -100.",
        pybind11::arg("ids"), pybind11::arg("labels"));
}
