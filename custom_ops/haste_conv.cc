#include "haste_conv.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <x86intrin.h>
#endif
#if defined(__unix__)
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sched.h>  // sched_getaffinity, CPU_COUNT (g++ defines _GNU_SOURCE)
#endif

namespace haste_onnx {
namespace {

constexpr int64_t kMaxPlanes = 63;  // codes are 64-bit
// The largest tile edge T (opdef.MAX_TILE): far beyond any useful tile (the paper's largest is 7),
// and small enough that a tile's scratch stays small: C (T + K - 1)^2 floats of patches, and up to
// C T^2 K^2 of inputs (75 MB for C = 512, T = 64, K = 3; 2.7 GB once T reached 1024).
constexpr int64_t kMaxTile = 64;

// Channels are hashed kHashBlock at a time, their projections summed in registers.
constexpr int64_t kHashBlock = 32;

// Where a run's time goes (benchmarks/profile_layer.py). Built with -DHASTE_PROFILE=ON, the
// kernel adds the clock ticks of each phase of its runs, and counts of the work done, to totals
// for the process, read through HasteConvProfile; otherwise Laps and Tally compile to nothing.
#if defined(HASTE_ONNX_PROFILE)
constexpr bool kProfile = true;
#else
constexpr bool kProfile = false;
#endif
enum Phase { kPatch, kHash, kGroup, kMeans, kConvFull, kConvEdge, kStore, kJob, kPhases };
// Per filter block: full tiles (3 x 3 outputs), their buckets and the channels merged into
// another's bucket; tiles cut by the edge of Y and their multiply-adds (of the kernel's width);
// then jobs and their steady-clock nanoseconds (which calibrate the ticks).
enum Count {
  kFullTiles,
  kFullBuckets,
  kFullMerged,
  kEdgeTiles,
  kEdgeFmas,
  kJobs,
  kJobNanos,
  kCounts
};
std::atomic<uint64_t> profile_totals[kPhases + kCounts];

inline uint64_t Ticks() {
#if defined(__x86_64__)
  return __rdtsc();
#else
  return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
}

// One iteration of a spin-wait loop.
inline void Pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

inline void Tally(Count count, uint64_t amount) {
  if constexpr (kProfile)
    profile_totals[kPhases + count].fetch_add(amount, std::memory_order_relaxed);
}

// Splits a thread's time into phases: To(phase) adds the ticks since the last call to phase.
class Laps {
 public:
  Laps() {
    if constexpr (kProfile) last_ = Ticks();
  }
  void To(Phase phase) {
    if constexpr (kProfile) {
      const uint64_t now = Ticks();
      profile_totals[phase].fetch_add(now - last_, std::memory_order_relaxed);
      last_ = now;
    }
  }

 private:
  uint64_t last_ = 0;
};

using Shape = std::vector<int64_t>;

std::string ToString(const Shape& values) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << ']';
  return out.str();
}

[[noreturn]] void Fail(const std::string& message) {
  throw Ort::Exception("HasteConv: " + message, ORT_INVALID_ARGUMENT);
}

// Shapes of one HasteConv run.
struct Geometry {
  int64_t n, c, h, w;  // X
  int64_t m, k;        // W: [M, C, K, K]
  int64_t pad_top, pad_left;
  int64_t tile, patch;  // T and P = T + K - 1
  int64_t out_h, out_w, tiles_y, tiles_x;
  // The outputs a tile can have, span_y x span_x: T x T, or fewer where Y is smaller than a tile
  // (the kernel lays out no inputs for outputs that no tile has).
  int64_t span_y, span_x;
};

// Accumulators of the convolution kernel: at most kMaxPixels output pixels of one tile, each one
// vector register of output channels, plus registers for the filter and the input (16 on x86-64).
constexpr int64_t kMaxPixels = 12;

// How a tile's span_y * span_x output pixels split into groups of `pixels` (padded) for the
// kernel.
struct PixelGroups {
  int64_t groups, pixels;
};

PixelGroups SplitPixels(int64_t total) {
  const int64_t groups = (total + kMaxPixels - 1) / kMaxPixels;
  return {groups, (total + groups - 1) / groups};
}

// `lanes`: the width W is packed in (FilterLanes, when the session was created).
Geometry MakeGeometry(const Shape& x, const Shape& w, const HasteConvAttributes& attrs,
                      int64_t lanes) {
  if (x.size() != 4) Fail("X must be 4-D [N, C, H, W], got shape " + ToString(x));
  if (w.size() != 4) Fail("W must be 4-D [M, C, K, K], got shape " + ToString(w));
  if (x[1] < 1 || w[0] < 1) {
    Fail("X and W need at least one channel: X shape " + ToString(x) + ", W shape " + ToString(w));
  }
  if (x[1] > std::numeric_limits<int32_t>::max()) {  // channels are numbered in int32
    Fail("X has " + std::to_string(x[1]) + " channels, more than the 2^31 - 1 supported");
  }
  if (w[1] != x[1]) {
    Fail("W has " + std::to_string(w[1]) + " input channels but X has " + std::to_string(x[1]) +
         ": W shape " + ToString(w) + ", X shape " + ToString(x));
  }
  if (w[2] != w[3] || w[2] < 1) Fail("W must have a square kernel, got shape " + ToString(w));
  if (attrs.kernel != 0 && attrs.kernel != w[2]) {
    Fail("kernel_shape " + ToString({attrs.kernel, attrs.kernel}) + " does not match W shape " +
         ToString(w));
  }
  const auto& p = attrs.pads;
  // Every size a run computes from the shapes, checked: huge dimensions or pads must fail here,
  // not overflow later.
  auto overflow = [&] {
    Fail("the sizes overflow 64-bit integers: X shape " + ToString(x) + ", W shape " + ToString(w) +
         ", pads " + ToString({p[0], p[1], p[2], p[3]}) + ", tile " + std::to_string(attrs.tile));
  };
  auto add = [&](int64_t a, int64_t b) {
    int64_t sum;
    if (__builtin_add_overflow(a, b, &sum)) overflow();
    return sum;
  };
  auto mul = [&](int64_t a, int64_t b) {
    int64_t product;
    if (__builtin_mul_overflow(a, b, &product)) overflow();
    return product;
  };
  Geometry g{};
  g.n = x[0], g.c = x[1], g.h = x[2], g.w = x[3];
  g.m = w[0], g.k = w[2];
  g.pad_top = p[0], g.pad_left = p[1];
  g.tile = attrs.tile;
  g.patch = add(g.tile, g.k - 1);
  g.out_h = add(add(g.h, p[0]), p[2]) - (g.k - 1);
  g.out_w = add(add(g.w, p[1]), p[3]) - (g.k - 1);
  if (g.out_h < 1 || g.out_w < 1) {
    Fail("the output would be empty: X shape " + ToString(x) + ", W shape " + ToString(w) +
         ", pads " + ToString({p[0], p[1], p[2], p[3]}));
  }
  g.tiles_y = add(g.out_h, g.tile - 1) / g.tile;
  g.tiles_x = add(g.out_w, g.tile - 1) / g.tile;
  g.span_y = std::min(g.tile, g.out_h);
  g.span_x = std::min(g.tile, g.out_w);
  // Y, one image and the batch; a tile's patches (FillPatch) and HashPatch's scratch; W packed; a
  // row of tiles' inputs (RunJob: per_bucket floats per bucket, at most C buckets per tile).
  mul(g.n, mul(g.m, mul(g.out_h, g.out_w)));
  const int64_t p2 = mul(g.patch, g.patch), taps = mul(g.k, g.k);
  mul(g.c, p2);
  mul(p2, kHashBlock);
  mul(mul(add(g.m, lanes - 1), g.c), taps);
  const PixelGroups split = SplitPixels(g.span_y * g.span_x);  // T <= kMaxTile: T*T is small
  const int64_t per_bucket = std::max(p2, mul(mul(split.groups, taps), split.pixels));
  mul(mul(g.tiles_x, g.c), per_bucket);
  return g;
}

// The P x P input patch of output tile (ty, tx) of one image [C, H, W]: patch [C, P*P]. Positions
// outside the input are zero (the padding, and beyond it where the last tile overhangs Y). Row by
// row, in loops of its own rather than calls to memset and memcpy: the rows are a few floats.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void FillPatch(const Geometry& g,
                                                                             const float* image,
                                                                             int64_t ty, int64_t tx,
                                                                             float* patch) {
  const int64_t p = g.patch, y0 = ty * g.tile - g.pad_top, x0 = tx * g.tile - g.pad_left;
  if (p == 5 && y0 >= 0 && y0 + 5 <= g.h && x0 >= 0 && x0 + 5 <= g.w) {
    // T = 3 and K = 3, the patch inside the input: five rows of fixed size per channel.
    const float* src = image + y0 * g.w + x0;
    for (int64_t c = 0; c < g.c; ++c, src += g.h * g.w, patch += 25) {
      for (int64_t py = 0; py < 5; ++py)
        std::memcpy(patch + py * 5, src + py * g.w, 5 * sizeof(float));
    }
    return;
  }
  // Columns [lo, hi) of the patch are inside the input.
  const int64_t lo = std::clamp<int64_t>(-x0, 0, p), hi = std::clamp<int64_t>(g.w - x0, lo, p);
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t py = 0; py < p; ++py, patch += p) {
      const int64_t iy = y0 + py;
      if (iy < 0 || iy >= g.h || lo == hi) {  // all padding (or beyond it)
        for (int64_t x = 0; x < p; ++x) patch[x] = 0.0f;
        continue;
      }
      const float* src = image + (c * g.h + iy) * g.w + x0 + lo;  // column lo, inside the row
      if (p == 5 && lo == 0 && hi == 5) {  // T = 3 and K = 3 inside the input: a fixed-size copy
        std::memcpy(patch, src, 5 * sizeof(float));
        continue;
      }
      for (int64_t x = 0; x < lo; ++x) patch[x] = 0.0f;
      for (int64_t x = lo; x < hi; ++x) patch[x] = src[x - lo];
      for (int64_t x = hi; x < p; ++x) patch[x] = 0.0f;
    }
  }
}

// The sum over the channels of `count` pixels of an image [C, H*W] (from `image`, a pixel of
// channel 0; channels `stride` = H*W floats apart), in double, channel after channel in order (as
// numpy sums): sums [count]. Each tile takes its patch's part of an image's sums (PatchSums)
// instead of summing its P x P positions over C channels again: patches overlap, and one pass over
// the image costs a fraction of C short rows per tile. A plain loop, which the compiler vectorizes
// as wide as the target allows.
__attribute__((always_inline)) inline void ChannelSumsWith(const float* image, int64_t channels,
                                                           int64_t stride, int64_t count,
                                                           double* sums) {
  std::fill(sums, sums + count, 0.0);
  for (const float* in = image; in < image + channels * stride; in += stride) {
    for (int64_t p = 0; p < count; ++p) sums[p] += in[p];
  }
}

