// Input checks and layout helpers shared by the CPU and CUDA implementations. The Python wrappers
// validate first with friendlier messages; these keep direct torch.ops callers safe too.
// TORCH_CHECK_VALUE surfaces in Python as ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace l2b_fast {

// tau is a one-element floating tensor on the tensors' device (see csrc/ops.cpp). Its value is checked
// here only on the CPU (reading a CUDA tensor would synchronise); the CUDA kernels assert it on the device.
inline void check_tau_tensor(const at::Tensor& tau, const at::Device& device) {
  TORCH_CHECK_VALUE(tau.numel() == 1 && at::isFloatingType(tau.scalar_type()),
                    "l2b_fast: tau must be a one-element floating tensor, got ", tau.scalar_type(), " of shape ",
                    tau.sizes());
  TORCH_CHECK_VALUE(tau.device() == device, "l2b_fast: tau is on ", tau.device(), " but the other tensors are on ",
                    device);
}

// The value of a CPU tau tensor, checked finite and positive.
inline double cpu_tau_value(const at::Tensor& tau) {
  const double value = tau.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0.0, "l2b_fast: tau must be a finite positive number, got ",
                    value);
  return value;
}

// tau as one double on the device, for kernels that read it from memory (a no-op for float64 tau).
inline at::Tensor tau_as_double(const at::Tensor& tau) { return tau.reshape({}).to(at::kDouble); }

inline void check_sample_inputs(const at::Tensor& logits, const at::Tensor& tau,
                                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "l2b_fast: logits must be 2-D [parents, children], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(0) >= 1 && logits.size(1) >= 1, "l2b_fast: logits must be non-empty, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), "l2b_fast: logits must be floating point, got ",
                    logits.scalar_type());
  check_tau_tensor(tau, logits.device());
  TORCH_CHECK_VALUE(noise.has_value() != seed.has_value(), "l2b_fast: give exactly one of noise or seed");
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == logits.sizes(), "l2b_fast: noise shape ", noise->sizes(),
                      " must equal logits shape ", logits.sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(noise->scalar_type()), "l2b_fast: noise must be floating point");
    TORCH_CHECK_VALUE(noise->device() == logits.device(), "l2b_fast: noise is on ", noise->device(),
                      " but logits are on ", logits.device());
  } else {
    TORCH_CHECK_VALUE(seed->numel() == 1 && seed->scalar_type() == at::kLong,
                      "l2b_fast: seed must be a single int64 element");
    TORCH_CHECK_VALUE(seed->device() == logits.device(), "l2b_fast: seed is on ", seed->device(),
                      " but logits are on ", logits.device());
  }
}

// Each parent's activation must occupy its own dense block of memory, parents outermost, so the
// kernels can treat parent i as the flat range [i * N, (i + 1) * N) whatever its layout
// (contiguous or channels_last).
inline bool parents_rows_dense(const at::Tensor& parents) {
  if (!parents.is_non_overlapping_and_dense()) return false;
  const int64_t rows = parents.size(0);
  return rows <= 1 || parents.stride(0) == parents.numel() / rows;
}

inline void check_branch_inputs(const at::Tensor& parents, const at::Tensor& index, const at::Tensor& soft) {
  TORCH_CHECK_VALUE(parents.dim() >= 1 && parents.size(0) >= 1, "l2b_fast: parents must be [I, *S] with I >= 1");
  TORCH_CHECK_VALUE(at::isFloatingType(parents.scalar_type()), "l2b_fast: parents must be floating point, got ",
                    parents.scalar_type());
  TORCH_CHECK_VALUE(parents_rows_dense(parents),
                    "l2b_fast: each parents[i] must be a dense block with parents outermost (use .contiguous())");
  TORCH_CHECK_VALUE(index.dim() == 1 && index.scalar_type() == at::kLong, "l2b_fast: index must be int64 [J]");
  TORCH_CHECK_VALUE(soft.dim() == 2 && soft.size(0) == parents.size(0) && soft.size(1) == index.size(0),
                    "l2b_fast: soft must be [I, J] = [", parents.size(0), ", ", index.size(0), "], got ",
                    soft.sizes());
  TORCH_CHECK_VALUE(index.device() == parents.device() && soft.device() == parents.device(),
                    "l2b_fast: parents, index and soft must be on one device");
}

// Strides of the [J, *S] children tensor: the parents' layout, rows N = numel / I apart (with one
// parent, parents.stride(0) can be anything; the children rows must not overlap).
inline std::vector<int64_t> children_strides(const at::Tensor& parents) {
  std::vector<int64_t> strides(parents.strides().begin(), parents.strides().end());
  strides[0] = parents.numel() / parents.size(0);
  return strides;
}

inline at::Tensor empty_children_like(const at::Tensor& parents, int64_t children) {
  std::vector<int64_t> sizes(parents.sizes().begin(), parents.sizes().end());
  sizes[0] = children;
  return at::empty_strided(sizes, children_strides(parents), parents.options());
}

// grad_out in exactly the children layout the kernels expect (a no-op in the usual case).
inline at::Tensor grad_in_children_layout(const at::Tensor& grad_out, const at::Tensor& parents) {
  const int64_t children = grad_out.size(0);
  std::vector<int64_t> expected(parents.sizes().begin(), parents.sizes().end());
  expected[0] = children;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(expected), "l2b_fast: grad_out shape ", grad_out.sizes(),
                    " must be ", at::IntArrayRef(expected));
  at::Tensor laid_out = grad_out.scalar_type() == parents.scalar_type() ? grad_out : grad_out.to(parents.scalar_type());
  // Row j must be the flat block [j * N, (j + 1) * N) in the parents' in-row order.
  bool same_layout = children <= 1 || laid_out.stride(0) == parents.numel() / parents.size(0);
  for (int64_t d = 1; d < parents.dim() && same_layout; ++d) {
    same_layout = parents.size(d) <= 1 || laid_out.stride(d) == parents.stride(d);
  }
  if (same_layout) return laid_out;
  at::Tensor copy = empty_children_like(parents, children);
  copy.copy_(laid_out);
  return copy;
}

// Children grouped by the parent they sampled (CSR on the host): child_order[offsets[i]:offsets[i+1]]
// are the children of parent i, in increasing order.
struct ChildrenByParent {
  std::vector<int64_t> offsets;
  std::vector<int64_t> child_order;
};

inline ChildrenByParent group_children_by_parent(const int64_t* index, int64_t parents, int64_t children) {
  ChildrenByParent groups;
  groups.offsets.assign(parents + 1, 0);
  for (int64_t j = 0; j < children; ++j) {
    TORCH_CHECK_VALUE(index[j] >= 0 && index[j] < parents, "l2b_fast: index[", j, "] = ", index[j],
                      " is out of range for ", parents, " parents");
    ++groups.offsets[index[j] + 1];
  }
  for (int64_t i = 0; i < parents; ++i) groups.offsets[i + 1] += groups.offsets[i];
  groups.child_order.resize(children);
  std::vector<int64_t> fill(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t j = 0; j < children; ++j) groups.child_order[fill[index[j]]++] = j;
  return groups;
}

}  // namespace l2b_fast
