// HasteConv (domain haste_onnx, version 1): a 2-D convolution whose input channels are merged,
// output tile by output tile, when LSH finds them similar. Semantics: docs/operator.md.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <array>
#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>
#include <vector>

// The library is built with hidden visibility; these are its only exported symbols.
#define HASTE_ONNX_EXPORT __attribute__((visibility("default")))

namespace haste_onnx {

// The node's attributes, validated when the kernel is created.
struct HasteConvAttributes {
  int64_t kernel = 0;             // from kernel_shape; 0 when absent (taken from W)
  std::array<int64_t, 4> pads{};  // top, left, bottom, right
  int64_t tile = 3;               // output tile edge T
  bool relu = false;
};

// Allocates on cache-line (64-byte) boundaries, so that no vector of 8 floats read from the
// storage straddles two lines: std::vector's default storage is only 16-byte aligned, and then
// every other 32-byte filter load of the kernel touched two cache lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const {
    return false;
  }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// W [M, C, K, K] repacked for the convolution kernel: blocks of `lanes` output channels (one
// vector register), [ceil(M / lanes), C, K*K, lanes], zero past M.
struct PackedFilters {
  std::vector<int64_t> w_shape;  // the shape of the W it was made from
  int64_t lanes = 0;
  AlignedVector<float> data;
};

// Output channels per vector register of the kernel this CPU runs: 16 with AVX-512, 8 with
// AVX2 and FMA, else 4, within the cap of the environment variable HASTE_ONNX_ISA (`avx512` or
// unset: none, `avx2`, `portable`; any other value fails).
int64_t FilterLanes();

// Packs W [M, C, K, K] (shape w_shape) for `lanes`-wide kernels.
PackedFilters PackFilters(const float* w, const std::vector<int64_t>& w_shape, int64_t lanes);

class HasteConvKernel {
 public:
  // lanes: the kernel's width, FilterLanes() when the session was created. packed: W packed
  // then, `lanes` wide, if W is a constant initializer; left empty otherwise, and W is then
  // packed on every run. Never changed after construction, so concurrent runs only read it.
  HasteConvKernel(const HasteConvAttributes& attrs, int64_t lanes, PackedFilters packed)
      : attrs_(attrs), lanes_(lanes), packed_(std::move(packed)) {}

  // Never throws: every error becomes a status whose message starts with "HasteConv:".
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const;

 private:
  void Compute(const Ort::KernelContext& context) const;

  const HasteConvAttributes attrs_;
  const int64_t lanes_;  // FilterLanes() when the session was created: HASTE_ONNX_ISA read once
  const PackedFilters packed_;
};

struct HasteConvOp : Ort::CustomOpBase<HasteConvOp, HasteConvKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;

  const char* GetName() const { return "HasteConv"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }

  // Inputs X, W, B (optional), planes. Their element types are left open so that a wrong type
  // reaches the kernel and gets a HasteConv error message instead of a generic type error.
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace haste_onnx

// Test hook: the hash codes HasteConv computes for X [N, C, H, W] (x_shape) with planes
// [num_planes, P*P], written to codes [N, tiles_y, tiles_x, C], so that tests can compare them
// with the reference bit for bit. pads is [top, left, bottom, right]. Returns 0, or 1 when the
// shapes are invalid.
extern "C" HASTE_ONNX_EXPORT int HasteConvTileCodes(const float* x, const int64_t* x_shape,
                                                    const float* planes, int64_t num_planes,
                                                    int64_t kernel, int64_t tile,
                                                    const int64_t* pads, uint64_t* codes);

// Test hook: the output channels per vector register of the kernel a session would run now
// (FilterLanes: 16, 8 or 4), or 0 when HASTE_ONNX_ISA holds an unknown value.
extern "C" HASTE_ONNX_EXPORT int64_t HasteConvLanes();

// Profiling hook (benchmarks/profile_layer.py): copies up to `size` totals of a build made with
// -DHASTE_PROFILE=ON, the clock ticks of each phase of the runs so far and then counts of their
// work (haste_conv.cc: Phase, Count), and zeroes them if `reset`. Returns how many totals there
// are, 0 for a build without profiling.
extern "C" HASTE_ONNX_EXPORT int64_t HasteConvProfile(uint64_t* totals, int64_t size, int reset);
