
#include <stdint.h>
/* Megatron's greedy blend: sample t goes to the dataset lagging its weight most. */
void build_blending_indices(const double *weights, int64_t num_datasets, int64_t size,
                            int32_t *dataset_index, int64_t *dataset_sample_index,
                            int64_t *counts) {
  for (int64_t t = 0; t < size; ++t) {
    const double target = t > 1 ? (double)t : 1.0;
    int64_t best = 0;
    double best_error = weights[0] * target - (double)counts[0];
    for (int64_t i = 1; i < num_datasets; ++i) {
      const double error = weights[i] * target - (double)counts[i];
      if (error > best_error) { best_error = error; best = i; }
    }
    dataset_index[t] = (int32_t)best;
    dataset_sample_index[t] = counts[best]++;
  }
}
