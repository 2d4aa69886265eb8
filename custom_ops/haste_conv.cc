#include "haste_conv.h"

#include <algorithm>
#include <atomic>
#include <cstring>
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
  std::fill(patch, patch + g.c * p * p, 0.0f);
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t py = 0; py < p; ++py) {
      const int64_t iy = y0 + py;
      if (iy < 0 || iy >= g.h || lo == hi) continue;
      const float* src = image + (c * g.h + iy) * g.w + x0 + lo;
      std::copy(src, src + (hi - lo), patch + (c * p + py) * p + lo);
    }
  }
}

// Hashes every channel of patch [C, D]: code bit l is dot(planes[l], v_c - mean_c v_c) > 0.
// Everything is in double and each dot product is summed over j in order (zero plane entries add
// exactly nothing and are skipped), the mean summed over channels in order as numpy does, so the
// codes agree with the reference except for projections within double rounding of zero.
// Scratch: mean [D], centered [D, C], dots [C].
void HashPatch(const float* patch, int64_t channels, int64_t dim, const float* planes,
               int64_t num_planes, double* mean, double* centered, double* dots, uint64_t* codes) {
  std::copy(patch, patch + dim, mean);
  for (int64_t c = 1; c < channels; ++c) {
    for (int64_t j = 0; j < dim; ++j) mean[j] += patch[c * dim + j];
  }
  for (int64_t j = 0; j < dim; ++j) mean[j] /= static_cast<double>(channels);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t j = 0; j < dim; ++j) centered[j * channels + c] = patch[c * dim + j] - mean[j];
  }
  std::fill(codes, codes + channels, uint64_t{0});
  for (int64_t l = 0; l < num_planes; ++l) {
    std::fill(dots, dots + channels, 0.0);
    for (int64_t j = 0; j < dim; ++j) {
      const double p = planes[l * dim + j];
      if (p == 0.0) continue;
      const double* u = centered + j * channels;
      for (int64_t c = 0; c < channels; ++c) dots[c] += p * u[c];
    }
    for (int64_t c = 0; c < channels; ++c) {
      if (dots[c] > 0.0) codes[c] |= uint64_t{1} << l;
    }
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
  const float* planes;   // [L, P*P]
  int64_t num_planes;
  bool relu;
  float* y;  // [N, M, Ho, Wo]
  std::atomic<bool> failed{false};
};

// out [T*T, m_padded] += valid convolution of one P x P input with filters [K*K, m_padded],
// kBlock output channels at a time, whose accumulators stay in vector registers (of kLanes
// floats) over the kernel window.
template <int kLanes>
__attribute__((always_inline)) inline void AccumulateConvWith(const Geometry& g, int64_t m_padded,
                                                              const float* in, const float* filters,
                                                              float* out) {
  // Unaligned and allowed to alias float, like the compilers' own __m128_u and __m256_u.
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), may_alias, aligned(4)));
  constexpr int64_t kVectors = kBlock / kLanes;
  for (int64_t m0 = 0; m0 < m_padded; m0 += kBlock) {
    for (int64_t oy = 0; oy < g.tile; ++oy) {
      for (int64_t ox = 0; ox < g.tile; ++ox) {
        Vec* o = reinterpret_cast<Vec*>(out + (oy * g.tile + ox) * m_padded + m0);
        Vec acc[kVectors];
        for (int64_t i = 0; i < kVectors; ++i) acc[i] = o[i];
        for (int64_t kh = 0; kh < g.k; ++kh) {
          const float* row = in + (oy + kh) * g.patch + ox;
          const float* f = filters + kh * g.k * m_padded + m0;
          for (int64_t kw = 0; kw < g.k; ++kw, f += m_padded) {
            const float v = row[kw];
            const Vec* w = reinterpret_cast<const Vec*>(f);
            for (int64_t i = 0; i < kVectors; ++i) acc[i] += v * w[i];
          }
        }
        for (int64_t i = 0; i < kVectors; ++i) o[i] = acc[i];
      }
    }
  }
}