#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
__attribute__((target("avx2"))) void ChannelSumsAvx2(const float* image, int64_t channels,
                                                     int64_t stride, int64_t count, double* sums) {
  ChannelSumsWith(image, channels, stride, count, sums);
}

__attribute__((target("avx512f"))) void ChannelSumsAvx512(const float* image, int64_t channels,
                                                          int64_t stride, int64_t count,
                                                          double* sums) {
  ChannelSumsWith(image, channels, stride, count, sums);
}
#endif

// Pixels whose ChannelSums a thread computes at a time: units small enough to share a 28 x 28
// image between threads, large enough that a channel's row of them is a run of whole cache lines.
constexpr int64_t kSumPixels = 256;

// Units of kSumPixels pixels (the last one fewer) that an image's ChannelSums take.
int64_t SumUnits(const Geometry& g) { return (g.h * g.w + kSumPixels - 1) / kSumPixels; }

// ChannelSums of `count` <= kSumPixels pixels, eight doubles wide where the convolution kernel is
// AVX-512's (`lanes` = 16: FilterLanes), four where it is AVX2's (8).
void ChannelSums([[maybe_unused]] int64_t lanes, const float* image, int64_t channels,
                 int64_t stride, int64_t count, double* sums) {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  if (lanes >= 16) return ChannelSumsAvx512(image, channels, stride, count, sums);
  if (lanes >= 8) return ChannelSumsAvx2(image, channels, stride, count, sums);
#endif
  ChannelSumsWith(image, channels, stride, count, sums);
}

// The part of an image's ChannelSums [H, W] that output tile (ty, tx)'s patch covers: sum [P*P],
// zero outside the input, where the patch is zero in every channel.
void PatchSums(const Geometry& g, const double* sums, int64_t ty, int64_t tx, double* sum) {
  const int64_t p = g.patch, y0 = ty * g.tile - g.pad_top, x0 = tx * g.tile - g.pad_left;
  for (int64_t py = 0; py < p; ++py) {
    for (int64_t px = 0; px < p; ++px) {
      const int64_t iy = y0 + py, ix = x0 + px;
      const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
      sum[py * p + px] = inside ? sums[iy * g.w + ix] : 0.0;
    }
  }
}

// The non-zero entries of the hyperplanes [L, D], plane by plane: zero entries add exactly
// nothing to a projection, and a list skips them without a branch per entry.
struct SparsePlanes {
  std::vector<int64_t> start;  // [L + 1]: plane l is entries start[l] .. start[l + 1]
  std::vector<int64_t> index;  // position j of each entry
  std::vector<double> value;

  SparsePlanes(const float* planes, int64_t num_planes, int64_t dim) : start{0} {
    for (int64_t l = 0; l < num_planes; ++l) {
      for (int64_t j = 0; j < dim; ++j) {
        if (planes[l * dim + j] == 0.0f) continue;
        index.push_back(j);
        value.push_back(planes[l * dim + j]);
      }
      start.push_back(static_cast<int64_t>(index.size()));
    }
  }
  int64_t size() const { return static_cast<int64_t>(start.size()) - 1; }
};

// Hashes every channel of patch [C, D]: code bit l is dot(planes[l], v_c - mean_c v_c) > 0,
// computed as dot(planes[l], C v_c - sum_c v_c), C times the same projection (`sum` [D], the
// patch's part of ChannelSums): C v_c is exact in double, and so is the rest wherever the exact
// sums fit double's 53-bit significand (small integers, quantized values), where projections that
// are 0 in exact arithmetic then come out as exact zeros instead of rounding noise. Everything is
// in double and each dot product is summed over j in order, the sum over channels in order as
// numpy does, so the codes agree with the reference except for projections within double rounding
// of zero. Scratch: centered [D, kHashBlock].
// Projections are summed kDoubles lanes at a time; every lane does the same multiplications and
// additions (never fused) whatever the width, so the codes do not depend on it.
template <int kDoubles>
__attribute__((always_inline)) inline void HashPatchWith(const float* patch, int64_t channels,
                                                         int64_t dim, const SparsePlanes& planes,
                                                         const double* sum, double* centered,
                                                         uint64_t* codes) {
  typedef double Vec __attribute__((vector_size(kDoubles * sizeof(double)), may_alias, aligned(8)));
  typedef int64_t Bits __attribute__((vector_size(kDoubles * sizeof(int64_t))));
  typedef float Quad __attribute__((vector_size(4 * sizeof(float)), may_alias, aligned(4)));
  typedef int32_t Pick __attribute__((vector_size(4 * sizeof(int32_t))));
  typedef double Doubles4 __attribute__((vector_size(4 * sizeof(double)), may_alias, aligned(8)));
  const double scale = static_cast<double>(channels);
  // Then block of kHashBlock channels after block, so that the centered block stays in L1:
  // centered [D, kHashBlock] = C times the block's patch transposed, minus the sum (4 x 4 blocks of
  // channels x positions transposed in registers; the last block of positions overlaps the one
  // before it when 4 does not divide D and writes the same values again; leftover channels one by
  // one, spare lanes zero), then the block's codes.
  constexpr int64_t kVectors = kHashBlock / kDoubles;
  for (int64_t c0 = 0; c0 < channels; c0 += kHashBlock) {
    const int64_t count = std::min(kHashBlock, channels - c0);
    const float* block = patch + c0 * dim;
    int64_t c = 0;
    for (; dim >= 4 && c + 4 <= count; c += 4) {
      for (int64_t j0 = 0; j0 < dim; j0 += 4) {
        const int64_t j = std::min(j0, dim - 4);
        const Quad r0 = *reinterpret_cast<const Quad*>(block + c * dim + j);
        const Quad r1 = *reinterpret_cast<const Quad*>(block + (c + 1) * dim + j);
        const Quad r2 = *reinterpret_cast<const Quad*>(block + (c + 2) * dim + j);
        const Quad r3 = *reinterpret_cast<const Quad*>(block + (c + 3) * dim + j);
        const Quad t0 = __builtin_shuffle(r0, r1, Pick{0, 4, 1, 5});
        const Quad t1 = __builtin_shuffle(r0, r1, Pick{2, 6, 3, 7});
        const Quad t2 = __builtin_shuffle(r2, r3, Pick{0, 4, 1, 5});
        const Quad t3 = __builtin_shuffle(r2, r3, Pick{2, 6, 3, 7});
        const Quad column[4] = {__builtin_shuffle(t0, t2, Pick{0, 1, 4, 5}),
                                __builtin_shuffle(t0, t2, Pick{2, 3, 6, 7}),
                                __builtin_shuffle(t1, t3, Pick{0, 1, 4, 5}),
                                __builtin_shuffle(t1, t3, Pick{2, 3, 6, 7})};
        for (int k = 0; k < 4; ++k) {
          *reinterpret_cast<Doubles4*>(centered + (j + k) * kHashBlock + c) =
              __builtin_convertvector(column[k], Doubles4) * scale - sum[j + k];
        }
      }
    }
    for (; c < count; ++c) {
      for (int64_t j = 0; j < dim; ++j) {
        centered[j * kHashBlock + c] = block[c * dim + j] * scale - sum[j];
      }
    }
    for (int64_t j = 0; count < kHashBlock && j < dim; ++j) {
      std::fill(centered + j * kHashBlock + count, centered + (j + 1) * kHashBlock, 0.0);
    }
    // Bit l of each code is set in kDoubles-wide integer vectors: a comparison gives all ones.
    Bits bits[kVectors] = {};
    for (int64_t l = 0; l < planes.size(); ++l) {
      Vec dots[kVectors] = {};
      for (int64_t e = planes.start[l]; e < planes.start[l + 1]; ++e) {
        const double p = planes.value[e];
        const Vec* u = reinterpret_cast<const Vec*>(centered + planes.index[e] * kHashBlock);
        for (int64_t i = 0; i < kVectors; ++i) dots[i] += p * u[i];
      }
      for (int64_t i = 0; i < kVectors; ++i) bits[i] |= (dots[i] > 0.0) & (int64_t{1} << l);
    }
    for (int64_t i = 0; i < count; ++i) codes[c0 + i] = bits[i / kDoubles][i % kDoubles];
  }
}

#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
// AVX2 without FMA: four lanes, and no fused multiply-add can change a projection's rounding.
__attribute__((target("avx2"))) void HashPatchAvx2(const float* patch, int64_t channels,
                                                   int64_t dim, const SparsePlanes& planes,
                                                   const double* sum, double* centered,
                                                   uint64_t* codes) {
  HashPatchWith<4>(patch, channels, dim, planes, sum, centered, codes);
}

// AVX-512: eight lanes. AVX-512 has fused multiply-adds, and GCC's default (gnu++17) contracts
// a * b + c into them, which would change a projection's rounding: not here.
__attribute__((target("avx512f"), optimize("fp-contract=off"))) void HashPatchAvx512(
    const float* patch, int64_t channels, int64_t dim, const SparsePlanes& planes,
    const double* sum, double* centered, uint64_t* codes) {
  HashPatchWith<8>(patch, channels, dim, planes, sum, centered, codes);
}
#endif

// Hashes every channel of patch [C, D] (HashPatchWith), eight lanes wide where the convolution
// kernel is AVX-512's (`lanes` = 16: FilterLanes), four where it is AVX2's (8).
void HashPatch([[maybe_unused]] int64_t lanes, const float* patch, int64_t channels, int64_t dim,
               const SparsePlanes& planes, const double* sum, double* centered, uint64_t* codes) {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  if (lanes >= 16) return HashPatchAvx512(patch, channels, dim, planes, sum, centered, codes);
  if (lanes >= 8) return HashPatchAvx2(patch, channels, dim, planes, sum, centered, codes);
#endif
  HashPatchWith<2>(patch, channels, dim, planes, sum, centered, codes);
}

// One run's inputs and output, shared read-only by the work items (except `failed`).
struct Job;
struct ChunkBuckets;
struct WorkItem;
using ConvFn = void (*)(const Job& job, const ChunkBuckets& chunk, const WorkItem& item);

