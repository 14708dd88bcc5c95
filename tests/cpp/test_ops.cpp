// ctest: the operators of libl2b_fast_ops reached through the dispatcher, as a C++ user would, checked
// against plain ATen formulas on random data.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what);
  if (!ok) ++failures;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t parents = 3, children = 5;
  auto sample = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("l2b_fast::sample_branches", "")
                    .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                              const std::optional<at::Tensor>&)>();
  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("l2b_fast::straight_through_branch", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("l2b_fast::branch_backward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, bool, bool)>();

  const at::Tensor tau = at::scalar_tensor(0.7, at::kDouble);  // read by the kernels from memory
  const at::Tensor logits = at::randn({parents, children}, at::kDouble);
  const at::Tensor noise = at::randn({parents, children}, at::kDouble);
  auto [soft, index] = sample.call(logits, tau, noise, std::nullopt);
  const at::Tensor z = (logits + noise) / tau;
  expect(at::equal(index, z.argmax(0)), "sample_branches index = argmax((logits + noise) / tau)");
  expect(at::allclose(soft, at::softmax(z, 0)), "sample_branches soft = softmax over parents");

  const at::Tensor seed = at::full({1}, 1234, at::kLong);
  auto [soft_a, index_a] = sample.call(logits, tau, std::nullopt, seed);
  auto [soft_b, index_b] = sample.call(logits, tau, std::nullopt, seed);
  expect(at::equal(index_a, index_b) && at::equal(soft_a, soft_b), "same seed gives the same sample");
  expect(at::isfinite(soft_a).all().item<bool>(), "seeded noise is finite");

  const at::Tensor y = at::randn({parents, 2, 3, 7}, at::kDouble);
  const at::Tensor out = forward.call(y, logits, index, soft, tau);
  expect(at::equal(out, y.index_select(0, index)), "straight_through_branch gathers parents[index]");

  const at::Tensor grad = at::randn_like(out);
  auto [grad_parents, grad_logits] = backward.call(grad, y, index, soft, tau, true, true);
  const at::Tensor expected_parents = at::zeros_like(y).index_add_(0, index, grad);
  const at::Tensor dots = at::mm(y.reshape({parents, -1}), grad.reshape({children, -1}).t());
  const at::Tensor expected_logits = soft * (dots - (soft * dots).sum(0, true)) / tau;
  expect(at::allclose(grad_parents, expected_parents), "branch_backward segment sum");
  expect(at::allclose(grad_logits, expected_logits), "branch_backward logits gradient");
  auto [parents_only, no_logits] = backward.call(grad, y, index, soft, tau, true, false);
  expect(at::equal(parents_only, grad_parents) && no_logits.numel() == 0, "branch_backward without the logits gradient");

  tau.fill_(0.35);  // the same tensor, a new temperature
  auto [soft_c, index_c] = sample.call(logits, tau, noise, std::nullopt);
  expect(at::allclose(soft_c, at::softmax((logits + noise) / 0.35, 0)), "a changed tau tensor is read again");

  bool raised = false;
  try {
    sample.call(logits, at::scalar_tensor(-1.0, at::kDouble), noise, std::nullopt);
  } catch (const c10::ValueError&) {
    raised = true;
  }
  expect(raised, "tau <= 0 raises ValueError");

  std::printf("%d failed\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
