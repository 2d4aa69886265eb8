#include "haste_conv.h"

#include <algorithm>
#include <atomic>
#include <new>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace haste_onnx {
namespace {

constexpr int64_t kMaxPlanes = 63;  // codes are 64-bit

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
};

Geometry MakeGeometry(const Shape& x, const Shape& w, const HasteConvAttributes& attrs) {
  if (x.size() != 4) Fail("X must be 4-D [N, C, H, W], got shape " + ToString(x));
  if (w.size() != 4) Fail("W must be 4-D [M, C, K, K], got shape " + ToString(w));
  if (x[0] < 1) Fail("X has an empty batch: shape " + ToString(x));
  if (x[1] < 1 || w[0] < 1) {
    Fail("X and W need at least one channel: X shape " + ToString(x) + ", W shape " + ToString(w));
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
  Geometry g{};
  g.n = x[0], g.c = x[1], g.h = x[2], g.w = x[3];
  g.m = w[0], g.k = w[2];
  g.pad_top = p[0], g.pad_left = p[1];
  g.tile = attrs.tile;
  g.patch = g.tile + g.k - 1;
  g.out_h = g.h + p[0] + p[2] - g.k + 1;
  g.out_w = g.w + p[1] + p[3] - g.k + 1;
  if (g.out_h < 1 || g.out_w < 1) {
    Fail("the output would be empty: X shape " + ToString(x) + ", W shape " + ToString(w) +
         ", pads " + ToString({p[0], p[1], p[2], p[3]}));
  }
  g.tiles_y = (g.out_h + g.tile - 1) / g.tile;
  g.tiles_x = (g.out_w + g.tile - 1) / g.tile;
  return g;
}

// Copies the P x P patch that output tile (ty, tx) reads from one image [C, H, W] into
// patch [C, P*P]; positions outside the input are zero.
void GatherPatch(const Geometry& g, const float* image, int64_t ty, int64_t tx, float* patch) {
  const int64_t p = g.patch, y0 = ty * g.tile - g.pad_top, x0 = tx * g.tile - g.pad_left;
  const int64_t lo = std::clamp<int64_t>(-x0, 0, p), hi = std::clamp<int64_t>(g.w - x0, lo, p);
  if (lo > 0 || hi < p || y0 < 0 || y0 + p > g.h) std::fill(patch, patch + g.c * p * p, 0.0f);
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t py = 0; py < p; ++py) {
      const int64_t iy = y0 + py;
      if (iy < 0 || iy >= g.h || lo == hi) continue;
      const float* src = image + (c * g.h + iy) * g.w + x0 + lo;
      std::copy(src, src + (hi - lo), patch + (c * p + py) * p + lo);
    }
  }
}

// Channels are hashed kHashBlock at a time, their projections summed in registers.
constexpr int64_t kHashBlock = 8;

// Two doubles (an SSE2 or NEON register), unaligned and allowed to alias double.
typedef double Vec2d __attribute__((vector_size(16), may_alias, aligned(8)));