struct Job {
  Geometry g;
  PixelGroups split;
  bool compact;    // T = 3 and K = 3: ChunkBuckets::inputs holds P x P inputs (see ConvTile3With)
  const float* x;  // [N, C, H, W]
  const float* filters;  // packed W (PackedFilters::data)
  int64_t lanes;
  const float* bias;  // [M] or null
  const SparsePlanes* planes;
  bool relu;
  ConvFn conv;
  float* y;  // [N, M, Ho, Wo]
  std::atomic<bool> failed{false};
};

// The buckets of every tile of a chunk of tile rows, and their inputs laid out for the kernel.
// Rows are numbered over the batch, row = n * tiles_y + ty; tile t = row * tiles_x + tx counts
// from the chunk's first row.
struct ChunkBuckets {
  int64_t first_row = 0, rows = 0;
  int64_t first_image = 0;      // the image of the first row
  std::vector<double> sums;     // [images, H*W]: ChannelSums of the images the chunk's rows are in
  int64_t per_tile = 0;         // floats of `inputs` reserved for each tile
  std::vector<int32_t> order;   // [tiles, C]: channels, bucket after bucket
  std::vector<int32_t> starts;  // [tiles, C + 1]: bucket b of tile t is order[starts[b] ..]
  std::vector<int64_t> count;   // [tiles]: number of buckets
  // Per tile [groups, buckets, K*K, pixels]: the (merged) input each kernel tap reads for each
  // output pixel of the group, 0 for the padding pixels of the last group; with Job::compact
  // [buckets, P*P], each bucket's (merged) patch.
  std::vector<float> inputs;  // [tiles, per_tile]
};

// Rows [row_begin, row_end) of a chunk for filter blocks [block_begin, block_end).
struct WorkItem {
  int64_t row_begin, row_end, block_begin, block_end;
};

// How many buckets ahead the kernels prefetch filters.
constexpr int64_t kPrefetch = 2;

// Prefetches the filter (`stride` floats) of one channel in a filter block.
inline void PrefetchFilter(const float* filters, int64_t stride, int32_t channel) {
  const float* filter = filters + channel * stride;
  for (int64_t j = 0; j < stride; j += 64 / sizeof(float)) __builtin_prefetch(filter + j);
}

// Prefetches the filters (`stride` floats each, in one filter block) of the channels of bucket b:
// a tile's buckets read scattered filters of the block.
inline void PrefetchFilters(const float* filters, int64_t stride, const int32_t* order,
                            const int32_t* starts, int64_t b) {
  for (int32_t i = starts[b]; i < starts[b + 1]; ++i) PrefetchFilter(filters, stride, order[i]);
}

// Prefetches the filter block a thread reads next, a few cache lines per bucket, while the
// current one is in use: a block is read in bucket order, scattered over it, which the hardware
// prefetchers do not follow, and a layer's filters (9.4 MB for 512 x 512 x 3 x 3) do not stay in
// L2 from one work item to the next.
struct BlockAhead {
  const char* next = nullptr;  // the next cache line to prefetch
  int64_t lines = 0;           // how many are left
  int64_t per_bucket = 0;

  void Step() {
    for (int64_t i = 0; i < per_bucket && lines > 0; ++i, --lines, next += 64) {
      __builtin_prefetch(next);
    }
  }
};

// out [pixels, kLanes] = the reduced convolution of one tile's pixel group for the output
// channels of one filter block [C, K*K, kLanes]: summed over buckets and taps in registers. A
// bucket of several channels first sums their filters (into wsum [K*K, kLanes]); the merged
// filters are never stored for the tile. `in` holds, for each bucket, the input of every tap and
// pixel, [buckets, K*K, pixels]. (T = 3 with a 3x3 kernel has a kernel of its own, ConvTile3With.)
template <int kLanes, int kPixels>
__attribute__((always_inline)) inline void ConvGroup(const float* in, const int32_t* order,
                                                     const int32_t* starts, int64_t buckets,
                                                     const float* filters, int64_t taps,
                                                     float* wsum, float* out) {
  // Unaligned and allowed to alias float, like the compilers' own __m128_u and __m256_u.
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), may_alias, aligned(4)));
  const int64_t stride = taps * kLanes;
  Vec acc[kPixels] = {};
  for (int64_t b = 0; b < buckets; ++b) {
    if (b + kPrefetch < buckets) {
      PrefetchFilters(filters, stride, order, starts, b + kPrefetch);
      const float* next_in = in + (b + kPrefetch) * taps * kPixels;
      for (int64_t i = 0; i < taps * kPixels; i += 64 / sizeof(float))
        __builtin_prefetch(next_in + i);
    }
    const int32_t* channel = order + starts[b];
    const int64_t size = starts[b + 1] - starts[b];
    // A bucket of two or three channels sums its filters tap by tap in registers, a larger one
    // into wsum first.
    const float* w = filters + channel[0] * stride;
    const float* w1 = size > 1 ? filters + channel[1] * stride : w;
    const float* w2 = size > 2 ? filters + channel[2] * stride : w;
    if (size > 3) {  // channel after channel: the taps' sums are independent of each other
      Vec* sum = reinterpret_cast<Vec*>(wsum);
      for (int64_t t = 0; t < taps; ++t) sum[t] = reinterpret_cast<const Vec*>(w)[t];
      for (int64_t i = 1; i < size; ++i) {
        const Vec* more = reinterpret_cast<const Vec*>(filters + channel[i] * stride);
        for (int64_t t = 0; t < taps; ++t) sum[t] += more[t];
      }
      w = wsum;
    }
    const int64_t in_registers = size > 3 ? 1 : size;
    const float* v = in + b * taps * kPixels;
    for (int64_t t = 0; t < taps; ++t) {
      Vec wt = reinterpret_cast<const Vec*>(w)[t];
      if (in_registers > 1) wt += reinterpret_cast<const Vec*>(w1)[t];
      if (in_registers > 2) wt += reinterpret_cast<const Vec*>(w2)[t];
      for (int p = 0; p < kPixels; ++p) acc[p] += v[t * kPixels + p] * wt;
    }
  }
  for (int p = 0; p < kPixels; ++p) reinterpret_cast<Vec*>(out)[p] = acc[p];
}

// v = *value in every lane, and acc += a * b. With eight (sixteen) lanes, one AVX2 (AVX-512)
// instruction each, written out: the compiler then keeps every accumulator in its register
// instead of rotating registers between the FMA forms, and cannot merge broadcasts of one value
// into a long-lived register (it spills in both cases).
template <int kLanes, typename Vec>
__attribute__((always_inline)) inline void Splat(const float* value, Vec* v) {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  if constexpr (kLanes == 8) {
    asm("vbroadcastss %1, %0" : "=x"(*v) : "m"(*value));
    return;
  } else if constexpr (kLanes == 16) {
    asm("vbroadcastss %1, %0" : "=v"(*v) : "m"(*value));
    return;
  }
#endif
  for (int i = 0; i < kLanes; ++i) (*v)[i] = *value;
}

template <int kLanes, typename Vec>
__attribute__((always_inline)) inline void MultiplyAdd(Vec* acc, const Vec& a, const Vec& b) {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  if constexpr (kLanes == 8) {
    asm("vfmadd231ps %2, %1, %0" : "+x"(*acc) : "x"(a), "x"(b));
    return;
  } else if constexpr (kLanes == 16) {
    asm("vfmadd231ps %2, %1, %0" : "+v"(*acc) : "v"(a), "v"(b));
    return;
  }
#endif
  *acc += a * b;
}

// Calls f(std::integral_constant<int, 0>{}) ... f(std::integral_constant<int, kN - 1>{}): a loop
// whose index is a constant from the start. GCC keeps a local array in registers only if every
// index into it is a constant before its loops are unrolled (with `#pragma GCC unroll` it kept the
// tile's accumulators on the stack, loaded and stored for every bucket).
template <typename F, int... kI>
__attribute__((always_inline)) inline void UnrollWith(F& f, std::integer_sequence<int, kI...>) {
  (f(std::integral_constant<int, kI>{}), ...);
}

template <int kN, typename F>
__attribute__((always_inline)) inline void Unroll(F&& f) {
  UnrollWith(f, std::make_integer_sequence<int, kN>{});
}

// One bucket's share of a T = 3, K = 3 tile: acc [kChains, kRows * kCols] += the 3x3 convolution of
// its 5x5 (merged) input v with the sum of the filters [9, kLanes] of its `size` channels (kSize of
// them, or any number when kSize is 0), in one filter block [C, 9, kLanes]. Kernel row by kernel
// row: the row's three taps, summed over the channels, stay in registers while each input row
// they meet is broadcast once, element by element, into the FMAs of its outputs, so that every
// broadcast dies at once (9 accumulators, 3 taps and 1 broadcast fit in 16 registers). Summing
// the taps here, next to the FMAs of the kernel row before, lets the filter reads of a merged
// bucket overlap the arithmetic instead of going first in a loop of their own that waits on the
// cache (a filter block is larger than L1). The empty asm hides that the rows read for different
// kernel rows are the same memory: shared, the broadcasts would outlive the registers and spill.
// Kernel row ky adds into chain ky % kChains of each output (ConvTile3With), so that the kChains
// sums of an output wait on each other's multiply-adds less; each tap sums its channels in the
// bucket's order. Only kernel rows 0 .. kTapRows - 1 and columns 0 .. kTapCols - 1 are used: the
// others read only padding (ConvTile3For).
template <int kLanes, int kRows, int kCols, int kTapRows, int kTapCols, int kChains, int kSize,
          typename Reg>
__attribute__((always_inline)) inline void Tile3Bucket(const float* v, const float* filters,
                                                       const int32_t* channel, int32_t size,
                                                       Reg* acc) {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), may_alias, aligned(4)));
  constexpr int64_t kStride = 9 * kLanes;
  auto filter = [&](int32_t i) __attribute__((always_inline)) {
    return reinterpret_cast<const Vec*>(filters + channel[i] * kStride);
  };
  const Vec* w = filter(0);
  const Vec* w1 = filter(kSize == 2 ? 1 : 0);
  Unroll<kTapRows>([&](auto ky) __attribute__((always_inline)) {
    Reg wk[3];
    Unroll<kTapCols>([&](auto kx) __attribute__((always_inline)) {
      if constexpr (kSize == 2) {
        wk[kx] = w[ky * 3 + kx] + w1[ky * 3 + kx];
      } else {
        wk[kx] = w[ky * 3 + kx];
      }
    });
    for (int32_t i = 1; kSize == 0 && i < size; ++i) {
      const Vec* more = filter(i) + ky * 3;
      Unroll<kTapCols>([&](auto kx) __attribute__((always_inline)) {
        const Reg tap = more[kx];
        wk[kx] += tap;
      });
    }
    Unroll<kRows>([&](auto oy) __attribute__((always_inline)) {
      const float* row = v + (oy + ky) * 5;
      asm volatile("" : "+r"(row));
      // Input column j meets output column ox at tap j - ox.
      Unroll<kCols + kTapCols - 1>([&](auto j) __attribute__((always_inline)) {
        Reg in_j;
        Splat<kLanes>(row + j, &in_j);
        Unroll<3>([&](auto kx) __attribute__((always_inline)) {
          constexpr int tap = 2 - decltype(kx)::value;  // 2, 1, 0
          constexpr int ox = decltype(j)::value - tap;
          if constexpr (ox >= 0 && ox < kCols && tap < kTapCols) {
            constexpr int chain = std::remove_reference_t<decltype(ky)>::value % kChains;
            MultiplyAdd<kLanes>(&acc[chain * kRows * kCols + oy * kCols + ox], in_j, wk[tap]);
          }
        });
      });
    });
  });
}