#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
__attribute__((target("avx2,fma"))) void AccumulateConvAvx2(const Geometry& g, int64_t m_padded,
                                                            const float* in, const float* filters,
                                                            float* out) {
  AccumulateConvWith<8>(g, m_padded, in, filters, out);
}
#endif

// The portable kernel, or on x86-64 CPUs with AVX2 and FMA the same kernel with eight lanes.
void AccumulateConv(const Geometry& g, int64_t m_padded, const float* in, const float* filters,
                    float* out) {
#if defined(__x86_64__) && !defined(HASTE_ONNX_PORTABLE)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return AccumulateConvAvx2(g, m_padded, in, filters, out);
#endif
  AccumulateConvWith<4>(g, m_padded, in, filters, out);
}

// Computes one row of output tiles of one image. Work items write disjoint parts of Y.
void RunTileRow(const Job& job, int64_t index) {
  const Geometry& g = job.g;
  const int64_t n = index / g.tiles_y, ty = index % g.tiles_y;
  const int64_t p2 = g.patch * g.patch, filter_size = g.k * g.k * job.m_padded;
  std::vector<float> patch(g.c * p2), merged_in(p2), merged_w(filter_size),
      out(g.tile * g.tile * job.m_padded);
  std::vector<double> mean(p2), centered(p2 * g.c), dots(g.c);
  std::vector<uint64_t> codes(g.c);
  std::vector<int64_t> order(g.c);
  const float* image = job.x + n * g.c * g.h * g.w;

  for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
    GatherPatch(g, image, ty, tx, patch.data());
    HashPatch(patch.data(), g.c, p2, job.planes, job.num_planes, mean.data(), centered.data(),
              dots.data(), codes.data());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return codes[a] != codes[b] ? codes[a] < codes[b] : a < b;
    });
    std::fill(out.begin(), out.end(), 0.0f);

    // Each bucket (run of equal codes): convolve the mean of its patches with the sum of its
    // filter channels; a bucket of one channel is used in place.
    for (int64_t begin = 0, end = 0; begin < g.c; begin = end) {
      for (end = begin + 1; end < g.c && codes[order[end]] == codes[order[begin]];) ++end;
      const float* in = patch.data() + order[begin] * p2;
      const float* filters = job.filters + order[begin] * filter_size;
      if (end - begin > 1) {
        std::fill(merged_in.begin(), merged_in.end(), 0.0f);
        std::fill(merged_w.begin(), merged_w.end(), 0.0f);
        for (int64_t i = begin; i < end; ++i) {
          const float* src_in = patch.data() + order[i] * p2;
          const float* src_w = job.filters + order[i] * filter_size;
          for (int64_t j = 0; j < p2; ++j) merged_in[j] += src_in[j];
          for (int64_t j = 0; j < filter_size; ++j) merged_w[j] += src_w[j];
        }
        const float scale = 1.0f / static_cast<float>(end - begin);
        for (float& v : merged_in) v *= scale;
        in = merged_in.data();
        filters = merged_w.data();
      }
      AccumulateConv(g, job.m_padded, in, filters, out.data());
    }

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

  Ort::UnownedValue y = context.GetOutput(0, {g.n, g.m, g.out_h, g.out_w});
  Job job{g,
          m_padded,
          x.GetTensorData<float>(),
          filters.data(),
          bias != nullptr ? bias.GetTensorData<float>() : nullptr,
          planes.GetTensorData<float>(),
          planes_shape[0],
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
    std::vector<double> mean(p2), centered(p2 * g.c), dots(g.c);
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t ty = 0; ty < g.tiles_y; ++ty) {
        for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
          GatherPatch(g, x + n * g.c * g.h * g.w, ty, tx, patch.data());
          const int64_t tile_index = (n * g.tiles_y + ty) * g.tiles_x + tx;
          HashPatch(patch.data(), g.c, p2, planes, num_planes, mean.data(), centered.data(),
                    dots.data(), codes + tile_index * g.c);
        }
      }
    }
    return 0;
  } catch (...) {
    return 1;
  }
}