// Channels rounded up to whole hash blocks: the row length of the centered patch.
int64_t HashWidth(int64_t channels) {
  return (channels + kHashBlock - 1) / kHashBlock * kHashBlock;
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

// Hashes every channel of patch [C, D]: code bit l is dot(planes[l], v_c - mean_c v_c) > 0.
// Everything is in double and each dot product is summed over j in order, the mean summed over
// channels in order as numpy does, so the codes agree with the reference except for projections
// within double rounding of zero. Scratch: mean [D], centered [D, HashWidth(C)].
void HashPatch(const float* patch, int64_t channels, int64_t dim, const SparsePlanes& planes,
               double* mean, double* centered, uint64_t* codes) {
  const int64_t width = HashWidth(channels);
  std::copy(patch, patch + dim, mean);
  for (int64_t c = 1; c < channels; ++c) {
    for (int64_t j = 0; j < dim; ++j) mean[j] += patch[c * dim + j];
  }
  for (int64_t j = 0; j < dim; ++j) mean[j] /= static_cast<double>(channels);
  for (int64_t j = 0; j < dim; ++j) {
    double* row = centered + j * width;
    for (int64_t c = 0; c < channels; ++c) row[c] = patch[c * dim + j] - mean[j];
    std::fill(row + channels, row + width, 0.0);  // the last block's spare lanes
  }
  for (int64_t c0 = 0; c0 < channels; c0 += kHashBlock) {
    const int64_t count = std::min(kHashBlock, channels - c0);
    uint64_t block_codes[kHashBlock] = {};
    for (int64_t l = 0; l < planes.size(); ++l) {
      Vec2d dots[kHashBlock / 2] = {};
      for (int64_t e = planes.start[l]; e < planes.start[l + 1]; ++e) {
        const double p = planes.value[e];
        const Vec2d* u = reinterpret_cast<const Vec2d*>(centered + planes.index[e] * width + c0);
        for (int64_t i = 0; i < kHashBlock / 2; ++i) dots[i] += p * u[i];
      }
      for (int64_t i = 0; i < kHashBlock; ++i)
        block_codes[i] |= uint64_t{dots[i / 2][i % 2] > 0.0} << l;
    }
    std::copy(block_codes, block_codes + count, codes + c0);
  }
}

// Output channels are processed in blocks of kBlock.
constexpr int64_t kBlock = 16;

// One run's inputs and output, shared read-only by the work items (except `failed`).
struct Job {
  Geometry g;
  int64_t m_padded;      // M rounded up to a multiple of kBlock
  const float* x;        // [N, C, H, W]
  const float* filters;  // W as [C, K*K, m_padded], zero-padded: contiguous over output channels
  const float* bias;     // [M] or null
  const SparsePlanes* planes;
  bool relu;
  float* y;  // [N, M, Ho, Wo]
  std::atomic<bool> failed{false};
};

// One bucket of a tile: its (merged) P x P input and its (summed) filters [K*K, m_padded].
struct Bucket {
  const float* in;
  const float* filters;
};

// Where the kernel taps and the output pixels of a tile read a P x P input.
struct TileOffsets {
  std::vector<int64_t> taps;    // [K*K]: kh * P + kw
  std::vector<int64_t> pixels;  // [T*T]: oy * P + ox
};

// Output channels m0 .. m0 + kBlock of kPixels output pixels (inputs at base[0 .. kPixels)),
// summed over all buckets and taps in registers of kLanes floats; written to out, one row of
// m_padded floats per pixel.
template <int kLanes, int kPixels>
__attribute__((always_inline)) inline void ConvBlock(const std::vector<Bucket>& buckets,
                                                     const std::vector<int64_t>& taps,
                                                     const int64_t* base, int64_t m0,
                                                     int64_t m_padded, float* out) {
  // Unaligned and allowed to alias float, like the compilers' own __m128_u and __m256_u.
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), may_alias, aligned(4)));
  constexpr int kVectors = kBlock / kLanes;
  Vec acc[kPixels][kVectors] = {};
  for (const Bucket& bucket : buckets) {
    const float* f = bucket.filters + m0;
    for (const int64_t tap : taps) {
      Vec w[kVectors];
      for (int i = 0; i < kVectors; ++i) w[i] = reinterpret_cast<const Vec*>(f)[i];
      for (int p = 0; p < kPixels; ++p) {
        const float v = bucket.in[base[p] + tap];
        for (int i = 0; i < kVectors; ++i) acc[p][i] += v * w[i];
      }
      f += m_padded;
    }
  }
  for (int p = 0; p < kPixels; ++p) {
    for (int i = 0; i < kVectors; ++i)
      reinterpret_cast<Vec*>(out + p * m_padded + m0)[i] = acc[p][i];
  }
}