// The kinds of buckets, by size, in the order the T = 3 kernel takes them (ConvTile3With): single
// channels, pairs, buckets of up to kSumInline channels, larger ones.
constexpr int kBucketKinds = 4;
constexpr int32_t kSumInline = 4;

inline int BucketKind(int32_t size) { return size <= 2 ? size - 1 : size <= kSumInline ? 2 : 3; }

// How many channels ahead SumLargeBuckets prefetches filters.
constexpr int32_t kSumAhead = 4;

// Tap k of the kTapRows x kTapCols used by a tile (Tile3Bucket), as a tap of the 3x3 kernel.
template <int kTapCols>
constexpr int UsedTap(int k) {
  return k / kTapCols * 3 + k % kTapCols;
}

// wsum [buckets - large, 9, kLanes] = the summed filters of each of a tile's buckets [large,
// buckets) in one filter block [C, 9, kLanes], whole filters at a time (their first kTaps taps:
// 6 for a tile that leaves out kernel row 2, Tile3Bucket; one that leaves out kernel column 2
// still reads all nine, whose gaps made the reads slower): kTaps independent sums run at the
// adders' throughput and read each filter in one stream. The filters are prefetched
// kSumAhead channels ahead, across buckets: these buckets hold up to hundreds of channels, and
// prefetching a whole bucket ahead asked for hundreds of cache lines at once (in kernel_loop with
// buckets of 64 channels, 2911 -> 1891 ns per tile). A function of its own, not inlined into the
// kernel: inlined, the prefetch cost the kernel's other loops 8-10 % on layers without such
// buckets.
template <int kLanes, int kTaps>
__attribute__((always_inline)) inline void SumLargeBucketsWith(const float* filters,
                                                               const int32_t* order,
                                                               const int32_t* starts, int64_t large,
                                                               int64_t buckets, float* wsum,
                                                               BlockAhead* ahead) {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), may_alias, aligned(4)));
  const Vec* w = reinterpret_cast<const Vec*>(filters);
  Vec* sums = reinterpret_cast<Vec*>(wsum);
  const int32_t end = starts[buckets];
  auto fetch = [&](int32_t i) __attribute__((always_inline)) {
    if (i >= end) return;
    const float* filter = filters + order[i] * 9 * kLanes;
    for (int j = 0; j < kTaps * kLanes; j += 64 / sizeof(float)) __builtin_prefetch(filter + j);
  };
  for (int32_t i = starts[large]; i < starts[large] + kSumAhead; ++i) fetch(i);
  for (int64_t b = large; b < buckets; ++b) {
    ahead->Step();
    Vec sum[kTaps];
    fetch(starts[b] + kSumAhead);
    for (int t = 0; t < kTaps; ++t) sum[t] = w[order[starts[b]] * 9 + t];
    for (int32_t i = starts[b] + 1; i < starts[b + 1]; ++i) {
      fetch(i + kSumAhead);
      for (int t = 0; t < kTaps; ++t) sum[t] += w[order[i] * 9 + t];
    }
    for (int t = 0; t < kTaps; ++t) sums[(b - large) * 9 + t] = sum[t];
  }
}

template <int kTaps>
__attribute__((noinline)) void SumLargeBucketsPortable(const float* filters, const int32_t* order,
                                                       const int32_t* starts, int64_t large,
                                                       int64_t buckets, float* wsum,
                                                       BlockAhead* ahead) {
  SumLargeBucketsWith<4, kTaps>(filters, order, starts, large, buckets, wsum, ahead);
}

#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
template <int kTaps>
__attribute__((target("avx2,fma"), noinline)) void SumLargeBucketsAvx2(
    const float* filters, const int32_t* order, const int32_t* starts, int64_t large,
    int64_t buckets, float* wsum, BlockAhead* ahead) {
  SumLargeBucketsWith<8, kTaps>(filters, order, starts, large, buckets, wsum, ahead);
}

template <int kTaps>
__attribute__((target("avx512f"), noinline)) void SumLargeBucketsAvx512(
    const float* filters, const int32_t* order, const int32_t* starts, int64_t large,
    int64_t buckets, float* wsum, BlockAhead* ahead) {
  SumLargeBucketsWith<16, kTaps>(filters, order, starts, large, buckets, wsum, ahead);
}
#endif

// The instance of SumLargeBucketsWith for kLanes-wide filter blocks (as Tile3, for the kernel).
template <int kLanes, int kTaps>
constexpr auto SumLargeBuckets() {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  if constexpr (kLanes == 16) return SumLargeBucketsAvx512<kTaps>;
  if constexpr (kLanes == 8) return SumLargeBucketsAvx2<kTaps>;
#endif
  return SumLargeBucketsPortable<kTaps>;
}

// out [kRows * kCols, kLanes] = the reduced convolution of one T = 3, K = 3 tile (its kRows x
// kCols outputs inside Y) for the output channels of one filter block [C, 9, kLanes], plus bias
// [kLanes], then Relu if `relu`. `in` holds each bucket's 5x5 (merged) patch, [buckets, 25] in
// the buckets' order, so that the kernel reads it front to back. Buckets come kind after kind
// (BucketKind, HashTile orders them so), each kind with a loop of its own. Single channels, pairs
// and buckets of up to kSumInline channels sum their filters kernel row by kernel row in
// Tile3Bucket. The filters of larger buckets are summed before anything else (SumLargeBuckets),
// where three sums per kernel row would wait on each other and read every filter three times
// over (ResNet-18's 512 x 2x2 layers, with buckets of hundreds of channels, were 15-20 % slower
// that way). Each output is summed in up to three chains of multiply-adds, by kernel row, as many
// as the registers hold beside the taps and a broadcast (16 with AVX2 or SSE, 32 with AVX-512),
// then the chains are added: one chain made every multiply-add of an output wait on the one before
// (4-5 % of the time on the layers measured; docs/speed.md).
template <int kLanes, int kRows, int kCols, int kTapRows, int kTapCols>
__attribute__((always_inline)) inline void ConvTile3With(const float* in, const int32_t* order,
                                                         const int32_t* starts, int64_t buckets,
                                                         const float* filters, float* wsum,
                                                         const float* bias, bool relu, float* out,
                                                         BlockAhead ahead) {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), may_alias, aligned(4)));
  constexpr int64_t kStride = 9 * kLanes;
  int64_t large = buckets;  // the first larger bucket
  while (large > 0 && starts[large] - starts[large - 1] > kSumInline) --large;
  if (large < buckets) {
    SumLargeBuckets<kLanes, kTapRows * 3>()(filters, order, starts, large, buckets, wsum, &ahead);
  }
  // Accumulators in registers: a type without may_alias, indexed by constants only (Unroll).
  typedef float Reg __attribute__((vector_size(kLanes * sizeof(float))));
  constexpr int kOutputs = kRows * kCols;
  constexpr int kRegisters = kLanes == 16 ? 24 : 9;  // for accumulators; 27 spilled
  constexpr int kChains = std::max(1, std::min(3, kRegisters / kOutputs));
  Reg acc[kChains * kOutputs];
  Unroll<kChains * kOutputs>([&](auto p) __attribute__((always_inline)) { acc[p] = Reg{}; });
  int64_t b = 0;
  auto loop = [&](auto size, int64_t end) __attribute__((always_inline)) {
    // the buckets of `size` channels (any number up to kSumInline if 0) before `end`
    for (; b < end && (size == 0 || starts[b + 1] - starts[b] == size); ++b) {
      if (b + kPrefetch < end) {
        if constexpr (kTapRows * kTapCols == 9) {
          PrefetchFilters(filters, kStride, order, starts, b + kPrefetch);
        } else {  // only the taps used
          for (int32_t i = starts[b + kPrefetch]; i < starts[b + kPrefetch + 1]; ++i) {
            Unroll<kTapRows * kTapCols>([&](auto k) __attribute__((always_inline)) {
              __builtin_prefetch(filters + order[i] * kStride + UsedTap<kTapCols>(k) * kLanes);
            });
          }
        }
      }
      ahead.Step();
      const int32_t* channel = order + starts[b];
      Tile3Bucket<kLanes, kRows, kCols, kTapRows, kTapCols, kChains, decltype(size)::value>(
          in + b * 25, filters, channel, starts[b + 1] - starts[b], acc);
    }
  };
  loop(std::integral_constant<int, 1>{}, large);
  loop(std::integral_constant<int, 2>{}, large);
  loop(std::integral_constant<int, 0>{}, large);
  static constexpr int32_t kFirst[1] = {0};  // a larger bucket's summed filters, as one channel
  for (; b < buckets; ++b) {
    Tile3Bucket<kLanes, kRows, kCols, kTapRows, kTapCols, kChains, 1>(
        in + b * 25, wsum + (b - large) * kStride, kFirst, 1, acc);
  }
  const Reg shift = *reinterpret_cast<const Vec*>(bias);
  Unroll<kOutputs>([&](auto p) __attribute__((always_inline)) {
    Reg sum = acc[p];
    Unroll<kChains - 1>([&](auto i) __attribute__((always_inline)) {
      sum += acc[(decltype(i)::value + 1) * kOutputs + p];
    });
    const Reg v = sum + shift;
    reinterpret_cast<Vec*>(out)[p] = relu ? (v < 0.0f ? Reg{} : v) : v;  // NaN stays NaN
  });
}

// ConvTile3With as a function of its own (not inlined into the loops over tiles and filter
// blocks, whose variables would compete for its registers), one per shape of the tile's valid
// outputs, kRows x kCols (1-3 each): tiles cut by the edge of Y (28 = 9 * 3 + 1) compute no
// padded outputs.
using ConvTile3Fn = void (*)(const float* in, const int32_t* order, const int32_t* starts,
                             int64_t buckets, const float* filters, float* wsum, const float* bias,
                             bool relu, float* out, BlockAhead ahead);

