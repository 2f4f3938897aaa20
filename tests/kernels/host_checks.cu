// Host-side checks of kernel helpers that need no GPU: built and run by kernels/check_compile.sh.
// Each check exits non-zero with a message; a helper that loops forever fails by check_compile's timeout.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "cross_entropy.cu"  // the launch helpers and accumulate() live in its anonymous namespace

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

void check_launch_plans_of_huge_rows() {
  const int64_t huge = int64_t(1) << 40;  // past 2^31: an int power of two would overflow on the way
  expect(mtk::pow2_at_least(huge, 512) == 512, "pow2_at_least stops at its cap");
  expect(mtk::pow2_at_least(33, 512) == 64, "pow2_at_least(33) == 64");
  expect(mtk::pow2_at_least(1, 512) == 1, "pow2_at_least(1) == 1");
  const mtk::RowPlan plan = mtk::plan_row(huge, 8, true);
  expect(plan.threads == mtk::kRowThreads && plan.chunks == 0, "a 2^40-element row is streamed by a full block");
  const mtk::RowPlan small = mtk::plan_row(1024, 8, true);
  expect(small.threads == 64 && small.chunks == 2, "a 1024-element bf16 row: 64 threads x 2 packs of 8");
  expect(mtk::threads_for(huge) == mtk::kRowThreads, "cross-entropy threads for a 2^40-column row");
}

// Feeds `values` to accumulate() in chunks of VEC, as one thread of the stats kernel would.
template <int VEC>
void stats_of(const float* values, int count, float& run_max, float& run_sum, float& logit_sum) {
  run_max = -INFINITY, run_sum = 0.0f, logit_sum = 0.0f;
  for (int i = 0; i < count; i += VEC) {
    float chunk[VEC];
    for (int e = 0; e < VEC; ++e) chunk[e] = values[i + e];
    mtk::accumulate<VEC>(chunk, run_max, run_sum, logit_sum);
  }
}

void check_cross_entropy_with_minus_inf_logits() {
  const float masked_first[4] = {-INFINITY, -INFINITY, 2.0f, -INFINITY};
  float run_max, run_sum, logit_sum;
  stats_of<2>(masked_first, 4, run_max, run_sum, logit_sum);
  expect(run_max == 2.0f && std::fabs(run_sum - 1.0f) < 1e-6f, "-inf chunk before a finite one: sum exp = 1");
  stats_of<1>(masked_first, 4, run_max, run_sum, logit_sum);
  expect(run_max == 2.0f && std::fabs(run_sum - 1.0f) < 1e-6f, "-inf logits one by one: sum exp = 1");
  const float all_masked[2] = {-INFINITY, -INFINITY};
  stats_of<2>(all_masked, 2, run_max, run_sum, logit_sum);
  expect(run_max == -INFINITY && run_sum == 0.0f, "only -inf logits: max -inf, sum 0 (no NaN)");
  const float finite[4] = {0.5f, -1.0f, 3.0f, 0.0f};
  stats_of<2>(finite, 4, run_max, run_sum, logit_sum);
  const float expected = std::exp(0.5f - 3.0f) + std::exp(-4.0f) + 1.0f + std::exp(-3.0f);
  expect(run_max == 3.0f && std::fabs(run_sum - expected) < 1e-5f && logit_sum == 2.5f, "finite logits");
}

}  // namespace

int main() {
  check_launch_plans_of_huge_rows();
  check_cross_entropy_with_minus_inf_logits();
  if (failures) return 1;
  std::printf("host checks passed\n");
  return 0;
}