// ConvBlock for the `count` <= kPixels pixels at base.
template <int kLanes, int kPixels>
__attribute__((always_inline)) inline void ConvPixels(const std::vector<Bucket>& buckets,
                                                      const std::vector<int64_t>& taps,
                                                      const int64_t* base, int64_t count,
                                                      int64_t m0, int64_t m_padded, float* out) {
  if constexpr (kPixels > 1) {
    if (count < kPixels) {
      return ConvPixels<kLanes, kPixels - 1>(buckets, taps, base, count, m0, m_padded, out);
    }
  }
  ConvBlock<kLanes, kPixels>(buckets, taps, base, m0, m_padded, out);
}

// out [T*T, m_padded] = the tile's reduced convolution: the valid convolution of each bucket's
// input with its filters, summed over buckets. Pixels go in groups whose accumulators fill the
// vector registers (16 on x86-64).
template <int kLanes>
__attribute__((always_inline)) inline void ConvTileWith(const std::vector<Bucket>& buckets,
                                                        const TileOffsets& offsets,
                                                        int64_t m_padded, float* out) {
  constexpr int kGroup = kLanes == 8 ? 5 : 2;
  const int64_t pixels = static_cast<int64_t>(offsets.pixels.size());
  for (int64_t m0 = 0; m0 < m_padded; m0 += kBlock) {
    for (int64_t p = 0; p < pixels; p += kGroup) {
      ConvPixels<kLanes, kGroup>(buckets, offsets.taps, &offsets.pixels[p],
                                 std::min<int64_t>(kGroup, pixels - p), m0, m_padded,
                                 out + p * m_padded);
    }
  }
}

#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
__attribute__((target("avx2,fma"))) void ConvTileAvx2(const std::vector<Bucket>& buckets,
                                                      const TileOffsets& offsets, int64_t m_padded,
                                                      float* out) {
  ConvTileWith<8>(buckets, offsets, m_padded, out);
}
#endif

// The portable kernel (four lanes), or on x86-64 CPUs with AVX2 and FMA the same with eight.
void ConvTile(const std::vector<Bucket>& buckets, const TileOffsets& offsets, int64_t m_padded,
              float* out) {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return ConvTileAvx2(buckets, offsets, m_padded, out);
#endif
  ConvTileWith<4>(buckets, offsets, m_padded, out);
}