template <int kRows, int kCols, int kTapRows, int kTapCols>
__attribute__((noinline)) void ConvTile3Portable(const float* in, const int32_t* order,
                                                 const int32_t* starts, int64_t buckets,
                                                 const float* filters, float* wsum,
                                                 const float* bias, bool relu, float* out,
                                                 BlockAhead ahead) {
  ConvTile3With<4, kRows, kCols, kTapRows, kTapCols>(in, order, starts, buckets, filters, wsum,
                                                     bias, relu, out, ahead);
}

#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
template <int kRows, int kCols, int kTapRows, int kTapCols>
__attribute__((target("avx2,fma"), noinline)) void ConvTile3Avx2(
    const float* in, const int32_t* order, const int32_t* starts, int64_t buckets,
    const float* filters, float* wsum, const float* bias, bool relu, float* out, BlockAhead ahead) {
  ConvTile3With<8, kRows, kCols, kTapRows, kTapCols>(in, order, starts, buckets, filters, wsum,
                                                     bias, relu, out, ahead);
}

template <int kRows, int kCols, int kTapRows, int kTapCols>
__attribute__((target("avx512f"), noinline)) void ConvTile3Avx512(
    const float* in, const int32_t* order, const int32_t* starts, int64_t buckets,
    const float* filters, float* wsum, const float* bias, bool relu, float* out, BlockAhead ahead) {
  ConvTile3With<16, kRows, kCols, kTapRows, kTapCols>(in, order, starts, buckets, filters, wsum,
                                                      bias, relu, out, ahead);
}
#endif

// The instance of the kernel for kLanes-wide filter blocks.
template <int kLanes, int kRows, int kCols, int kTapRows = 3, int kTapCols = 3>
constexpr ConvTile3Fn Tile3() {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  if constexpr (kLanes == 16) return ConvTile3Avx512<kRows, kCols, kTapRows, kTapCols>;
  if constexpr (kLanes == 8) return ConvTile3Avx2<kRows, kCols, kTapRows, kTapCols>;
#endif
  return ConvTile3Portable<kRows, kCols, kTapRows, kTapCols>;
}

// The kernel for a kLanes-wide filter block and `rows` x `cols` valid outputs (1-3 each). A tile
// of one row (rows = 1) whose kernel row 2 reads only the padding below X (`below`: the last row
// of tiles of a map whose height is 1 more than a multiple of 3, with one row of padding) leaves
// that kernel row out; so does a tile of one column (cols = 1) with kernel column 2 (`beside`).
// Those taps would multiply zeros: every output is the same, but for a filter with an infinity or
// a NaN, which would make NaN with them.
template <int kLanes>
ConvTile3Fn ConvTile3For(int64_t rows, int64_t cols, bool below, bool beside) {
  static constexpr ConvTile3Fn table[9] = {
      Tile3<kLanes, 1, 1>(), Tile3<kLanes, 1, 2>(), Tile3<kLanes, 1, 3>(),
      Tile3<kLanes, 2, 1>(), Tile3<kLanes, 2, 2>(), Tile3<kLanes, 2, 3>(),
      Tile3<kLanes, 3, 1>(), Tile3<kLanes, 3, 2>(), Tile3<kLanes, 3, 3>()};
  if (below && beside) return Tile3<kLanes, 1, 1, 2, 2>();
  if (below) {
    static constexpr ConvTile3Fn row[3] = {Tile3<kLanes, 1, 1, 2, 3>(), Tile3<kLanes, 1, 2, 2, 3>(),
                                           Tile3<kLanes, 1, 3, 2, 3>()};
    return row[cols - 1];
  }
  if (beside) {
    static constexpr ConvTile3Fn column[3] = {
        Tile3<kLanes, 1, 1, 3, 2>(), Tile3<kLanes, 2, 1, 3, 2>(), Tile3<kLanes, 3, 1, 3, 2>()};
    return column[rows - 1];
  }
  return table[(rows - 1) * 3 + cols - 1];
}

// Convolves the rows of one work item, filter block after filter block (so that a block is read
// once for all of the item's tiles, whose inputs stay in cache), and writes Y with bias and Relu.
template <int kLanes, int kPixels, int kTile>
__attribute__((always_inline)) inline void ConvWith(const Job& job, const ChunkBuckets& chunk,
                                                    const WorkItem& item) {
  const Geometry& g = job.g;
  const int64_t taps = g.k * g.k, groups = job.split.groups, tile = g.tile;
  float out[kPixels * kLanes];
  // Summed filters: one bucket's [K*K, kLanes] (ConvGroup), or with T = 3 those of a tile's
  // larger buckets, [C / (kSumInline + 1), 9, kLanes].
  thread_local AlignedVector<float> wsum;
  wsum.resize(std::max(taps, (g.c / (kSumInline + 1) + 1) * 9) * kLanes);
  float* sum = wsum.data();
  Laps laps;
  const int64_t blocks = (g.m + kLanes - 1) / kLanes, block_floats = g.c * taps * kLanes;
  const int64_t block_lines = (block_floats * int64_t{sizeof(float)} + 63) / 64;
  // The item's outputs: each tile prefetches a share of the next block in proportion to its own,
  // which its time follows (a tile cut by the edge of Y is quicker, and would otherwise fetch as
  // many lines in less time).
  int64_t item_outputs = 0;
  for (int64_t row = item.row_begin; row < item.row_end; ++row) {
    const int64_t ty = (chunk.first_row + row) % g.tiles_y;
    item_outputs += std::min(tile, g.out_h - ty * tile) * g.out_w;
  }
  for (int64_t block = item.block_begin; block < item.block_end; ++block) {
    const int64_t m0 = block * kLanes;
    const float* filters = job.filters + block * block_floats;
    // The next block, in a slice for each tile of the item: the item's next block, or the first
    // of the item that follows (items go row group after row group, block range after range).
    const char* next =
        reinterpret_cast<const char*>(job.filters + (block + 1) % blocks * block_floats);
    const int64_t lanes = std::min<int64_t>(kLanes, g.m - m0);
    float bias[kLanes] = {};
    if (job.bias) std::copy(job.bias + m0, job.bias + m0 + lanes, bias);
    int64_t outputs_before = 0;  // those of the item's rows before this one
    for (int64_t row = item.row_begin; row < item.row_end; ++row) {
      const int64_t n = (chunk.first_row + row) / g.tiles_y,
                    ty = (chunk.first_row + row) % g.tiles_y;
      const int64_t y0 = ty * tile, rows = std::min(tile, g.out_h - y0);
      for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
        const int64_t t = row * g.tiles_x + tx;
        const int64_t x0 = tx * tile, cols = std::min(tile, g.out_w - x0);
        const int64_t buckets = chunk.count[t];
        const int32_t* order = chunk.order.data() + t * g.c;
        const int32_t* starts = chunk.starts.data() + t * (g.c + 1);
        for (int64_t group = 0; group < groups; ++group) {
          const float* in =
              chunk.inputs.data() + t * chunk.per_tile + group * buckets * taps * kPixels;
          if constexpr (kTile == 3) {
            // This tile's slice of the next block, a few lines per bucket.
            const int64_t before = outputs_before + rows * x0;
            const int64_t first = block_lines * before / item_outputs;
            BlockAhead ahead{next + first * 64,
                             block_lines * (before + rows * cols) / item_outputs - first, 0};
            ahead.per_bucket = (ahead.lines + buckets - 1) / std::max<int64_t>(buckets, 1);
            // Only the rows x cols outputs inside Y, packed in `out` row after row.
            const bool below = rows == 1 && y0 + 2 - g.pad_top >= g.h,
                       beside = cols == 1 && x0 + 2 - g.pad_left >= g.w;
            ConvTile3For<kLanes>(rows, cols, below, beside)(in, order, starts, buckets, filters,
                                                            sum, bias, job.relu, out, ahead);
            const bool full = rows * cols == 9;
            laps.To(full ? kConvFull : kConvEdge);
            Tally(full ? kFullTiles : kEdgeTiles, 1);
            if (full) {
              Tally(kFullBuckets, buckets);
              Tally(kFullMerged, g.c - buckets);
            } else {
              Tally(kEdgeFmas, buckets * rows * cols * (below ? 2 : 3) * (beside ? 2 : 3));
            }
            // Channel by channel, so that each output row's few floats are stored together.
            for (int64_t l = 0; l < lanes; ++l) {
              float* dst = job.y + ((n * g.m + m0 + l) * g.out_h + y0) * g.out_w + x0;
              for (int64_t oy = 0; oy < rows; ++oy, dst += g.out_w) {
                for (int64_t ox = 0; ox < cols; ++ox) dst[ox] = out[(oy * cols + ox) * kLanes + l];
              }
            }
            laps.To(kStore);
            continue;
          } else {
            ConvGroup<kLanes, kPixels>(in, order, starts, buckets, filters, taps, sum, out);
          }
          for (int64_t p = 0; p < kPixels; ++p) {
            const int64_t pixel = group * kPixels + p, oy = pixel / g.span_x, ox = pixel % g.span_x;
            if (oy >= rows || ox >= cols) continue;  // padding, or outside Y at the edges
            float* dst = job.y + ((n * g.m + m0) * g.out_h + y0 + oy) * g.out_w + x0 + ox;
            for (int64_t l = 0; l < lanes; ++l) {
              const float v = out[p * kLanes + l] + bias[l];
              dst[l * g.out_h * g.out_w] = job.relu ? std::max(v, 0.0f) : v;
            }
          }
        }
      }
      outputs_before += rows * g.out_w;
    }
  }
}

// ConvWith for the pixel group size of the run.
template <int kLanes, int kPixels = kMaxPixels>
__attribute__((always_inline)) inline void ConvAny(const Job& job, const ChunkBuckets& chunk,
                                                   const WorkItem& item) {
  if constexpr (kPixels == kMaxPixels) {
    if (job.compact) return ConvWith<kLanes, 9, 3>(job, chunk, item);
  }
  if constexpr (kPixels > 1) {
    if (job.split.pixels < kPixels) return ConvAny<kLanes, kPixels - 1>(job, chunk, item);
  }
  ConvWith<kLanes, kPixels, 0>(job, chunk, item);
}

#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
__attribute__((target("avx2,fma"))) void ConvAvx2(const Job& job, const ChunkBuckets& chunk,
                                                  const WorkItem& item) {
  ConvAny<8>(job, chunk, item);
}

