// Registers the haste_onnx operator domain with an onnxruntime session:
// SessionOptions.register_custom_ops_library(haste_onnx.get_library_path()).
#include <exception>
#include <string>

#include "haste_conv.h"

namespace {
constexpr const char* kDomain = "haste_onnx";
}

extern "C" HASTE_ONNX_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                       const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // GetApi(1) is served by every onnxruntime: use it to say why.
    const std::string message = "HasteConv: the library was built for onnxruntime API " +
                                std::to_string(ORT_API_VERSION) +
                                ", which this older onnxruntime does not serve; upgrade it";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  static const bool initialized = (Ort::InitApi(api), true);
  (void)initialized;
  try {
    // One domain for the whole process, created once; sessions only read it.
    static const haste_onnx::HasteConvOp op;
    static Ort::CustomOpDomain domain = [] {
      Ort::CustomOpDomain d(kDomain);
      d.Add(&op);
      return d;
    }();
    Ort::UnownedSessionOptions(options).Add(domain);
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
