// The T = 3, K = 3 HasteConv kernel alone, in a loop over one tile whose data stay in cache:
// 8-wide FMAs per ns for one filter block, to compare kernel variants without the per-tile work
// around them (docs/speed.md). Build and run (the headers are those the package build found):
//
//   g++ -O3 -std=c++17 -I ~/.cache/haste-onnx/onnxruntime-headers-1.21 \
//       benchmarks/kernel_loop.cc -o /tmp/kernel_loop
//   /tmp/kernel_loop C MERGED TILES [SIZE]   # e.g. 128 0 1 (single channels), 128 40 10
//
// C input channels, MERGED buckets of SIZE channels each (default 2: pairs; the rest single),
// TILES distinct inputs cycled.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "../custom_ops/haste_conv.cc"

int main(int argc, char** argv) {
  using namespace haste_onnx;
  const int channels = argc > 1 ? std::atoi(argv[1]) : 128;
  const int merged = argc > 2 ? std::atoi(argv[2]) : 0;
  const int tiles = argc > 3 ? std::atoi(argv[3]) : 1;
  const int size = argc > 4 ? std::atoi(argv[4]) : 2;
  if (channels < 1 || merged < 0 || size < 2 || size * merged > channels || tiles < 1) {
    std::fprintf(stderr,
                 "usage: kernel_loop C MERGED TILES [SIZE] (SIZE >= 2, SIZE * MERGED <= C, "
                 "TILES >= 1)\n");
    return 2;
  }
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  AlignedVector<float> filters(channels * 9 * 8), wsum(channels * 72);  // aligned as in the op
  std::vector<float> in(tiles * channels * 25);
  std::vector<float> out(72), bias(8);
  for (float& v : filters) v = normal(rng);
  for (float& v : in) v = normal(rng);
  std::vector<int32_t> order(channels), starts;  // single channels first, then merged buckets
  for (int c = 0; c < channels; ++c) order[c] = c;
  for (int c = 0; c < channels - size * merged; ++c) starts.push_back(c);
  for (int c = channels - size * merged; c < channels; c += size) starts.push_back(c);
  starts.push_back(channels);
  const int64_t buckets = static_cast<int64_t>(starts.size()) - 1;
  const ConvTile3Fn kernel = ConvTile3For<8>(3, 3, false, false);
  const int calls = 20000;
  double best = 1e30;
  for (int trial = 0; trial < 7; ++trial) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) {
      kernel(in.data() + (i % tiles) * channels * 25, order.data(), starts.data(), buckets,
             filters.data(), wsum.data(), bias.data(), false, out.data(), BlockAhead{});
    }
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    best = std::min(best, seconds.count());
  }
  std::printf("C = %d, %lld buckets (%d of %d channels), %d tiles: %.2f 8-wide FMAs per ns, %.0f ns "
              "per tile\n",
              channels, static_cast<long long>(buckets), merged, size, tiles,
              calls * buckets * 81.0 / best / 1e9, best / calls * 1e9);
  return out[0] == 12345.0f;  // keeps the results alive
}