__attribute__((target("avx512f"))) void ConvAvx512(const Job& job, const ChunkBuckets& chunk,
                                                   const WorkItem& item) {
  ConvAny<16>(job, chunk, item);
}
#endif

void ConvPortable(const Job& job, const ChunkBuckets& chunk, const WorkItem& item) {
  ConvAny<4>(job, chunk, item);
}

// The kernel for filters packed `lanes` wide: sixteen lanes on x86-64 CPUs with AVX-512, eight
// with AVX2 and FMA, else the portable four.
ConvFn ConvFor(int64_t lanes) {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  if (lanes == 16) return ConvAvx512;
  if (lanes == 8) return ConvAvx2;
#endif
  return lanes == 4 ? ConvPortable : nullptr;
}

// Groups channels by equal codes: bucket[c] for each of the C channels, buckets numbered in the
// order of their first channel; size[b] channels each. Returns the number of buckets. `slots` is
// an open-addressing table of 2^k >= 2C (code, bucket) slots, emptied here.
int64_t GroupCodes(const uint64_t* codes, int64_t channels,
                   std::vector<std::pair<uint64_t, int32_t>>& slots, int32_t* bucket,
                   int32_t* size) {
  int shift = 64;
  while ((int64_t{1} << (64 - shift)) < 2 * channels) --shift;
  const uint64_t mask = (uint64_t{1} << (64 - shift)) - 1;
  slots.assign(mask + 1, {0, -1});
  int32_t buckets = 0;
  for (int64_t c = 0; c < channels; ++c) {
    uint64_t i = (codes[c] * 0x9E3779B97F4A7C15ull) >> shift;  // Fibonacci hashing
    while (slots[i].second >= 0 && slots[i].first != codes[c]) i = (i + 1) & mask;
    if (slots[i].second < 0) {
      slots[i] = {codes[c], buckets};
      size[buckets++] = 0;
    }
    bucket[c] = slots[i].second;
    ++size[bucket[c]];
  }
  return buckets;
}

// merged [D] = the mean of the patches [C, D] of `size` channels; D = kDim, or dim when kDim is 0.
// merged may be the first channel's patch. Each patch is scaled before it is added, so that the
// sum stays within float32's range wherever the mean does (values near FLT_MAX).
template <int64_t kDim>
void MeanOfPatches(const float* patch, const int32_t* channel, int64_t size, float* merged,
                   int64_t dim = kDim) {
  if constexpr (kDim > 0) dim = kDim;
  const float scale = 1.0f / static_cast<float>(size);
  const float* first = patch + channel[0] * dim;
  float sum[kDim > 0 ? kDim : 1];
  float* acc = kDim > 0 ? sum : merged;
  for (int64_t j = 0; j < dim; ++j) acc[j] = first[j] * scale;
  for (int64_t i = 1; i < size; ++i) {
    const float* more = patch + channel[i] * dim;
    for (int64_t j = 0; j < dim; ++j) acc[j] += more[j] * scale;
  }
  if constexpr (kDim > 0) std::memcpy(merged, sum, sizeof(sum));  // a fixed size: inlined
}

// Scratch of one thread, reused by its tiles so that they do not allocate.
struct TileScratch {
  std::vector<float> patch, merged;
  std::vector<double> sum;
  AlignedVector<double> centered;  // whole cache lines: HashPatch reads it in 64-byte vectors
  std::vector<uint64_t> codes;
  std::vector<std::pair<uint64_t, int32_t>> slots;  // GroupCodes' table
  std::vector<int32_t> bucket, size, rank;          // per channel, per bucket, per bucket
  std::vector<int64_t> gather;  // [groups, K*K, pixels]: patch offset, or -1 for padding
};

// Hashes and buckets tile t of a chunk of output tiles, and lays out its buckets' inputs. Tiles
// write disjoint parts of the chunk.
void HashTile(const Job& job, ChunkBuckets& chunk, int64_t t) {
  const Geometry& g = job.g;
  const int64_t row = chunk.first_row + t / g.tiles_x, tx = t % g.tiles_x;
  const int64_t n = row / g.tiles_y, ty = row % g.tiles_y;
  const int64_t p2 = g.patch * g.patch, taps = g.k * g.k;
  const int64_t groups = job.split.groups, pixels = job.split.pixels;
  thread_local TileScratch s;
  s.patch.resize(g.c * p2);
  s.merged.resize(p2);
  s.sum.resize(p2);
  s.centered.resize(p2 * kHashBlock);
  s.codes.resize(g.c);
  s.bucket.resize(g.c);
  s.size.resize(g.c);
  s.rank.resize(g.c + 1);
  if (!job.compact) {
    s.gather.resize(groups * taps * pixels);
    for (int64_t group = 0; group < groups; ++group) {
      for (int64_t k = 0; k < taps; ++k) {
        for (int64_t p = 0; p < pixels; ++p) {
          const int64_t pixel = group * pixels + p;
          s.gather[(group * taps + k) * pixels + p] =
              pixel < g.span_y * g.span_x
                  ? (pixel / g.span_x + k / g.k) * g.patch + pixel % g.span_x + k % g.k
                  : -1;
        }
      }
    }
  }
  Laps laps;
  float* inputs = chunk.inputs.data() + t * chunk.per_tile;
  float* patch = s.patch.data();
  FillPatch(g, job.x + n * g.c * g.h * g.w, ty, tx, patch);
  PatchSums(g, chunk.sums.data() + (n - chunk.first_image) * g.h * g.w, ty, tx, s.sum.data());
  laps.To(kPatch);
  HashPatch(job.lanes, patch, g.c, p2, *job.planes, s.sum.data(), s.centered.data(),
            s.codes.data());
  laps.To(kHash);
  const int64_t buckets = GroupCodes(s.codes.data(), g.c, s.slots, s.bucket.data(), s.size.data());
  chunk.count[t] = buckets;

  // Buckets come kind after kind (BucketKind: the kernel has a loop for each), each kind in
  // the order of its first channel, so that the kernel walks the filters forwards; channels
  // stay in ascending order in each bucket.
  int32_t* order = chunk.order.data() + t * g.c;
  int32_t* starts = chunk.starts.data() + t * (g.c + 1);
  int32_t next[kBucketKinds] = {};
  for (int64_t b = 0; b < buckets; ++b) ++next[BucketKind(s.size[b])];
  for (int64_t kind = kBucketKinds - 1, total = buckets; kind >= 0; --kind) {
    next[kind] = static_cast<int32_t>(total -= next[kind]);  // where the kind starts
  }
  starts[0] = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    s.rank[b] = next[BucketKind(s.size[b])]++;
    starts[s.rank[b] + 1] = s.size[b];
  }
  for (int64_t b = 0; b < buckets; ++b) starts[b + 1] += starts[b];
  for (int64_t b = 0; b < buckets; ++b) s.rank[b] = starts[s.rank[b]];  // where it fills from
  for (int64_t c = 0; c < g.c; ++c) order[s.rank[s.bucket[c]]++] = static_cast<int32_t>(c);
  laps.To(kGroup);

  for (int64_t b = 0; b < buckets; ++b) {
    const int64_t size = starts[b + 1] - starts[b];
    float* in = patch + order[starts[b]] * p2;
    if (job.compact) {  // bucket after bucket, in the kernel's order
      if (size > 1) {
        MeanOfPatches<25>(patch, order + starts[b], size, inputs + b * 25);
      } else {
        std::memcpy(inputs + b * 25, in, 25 * sizeof(float));  // a fixed size: inlined
      }
      continue;
    }
    if (size > 1) {
      MeanOfPatches<0>(patch, order + starts[b], size, s.merged.data(), p2);
      in = s.merged.data();
    }
    for (int64_t group = 0; group < groups; ++group) {
      float* dst = inputs + (group * buckets + b) * taps * pixels;
      const int64_t* gather = s.gather.data() + group * taps * pixels;
      for (int64_t j = 0; j < taps * pixels; ++j) dst[j] = gather[j] >= 0 ? in[gather[j]] : 0.0f;
    }
  }
  laps.To(kMeans);
}

// Inputs of at most this many floats are laid out at once (a chunk of tile rows, at least one).
constexpr int64_t kChunkFloats = int64_t{1} << 21;
// A work item covers the filter blocks of at most this many output channels, so that work items
// can be shared between threads even when a layer has few groups (with items of 128 channels, one
// group of four rows and one of two were two items: one thread did two thirds).
constexpr int64_t kItemChannels = 32;

// A work item's tile inputs stay under this many floats, so that they stay in L2 beside a filter
// block and the next while the blocks go by: 3/8 of the L2 cache, 48 K floats on the 512 KB of a
// Zen 3 core (where 48 K was measured best) and 96 K on a Zen 5's 1 MB (512 x 7x7 then takes its
// three rows of tiles in one group: 6 % faster than with 48 K); 48 K where the size is unknown.
int64_t GroupFloats() {
  static const int64_t floats = [] {
    long l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 > 0 ? std::clamp<int64_t>(l2 / 8 * 3 / int64_t{sizeof(float)}, 16 << 10, 256 << 10)
                  : int64_t{48} << 10;
  }();
  return floats;
}

// Work items of a chunk: groups of consecutive rows whose inputs fit in GroupFloats(), times
// ranges of filter blocks (of kItemChannels output channels).
void MakeItems(const Job& job, const ChunkBuckets& chunk, int64_t per_bucket,
               std::vector<WorkItem>& items) {
  const Geometry& g = job.g;
  const int64_t blocks = (g.m + job.lanes - 1) / job.lanes;
  const int64_t item_blocks = std::max<int64_t>(1, kItemChannels / job.lanes);
  const int64_t splits = (blocks + item_blocks - 1) / item_blocks, group_floats = GroupFloats();
  items.clear();
  for (int64_t begin = 0, end; begin < chunk.rows; begin = end) {
    int64_t floats = 0;
    for (end = begin; end < chunk.rows; ++end) {
      int64_t row_used = 0;
      for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
        row_used += chunk.count[end * g.tiles_x + tx] * per_bucket;
      }
      if (end > begin && floats + row_used > group_floats) break;
      floats += row_used;
    }
    for (int64_t split = 0; split < splits; ++split) {
      items.push_back({begin, end, blocks * split / splits, blocks * (split + 1) / splits});
    }
  }
}

// The CPUs this process may run on (its affinity mask, which a container's cpuset limits), at
// least 1.
int UsableCpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// Units of work [0, count) in contiguous ranges, one per thread expected (one per usable CPU, at
// most kMaxShards), each with its own counter: a thread takes units from its own range first, as
// onnxruntime's thread pool hands out loop indices, so that the tiles a thread hashes are mostly
// those it convolves next, still in its own L2 cache. Then it takes from the others, even threads
// walking down the ranges and odd ones up, so that two threads left with ranges to share (a pool of
// two threads on a larger machine) meet in one range instead of taking turns in every one.
struct Shards {
  static constexpr int kMaxShards = 64;
  int64_t count = 0;
  int shards = 1;
  std::atomic<int64_t> next[kMaxShards];