// Computes one row of output tiles of one image. Work items write disjoint parts of Y.
void RunTileRow(const Job& job, int64_t index) {
  const Geometry& g = job.g;
  const int64_t n = index / g.tiles_y, ty = index % g.tiles_y;
  const int64_t p2 = g.patch * g.patch, filter_size = g.k * g.k * job.m_padded;
  std::vector<float> patch(g.c * p2), out(g.tile * g.tile * job.m_padded);
  std::vector<float> merged_in, merged_w;  // grown on demand: one slot per merging bucket
  std::vector<double> mean(p2), centered(p2 * HashWidth(g.c));
  std::vector<uint64_t> codes(g.c);
  std::vector<int64_t> order(g.c), starts;
  std::vector<Bucket> buckets;
  TileOffsets offsets;
  for (int64_t kh = 0; kh < g.k; ++kh) {
    for (int64_t kw = 0; kw < g.k; ++kw) offsets.taps.push_back(kh * g.patch + kw);
  }
  for (int64_t oy = 0; oy < g.tile; ++oy) {
    for (int64_t ox = 0; ox < g.tile; ++ox) offsets.pixels.push_back(oy * g.patch + ox);
  }
  const float* image = job.x + n * g.c * g.h * g.w;

  for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
    GatherPatch(g, image, ty, tx, patch.data());
    HashPatch(patch.data(), g.c, p2, *job.planes, mean.data(), centered.data(), codes.data());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return codes[a] != codes[b] ? codes[a] < codes[b] : a < b;
    });

    // Buckets are runs of equal codes in `order`. A bucket of one channel is used in place; a
    // larger one gets the mean of its patches and the sum of its filter channels.
    starts.clear();
    int64_t merging = 0;
    for (int64_t i = 0; i < g.c; ++i) {
      if (i == 0 || codes[order[i]] != codes[order[i - 1]]) starts.push_back(i);
    }
    starts.push_back(g.c);
    for (size_t b = 0; b + 1 < starts.size(); ++b) merging += starts[b + 1] - starts[b] > 1;
    if (merged_in.size() < static_cast<size_t>(merging * p2)) {
      merged_in.resize(merging * p2);
      merged_w.resize(merging * filter_size);
    }
    buckets.clear();
    float* slot_in = merged_in.data();
    float* slot_w = merged_w.data();
    for (size_t b = 0; b + 1 < starts.size(); ++b) {
      const int64_t first = order[starts[b]], size = starts[b + 1] - starts[b];
      const float* in = patch.data() + first * p2;
      const float* filters = job.filters + first * filter_size;
      if (size == 1) {
        buckets.push_back({in, filters});
        continue;
      }
      std::copy(in, in + p2, slot_in);
      std::copy(filters, filters + filter_size, slot_w);
      for (int64_t i = starts[b] + 1; i < starts[b + 1]; ++i) {
        const float* more_in = patch.data() + order[i] * p2;
        const float* more_w = job.filters + order[i] * filter_size;
        for (int64_t j = 0; j < p2; ++j) slot_in[j] += more_in[j];
        for (int64_t j = 0; j < filter_size; ++j) slot_w[j] += more_w[j];
      }
      const float scale = 1.0f / static_cast<float>(size);
      for (int64_t j = 0; j < p2; ++j) slot_in[j] *= scale;
      buckets.push_back({slot_in, slot_w});
      slot_in += p2;
      slot_w += filter_size;
    }
    ConvTile(buckets, offsets, job.m_padded, out.data());

    const int64_t y0 = ty * g.tile, x0 = tx * g.tile;
    const int64_t rows = std::min(g.tile, g.out_h - y0), cols = std::min(g.tile, g.out_w - x0);
    for (int64_t m = 0; m < g.m; ++m) {
      const float b = job.bias ? job.bias[m] : 0.0f;
      float* dst = job.y + ((n * g.m + m) * g.out_h + y0) * g.out_w + x0;
      for (int64_t oy = 0; oy < rows; ++oy) {
        for (int64_t ox = 0; ox < cols; ++ox) {
          const float v = out[(oy * g.tile + ox) * job.m_padded + m] + b;
          dst[oy * g.out_w + ox] = job.relu ? std::max(v, 0.0f) : v;
        }
      }
    }
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

template <typename T>
T AttributeOr(const Ort::ConstKernelInfo& info, const char* name, T fallback) {
  try {
    return info.GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return fallback;  // absent
  }
}

Shape IntsOr(const Ort::ConstKernelInfo& info, const char* name, Shape fallback) {
  try {
    return info.GetAttributes<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;  // absent
  }
}

HasteConvAttributes ReadAttributes(const Ort::ConstKernelInfo& info) {
  HasteConvAttributes attrs;
  const Shape kernel_shape = IntsOr(info, "kernel_shape", {});
  if (!kernel_shape.empty()) {
    if (kernel_shape.size() != 2 || kernel_shape[0] != kernel_shape[1] || kernel_shape[0] < 1) {
      Fail("kernel_shape must be [K, K] with K >= 1, got " + ToString(kernel_shape));
    }
    attrs.kernel = kernel_shape[0];
  }
  const Shape pads = IntsOr(info, "pads", {0, 0, 0, 0});
  if (pads.size() != 4 || *std::min_element(pads.begin(), pads.end()) < 0) {
    Fail("pads must be four non-negative values [top, left, bottom, right], got " + ToString(pads));
  }
  std::copy(pads.begin(), pads.end(), attrs.pads.begin());
  for (const char* name : {"strides", "dilations"}) {
    const Shape values = IntsOr(info, name, {1, 1});
    if (values != Shape{1, 1}) {
      Fail(std::string(name) + " must be [1, 1] (only 1 is supported), got " + ToString(values));
    }
  }
  const int64_t group = AttributeOr<int64_t>(info, "group", 1);
  if (group != 1) {
    Fail("group must be 1 (grouped convolution is not supported), got " + std::to_string(group));
  }
  attrs.tile = AttributeOr<int64_t>(info, "tile", 3);
  if (attrs.tile < 1) Fail("tile must be >= 1, got " + std::to_string(attrs.tile));
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

}  // namespace