  void Reset(int64_t units) {
    static const int expected = std::min(UsableCpus(), kMaxShards);
    count = units;
    shards = static_cast<int>(std::clamp<int64_t>(units, 1, expected));
    for (int s = 0; s < shards; ++s) next[s].store(Begin(s), std::memory_order_relaxed);
  }
  int64_t Begin(int shard) const { return count * shard / shards; }
  // A unit for the thread that arrived `arrival`-th, or -1 when every unit is taken.
  int64_t Take(int arrival) {
    const int home = arrival % shards, step = arrival % 2 ? 1 : shards - 1;
    for (int i = 0, shard = home; i < shards; ++i, shard = (shard + step) % shards) {
      const int64_t unit = next[shard].fetch_add(1, std::memory_order_relaxed);
      if (unit < Begin(shard + 1)) return unit;
    }
    return -1;
  }
};

// Spins, then yields, until `done()`: for work that other threads have taken and are finishing.
template <typename Done>
void Await(Done done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < 4096) {
      Pause();
    } else {
      std::this_thread::yield();  // the thread finishing the work is not running
    }
  }
}

// One chunk's work, shared by the threads of one parallel section: the threads sum the chunk's
// images over their channels (ChannelSums, kSumPixels pixels at a time), then, once every pixel is
// summed, hash tiles until none is left, then, once every tile is hashed (the thread that hashes
// the last one makes the work items meanwhile), convolve work items until none is left. One section
// instead of one for each step: a thread pool whose workers sleep between sections (no spinning)
// wakes them once per chunk. A thread waits only for work other threads have taken and are doing,
// so the section finishes however many threads run it, one included. A std::bad_alloc fails the
// job (exceptions must not reach the thread pool), and its tile still counts as done.
struct ChunkWork {
  Job& job;
  ChunkBuckets& chunk;
  std::vector<WorkItem>& items;
  int64_t per_bucket;
  std::atomic<int> arrivals{0};
  std::atomic<int64_t> sums_done{0}, tiles_done{0};
  std::atomic<bool> items_ready{false};
  Shards sum_shards{}, tile_shards{}, item_shards{};

  void Run() {
    const int arrival = arrivals.fetch_add(1, std::memory_order_relaxed);
    const Geometry& g = job.g;
    const int64_t pixels = g.h * g.w, per_image = SumUnits(g);
    for (int64_t u; (u = sum_shards.Take(arrival)) >= 0;) {
      Laps laps;
      const int64_t image = u / per_image, p = u % per_image * kSumPixels;
      ChannelSums(job.lanes, job.x + (chunk.first_image + image) * g.c * pixels + p, g.c, pixels,
                  std::min(kSumPixels, pixels - p), chunk.sums.data() + image * pixels + p);
      laps.To(kPatch);
      sums_done.fetch_add(1, std::memory_order_acq_rel);
    }
    Await([&] { return sums_done.load(std::memory_order_acquire) == sum_shards.count; });
    for (int64_t t; (t = tile_shards.Take(arrival)) >= 0;) {
      try {
        HashTile(job, chunk, t);
      } catch (...) {
        job.failed = true;
      }
      if (tiles_done.fetch_add(1, std::memory_order_acq_rel) + 1 == tile_shards.count) {
        try {
          MakeItems(job, chunk, per_bucket, items);
        } catch (...) {
          job.failed = true;
        }
        item_shards.Reset(static_cast<int64_t>(items.size()));
        items_ready.store(true, std::memory_order_release);
      }
    }
    Await([&] { return items_ready.load(std::memory_order_acquire); });
    if (job.failed) return;
    for (int64_t i; (i = item_shards.Take(arrival)) >= 0;) {
      try {
        job.conv(job, chunk, items[i]);
      } catch (...) {
        job.failed = true;
      }
    }
  }
};

// Hashes and convolves every tile of the batch, chunk of tile rows after chunk: first every tile
// of the chunk is hashed and bucketed, then the chunk is convolved in work items of a few rows and
// filter blocks (ChunkWork).
void RunJob(const Ort::KernelContext& context, Job& job) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = kProfile ? Clock::now() : Clock::time_point{};
  Laps laps;
  const Geometry& g = job.g;
  const int64_t per_bucket =
      job.compact ? g.patch * g.patch : job.split.groups * g.k * g.k * job.split.pixels;
  // Kept by the calling thread from run to run: allocating (and page-faulting) megabytes on every
  // run costs more than small layers take. One thread runs one job at a time.
  thread_local ChunkBuckets chunk;
  chunk.per_tile = g.c * per_bucket;
  const int64_t total_rows = g.n * g.tiles_y, row_floats = g.tiles_x * chunk.per_tile;
  const int64_t chunk_rows = std::clamp<int64_t>(kChunkFloats / row_floats, 1, total_rows);
  const int64_t tiles = chunk_rows * g.tiles_x;
  chunk.order.resize(tiles * g.c);
  chunk.starts.resize(tiles * (g.c + 1));
  chunk.count.resize(tiles);
  chunk.inputs.resize(tiles * chunk.per_tile);
  std::vector<WorkItem> items;
  for (chunk.first_row = 0; chunk.first_row < total_rows; chunk.first_row += chunk.rows) {
    chunk.rows = std::min(chunk_rows, total_rows - chunk.first_row);
    chunk.first_image = chunk.first_row / g.tiles_y;
    const int64_t images = (chunk.first_row + chunk.rows - 1) / g.tiles_y + 1 - chunk.first_image;
    chunk.sums.resize(images * g.h * g.w);
    ChunkWork work{job, chunk, items, per_bucket};
    work.sum_shards.Reset(images * SumUnits(g));
    work.tile_shards.Reset(chunk.rows * g.tiles_x);
    // As many tasks as tiles: the thread pool runs them on up to that many threads, and a task
    // that starts after the work is taken returns at once.
    context.ParallelFor([](void* raw, size_t) { static_cast<ChunkWork*>(raw)->Run(); },
                        static_cast<size_t>(work.tile_shards.count), 0, &work);
    if (job.failed) throw std::bad_alloc();
  }
  laps.To(kJob);
  if constexpr (kProfile) {  // not a clock read per run in the plain build
    Tally(kJobs, 1);
    Tally(kJobNanos,
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count());
  }
}

const char* TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    default: return "a non-float32 type";
  }
}

// The shape of a float32 tensor input; fails naming the input otherwise.
Shape FloatShape(const Ort::ConstValue& value, const char* name) {
  if (!value.IsTensor()) Fail(std::string(name) + " must be a float32 tensor");
  const auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    Fail(std::string(name) + " must be float32, got " + TypeName(info.GetElementType()) +
         " with shape " + ToString(info.GetShape()));
  }
  return info.GetShape();
}

// The types an attribute can have, as far as onnxruntime's getters tell them apart.
enum class AttributeType { kAbsent, kInt, kFloat, kString, kInts, kFloats, kTensor, kEmptyList };

const char* Describe(AttributeType type) {
  switch (type) {
    case AttributeType::kAbsent: return "no attribute";
    case AttributeType::kInt: return "an int";
    case AttributeType::kFloat: return "a float";
    case AttributeType::kString: return "a string";
    case AttributeType::kInts: return "ints";
    case AttributeType::kFloats: return "floats";
    case AttributeType::kTensor: return "a tensor";
    default: return "an empty list or an attribute of another type";
  }
}

// Whether `read` succeeds: an onnxruntime getter fails by throwing.
template <typename Read>
bool Reads(Read read) {
  try {
    read();
    return true;
  } catch (const Ort::Exception&) {
    return false;
  }
}

// The type of attribute `name`. onnxruntime does not check the types of a custom op's attributes
// and has no call that tells whether one is present: a getter fails when the attribute is absent,
// the getter of a single value also when it has another type, and the list getters read an
// attribute of another type as an empty list (kEmptyList: an empty list, or a type that no getter
// reads, such as strings; a tensor has a getter of its own, asked first). So the attribute is
// absent only if no getter reads it.
AttributeType TypeOf(const Ort::ConstKernelInfo& info, const char* name) {
  if (Reads([&] { info.GetAttribute<int64_t>(name); })) return AttributeType::kInt;
  if (Reads([&] { info.GetAttribute<float>(name); })) return AttributeType::kFloat;
  if (Reads([&] { info.GetAttribute<std::string>(name); })) return AttributeType::kString;
  Shape ints;
  std::vector<float> floats;
  const bool int_list = Reads([&] { ints = info.GetAttributes<int64_t>(name); });
  const bool float_list = Reads([&] { floats = info.GetAttributes<float>(name); });
  if (!ints.empty()) return AttributeType::kInts;
  if (!floats.empty()) return AttributeType::kFloats;
  Ort::AllocatorWithDefaultOptions allocator;  // a tensor, which the list getters read as []
  if (Reads([&] { info.GetTensorAttribute(name, allocator); })) return AttributeType::kTensor;
  return int_list || float_list ? AttributeType::kEmptyList : AttributeType::kAbsent;
}

// Attribute `name` of type T (int64_t or std::string), or `fallback` when it is absent; fails
// naming the attribute when it has another type.
template <typename T>
T AttributeOr(const Ort::ConstKernelInfo& info, const char* name, T fallback) {
  T value;
  if (Reads([&] { value = info.GetAttribute<T>(name); })) return value;
  const AttributeType type = TypeOf(info, name);
  if (type == AttributeType::kAbsent) return fallback;
  Fail(std::string(name) + " must be " + (std::is_same_v<T, int64_t> ? "an int" : "a string") +
       ", got " + Describe(type));
}

// Attribute `name` of type ints, or nothing when it is absent; fails naming the attribute when it
// has another type. An empty list reads as [].
std::optional<Shape> Ints(const Ort::ConstKernelInfo& info, const char* name) {
  const AttributeType type = TypeOf(info, name);
  switch (type) {
    case AttributeType::kAbsent: return std::nullopt;
    case AttributeType::kInts: return info.GetAttributes<int64_t>(name);
    case AttributeType::kEmptyList: return Shape{};
    default: Fail(std::string(name) + " must be ints, got " + Describe(type));
  }
}

HasteConvAttributes ReadAttributes(const Ort::ConstKernelInfo& info) {
  HasteConvAttributes attrs;
  if (const std::optional<Shape> kernel_shape = Ints(info, "kernel_shape")) {
    const Shape& k = *kernel_shape;
    if (k.size() != 2 || k[0] != k[1] || k[0] < 1) {
      Fail("kernel_shape must be [K, K] with K >= 1, got " + ToString(k));
    }
    attrs.kernel = k[0];
  }
  const Shape pads = Ints(info, "pads").value_or(Shape{0, 0, 0, 0});
  if (pads.size() != 4 || *std::min_element(pads.begin(), pads.end()) < 0) {
    Fail("pads must be four non-negative values [top, left, bottom, right], got " + ToString(pads));
  }
  std::copy(pads.begin(), pads.end(), attrs.pads.begin());
  for (const char* name : {"strides", "dilations"}) {
    const Shape values = Ints(info, name).value_or(Shape{1, 1});
    if (values != Shape{1, 1}) {
      Fail(std::string(name) + " must be [1, 1] (only 1 is supported), got " + ToString(values));
    }
  }
  const int64_t group = AttributeOr<int64_t>(info, "group", 1);
  if (group != 1) {
    Fail("group must be 1 (grouped convolution is not supported), got " + std::to_string(group));
  }
  attrs.tile = AttributeOr<int64_t>(info, "tile", 3);
  if (attrs.tile < 1 || attrs.tile > kMaxTile) {
    Fail("tile must be in [1, " + std::to_string(kMaxTile) + "], got " +
         std::to_string(attrs.tile));
  }
  const std::string activation = AttributeOr<std::string>(info, "activation", "");
  if (activation != "" && activation != "Relu") {
    Fail("activation must be \"\" or \"Relu\", got \"" + activation + "\"");
  }
  attrs.relu = activation == "Relu";
  return attrs;
}

OrtStatusPtr ToStatus(const OrtApi& api) {
  try {
    throw;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, "HasteConv: out of memory");
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (std::string("HasteConv: ") + e.what()).c_str());
  }
}

// The instruction sets the kernel has code for, narrowest first.
enum class Isa { kPortable, kAvx2, kAvx512 };

// The widest the environment variable HASTE_ONNX_ISA allows: `avx512` (or unset: no limit),
// `avx2` or `portable`, to compare the kernels or run a narrower one on a wider CPU. Any other
// value fails.
Isa IsaCap() {
  const char* value = std::getenv("HASTE_ONNX_ISA");
  const std::string cap = value ? value : "";
  if (cap.empty() || cap == "avx512") return Isa::kAvx512;
  if (cap == "avx2") return Isa::kAvx2;
  if (cap == "portable") return Isa::kPortable;
  Fail("HASTE_ONNX_ISA must be avx512, avx2 or portable (or unset), got '" + cap + "'");
}

// The instruction set the kernel uses: the widest this CPU has, within IsaCap().
Isa KernelIsa() {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  static const Isa widest = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::kPortable;
    return __builtin_cpu_supports("avx512f") ? Isa::kAvx512 : Isa::kAvx2;
  }();
  return std::min(widest, IsaCap());
#else
  IsaCap();  // an unknown value fails here too
  return Isa::kPortable;
#endif
}

}  // namespace

int64_t FilterLanes() {
  switch (KernelIsa()) {
    case Isa::kAvx512: return 16;
    case Isa::kAvx2: return 8;
    default: return 4;
  }
}

PackedFilters PackFilters(const float* w, const std::vector<int64_t>& w_shape, int64_t lanes) {
  const int64_t m = w_shape[0], c = w_shape[1], taps = w_shape[2] * w_shape[3];
  const int64_t blocks = (m + lanes - 1) / lanes;
  PackedFilters packed{w_shape, lanes, AlignedVector<float>(blocks * lanes * c * taps, 0.0f)};
  for (int64_t o = 0; o < m; ++o) {
    float* block = packed.data.data() + (o / lanes) * c * taps * lanes + o % lanes;
    for (int64_t i = 0; i < c * taps; ++i) block[i * lanes] = w[o * c * taps + i];
  }
  return packed;
}

OrtStatusPtr HasteConvOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                                         void** kernel) const {
  try {
    const Ort::ConstKernelInfo kernel_info(info);
    const HasteConvAttributes attrs = ReadAttributes(kernel_info);
    // W is packed here, once, if it is a constant initializer of the right type and rank; any
    // other W is packed (or refused with a message) by each run.
    const int64_t lanes = FilterLanes();  // the kernel's width, chosen now for every run
    PackedFilters packed;
    int is_constant = 0;
    const Ort::ConstValue w = kernel_info.GetTensorConstantInput(1, &is_constant);
    if (is_constant && w != nullptr && w.IsTensor()) {
      const auto w_info = w.GetTensorTypeAndShapeInfo();
      const Shape w_shape = w_info.GetShape();
      if (w_info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && w_shape.size() == 4 &&
          *std::min_element(w_shape.begin(), w_shape.end()) >= 1) {
        packed = PackFilters(w.GetTensorData<float>(), w_shape, lanes);
      }
    }
    *kernel = new HasteConvKernel(attrs, lanes, std::move(packed));
    return nullptr;
  } catch (...) {
    return ToStatus(api);
  }
}

OrtStatusPtr HasteConvKernel::ComputeV2(OrtKernelContext* context) const {
  try {
    Compute(Ort::KernelContext(context));
    return nullptr;
  } catch (...) {
    return ToStatus(Ort::GetApi());
  }
}

void HasteConvKernel::Compute(const Ort::KernelContext& context) const {
  const Ort::ConstValue x = context.GetInput(0), w = context.GetInput(1),
                        bias = context.GetInput(2), planes = context.GetInput(3);
  const Shape x_shape = FloatShape(x, "X"), w_shape = FloatShape(w, "W"),
              planes_shape = FloatShape(planes, "planes");
  const Geometry g = MakeGeometry(x_shape, w_shape, attrs_, lanes_);
  const int64_t p2 = g.patch * g.patch;
  if (planes_shape.size() != 2 || planes_shape[1] != p2) {
    Fail("planes must be [L, P*P] = [L, " + std::to_string(p2) + "] for kernel " +
         std::to_string(g.k) + " and tile " + std::to_string(g.tile) + ", got shape " +
         ToString(planes_shape));
  }
  if (planes_shape[0] > kMaxPlanes) {
    Fail("planes has L = " + std::to_string(planes_shape[0]) +
         " hyperplanes, but codes are 64-bit: L must be at most 63");
  }
  const float* plane_values = planes.GetTensorData<float>();
  for (int64_t i = 0; i < planes_shape[0] * p2; ++i) {
    if (!std::isfinite(plane_values[i])) {
      Fail("planes must be finite: plane " + std::to_string(i / p2) + " has " +
           std::to_string(plane_values[i]) + " at " + std::to_string(i % p2));
    }
  }
  if (bias != nullptr) {
    const Shape bias_shape = FloatShape(bias, "B");
    if (bias_shape != Shape{g.m}) {
      Fail("B must have shape [" + std::to_string(g.m) + "] (one per output channel), got shape " +
           ToString(bias_shape));
    }
  }

  Ort::UnownedValue y = context.GetOutput(0, {g.n, g.m, g.out_h, g.out_w});
  if (g.n == 0) return;  // an empty batch: Y is empty, as Conv's

  // W as packed when the session was created, or packed now if it was not a constant then.
  PackedFilters packed_now;
  const PackedFilters* packed = &packed_;
  if (packed_.w_shape != w_shape) {
    packed_now = PackFilters(w.GetTensorData<float>(), w_shape, lanes_);
    packed = &packed_now;
  }

  const SparsePlanes sparse_planes(plane_values, planes_shape[0], p2);

  Job job{g,
          SplitPixels(g.span_y * g.span_x),
          g.tile == 3 && g.k == 3,
          x.GetTensorData<float>(),
          packed->data.data(),
          packed->lanes,
          bias != nullptr ? bias.GetTensorData<float>() : nullptr,
          &sparse_planes,
          attrs_.relu,
          ConvFor(packed->lanes),
          y.GetTensorMutableData<float>()};
  RunJob(context, job);
  if (job.failed) throw std::bad_alloc();
}

}  // namespace haste_onnx

extern "C" int64_t HasteConvLanes() {
  try {
    return haste_onnx::FilterLanes();
  } catch (...) {
    return 0;
  }
}

extern "C" int HasteConvTileCodes(const float* x, const int64_t* x_shape, const float* planes,
                                  int64_t num_planes, int64_t kernel, int64_t tile,
                                  const int64_t* pads, uint64_t* codes) {
  using namespace haste_onnx;
  try {
    if (num_planes < 0 || num_planes > kMaxPlanes || tile < 1 || tile > kMaxTile) return 1;
    HasteConvAttributes attrs;
    attrs.tile = tile;
    std::copy(pads, pads + 4, attrs.pads.begin());
    const Shape xs(x_shape, x_shape + 4);
    const int64_t lanes = FilterLanes();  // the hashing of the kernel a session would run
    const Geometry g = MakeGeometry(xs, {1, xs[1], kernel, kernel}, attrs, lanes);
    const int64_t p2 = g.patch * g.patch;
    std::vector<float> patch(g.c * p2);
    const SparsePlanes sparse_planes(planes, num_planes, p2);
    std::vector<double> sums(g.h * g.w), sum(p2);
    AlignedVector<double> centered(p2 * kHashBlock);
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t p = 0; p < g.h * g.w; p += kSumPixels) {
        ChannelSums(lanes, x + n * g.c * g.h * g.w + p, g.c, g.h * g.w,
                    std::min(kSumPixels, g.h * g.w - p), sums.data() + p);
      }
      for (int64_t ty = 0; ty < g.tiles_y; ++ty) {
        for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
          FillPatch(g, x + n * g.c * g.h * g.w, ty, tx, patch.data());
          PatchSums(g, sums.data(), ty, tx, sum.data());
          const int64_t tile_index = (n * g.tiles_y + ty) * g.tiles_x + tx;
          HashPatch(lanes, patch.data(), g.c, p2, sparse_planes, sum.data(), centered.data(),
                    codes + tile_index * g.c);
        }
      }
    }
    return 0;
  } catch (...) {
    return 1;
  }
}

extern "C" int64_t HasteConvProfile(uint64_t* totals, int64_t size, int reset) {
  using namespace haste_onnx;
  if (!kProfile) return 0;
  for (int64_t i = 0; i < std::min<int64_t>(size, kPhases + kCounts); ++i) {
    totals[i] = reset ? profile_totals[i].exchange(0) : profile_totals[i].load();
  }
  return kPhases + kCounts;
}