OrtStatusPtr HasteConvOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                                         void** kernel) const {
  try {
    *kernel = new HasteConvKernel(ReadAttributes(Ort::ConstKernelInfo(info)));
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
  const Geometry g = MakeGeometry(x_shape, w_shape, attrs_);
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
  if (bias != nullptr) {
    const Shape bias_shape = FloatShape(bias, "B");
    if (bias_shape != Shape{g.m}) {
      Fail("B must have shape [" + std::to_string(g.m) + "] (one per output channel), got shape " +
           ToString(bias_shape));
    }
  }

  // W [M, C, K*K] -> [C, K*K, m_padded], once per run (W is read as an input, not cached).
  const int64_t k2 = g.k * g.k, m_padded = (g.m + kBlock - 1) / kBlock * kBlock;
  const float* w_data = w.GetTensorData<float>();
  std::vector<float> filters(g.c * k2 * m_padded, 0.0f);
  for (int64_t m = 0; m < g.m; ++m) {
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t j = 0; j < k2; ++j) {
        filters[(c * k2 + j) * m_padded + m] = w_data[(m * g.c + c) * k2 + j];
      }
    }
  }

  const SparsePlanes sparse_planes(planes.GetTensorData<float>(), planes_shape[0], p2);

  Ort::UnownedValue y = context.GetOutput(0, {g.n, g.m, g.out_h, g.out_w});
  Job job{g,
          m_padded,
          x.GetTensorData<float>(),
          filters.data(),
          bias != nullptr ? bias.GetTensorData<float>() : nullptr,
          &sparse_planes,
          attrs_.relu,
          y.GetTensorMutableData<float>()};
  context.ParallelFor(
      [](void* data, size_t index) {
        Job& job = *static_cast<Job*>(data);
        try {
          RunTileRow(job, static_cast<int64_t>(index));
        } catch (...) {  // only std::bad_alloc; exceptions must not reach the thread pool
          job.failed = true;
        }
      },
      static_cast<size_t>(g.n * g.tiles_y), 0, &job);
  if (job.failed) throw std::bad_alloc();
}

}  // namespace haste_onnx

extern "C" int HasteConvTileCodes(const float* x, const int64_t* x_shape, const float* planes,
                                  int64_t num_planes, int64_t kernel, int64_t tile,
                                  const int64_t* pads, uint64_t* codes) {
  using namespace haste_onnx;
  try {
    if (num_planes < 0 || num_planes > kMaxPlanes || tile < 1) return 1;
    HasteConvAttributes attrs;
    attrs.tile = tile;
    std::copy(pads, pads + 4, attrs.pads.begin());
    const Shape xs(x_shape, x_shape + 4);
    const Geometry g = MakeGeometry(xs, {1, xs[1], kernel, kernel}, attrs);
    const int64_t p2 = g.patch * g.patch;
    std::vector<float> patch(g.c * p2);
    const SparsePlanes sparse_planes(planes, num_planes, p2);
    std::vector<double> mean(p2), centered(p2 * HashWidth(g.c));
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t ty = 0; ty < g.tiles_y; ++ty) {
        for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
          GatherPatch(g, x + n * g.c * g.h * g.w, ty, tx, patch.data());
          const int64_t tile_index = (n * g.tiles_y + ty) * g.tiles_x + tx;
          HashPatch(patch.data(), g.c, p2, sparse_planes, mean.data(), centered.data(),
                    codes + tile_index * g.c);
        }
      }
    }
    return 0;
  } catch (...) {
    return 1;
  }
}
