// See RemaskPlugin.h. The kernels are in remaskKernel.cu (nemodiffRemaskLaunch).
#include "RemaskPlugin.h"
#include "remaskKernel.h"

#include <cstring>
#include <exception>

using namespace nvinfer1;

namespace nemodiff
{
namespace
{
constexpr char const* kName = "Remask";     // plugins/remask/spec.py: REMASK.name
constexpr char const* kVersion = "1";       // REMASK.version
constexpr char const* kNamespace = "nemodiff"; // REMASK.namespace
constexpr int32_t kNbInputs = 5;            // logits, canvas, active, quota, noise
constexpr int32_t kNbOutputs = 4;           // canvas_out, token, confidence, commit

int32_t toKernelDType(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return kRemaskFloat;
    case DataType::kHALF: return kRemaskHalf;
    case DataType::kBF16: return kRemaskBFloat16;
    default: return -1;
    }
}
} // namespace

RemaskPlugin::RemaskPlugin(int64_t maskId, int32_t policy, float threshold, float temperature)
    : mMaskId(maskId)
    , mPolicy(policy)
    , mThreshold(threshold)
    , mTemperature(temperature)
{
}

IPluginCapability* RemaskPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* RemaskPlugin::clone() noexcept
{
    try
    {
        return new RemaskPlugin(mMaskId, mPolicy, mThreshold, mTemperature);
    }
    catch (std::exception const&)
    {
        return nullptr;
    }
}

char const* RemaskPlugin::getPluginName() const noexcept
{
    return kName;
}

char const* RemaskPlugin::getPluginVersion() const noexcept
{
    return kVersion;
}

char const* RemaskPlugin::getPluginNamespace() const noexcept
{
    return kNamespace;
}

int32_t RemaskPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t RemaskPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* /*inputTypes*/, int32_t nbInputs) const noexcept
{
    if (nbOutputs != kNbOutputs || nbInputs != kNbInputs)
    {
        return -1;
    }
    outputTypes[0] = DataType::kINT64; // canvas_out
    outputTypes[1] = DataType::kINT64; // token
    outputTypes[2] = DataType::kFLOAT; // confidence
    outputTypes[3] = DataType::kINT32; // commit (0/1: no kBOOL at a plugin's boundary)
    return 0;
}

int32_t RemaskPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[1].nbDims != 2)
    {
        return -1;
    }
    for (int32_t i = 0; i < kNbOutputs; ++i)
    {
        outputs[i] = inputs[1]; // [B, L] like the canvas
    }
    return 0;
}

bool RemaskPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
    case 1:
    case 3:
    case 5:
    case 6: return d.type == DataType::kINT64;
    case 2:                                          // active, commit: INT32 0/1 (kBOOL is unsupported
    case 8: return d.type == DataType::kINT32;       // for plugin I/O; the graph casts around the node)
    case 4:
    case 7: return d.type == DataType::kFLOAT;
    default: return false;
    }
}

int32_t RemaskPlugin::configurePlugin(
    DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    return (nbInputs == kNbInputs && nbOutputs == kNbOutputs) ? 0 : -1;
}

size_t RemaskPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t RemaskPlugin::onShapeChange(
    PluginTensorDesc const* /*in*/, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    return (nbInputs == kNbInputs && nbOutputs == kNbOutputs) ? 0 : -1;
}

int32_t RemaskPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    Dims const& d = inputDesc[0].dims; // [B, L, V]
    int32_t const dtype = toKernelDType(inputDesc[0].type);
    if (d.nbDims != 3 || dtype < 0)
    {
        return -1;
    }
    cudaError_t const err = nemodiffRemaskLaunch(inputs[0], dtype, static_cast<int64_t const*>(inputs[1]),
        static_cast<int32_t const*>(inputs[2]), static_cast<int64_t const*>(inputs[3]), static_cast<float const*>(inputs[4]),
        static_cast<int64_t*>(outputs[0]), static_cast<int64_t*>(outputs[1]), static_cast<float*>(outputs[2]),
        static_cast<int32_t*>(outputs[3]), static_cast<int32_t>(d.d[0]), static_cast<int32_t>(d.d[1]),
        static_cast<int32_t>(d.d[2]), mMaskId, mPolicy, mThreshold, mTemperature, stream);
    return err == cudaSuccess ? 0 : -1;
}

IPluginV3* RemaskPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* RemaskPlugin::getFieldsToSerialize() noexcept
{
    mMaskIdField = static_cast<int32_t>(mMaskId);
    mPolicyField = mPolicy == kRemaskTopK ? "topk" : "threshold";
    mFields.clear();
    mFields.emplace_back("mask_id", &mMaskIdField, PluginFieldType::kINT32, 1);
    mFields.emplace_back("policy", mPolicyField.c_str(), PluginFieldType::kCHAR,
        static_cast<int32_t>(mPolicyField.size() + 1));
    mFields.emplace_back("threshold", &mThreshold, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("temperature", &mTemperature, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

RemaskPluginCreator::RemaskPluginCreator()
{
    mFields.emplace_back("mask_id", nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back("policy", nullptr, PluginFieldType::kCHAR, 0);
    mFields.emplace_back("threshold", nullptr, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("temperature", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* RemaskPluginCreator::getPluginName() const noexcept
{
    return kName;
}

char const* RemaskPluginCreator::getPluginVersion() const noexcept
{
    return kVersion;
}

char const* RemaskPluginCreator::getPluginNamespace() const noexcept
{
    return kNamespace;
}

PluginFieldCollection const* RemaskPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* RemaskPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int64_t maskId = 0;
        int32_t policy = kRemaskThreshold;
        float threshold = 0.9F;
        float temperature = 0.F;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.data == nullptr)
            {
                continue;
            }
            if (!std::strcmp(f.name, "mask_id"))
            {
                maskId = f.type == PluginFieldType::kINT64 ? *static_cast<int64_t const*>(f.data)
                                                           : *static_cast<int32_t const*>(f.data);
            }
            else if (!std::strcmp(f.name, "policy"))
            {
                std::string const p(static_cast<char const*>(f.data), strnlen(static_cast<char const*>(f.data), f.length));
                if (p == "topk")
                {
                    policy = kRemaskTopK;
                }
                else if (p != "threshold")
                {
                    return nullptr;
                }
            }
            else if (!std::strcmp(f.name, "threshold"))
            {
                threshold = *static_cast<float const*>(f.data);
            }
            else if (!std::strcmp(f.name, "temperature"))
            {
                temperature = *static_cast<float const*>(f.data);
            }
            // other fields (plugin_version, plugin_namespace from the ONNX node) are ignored
        }
        return new RemaskPlugin(maskId, policy, threshold, temperature);
    }
    catch (std::exception const&)
    {
        return nullptr;
    }
}

} // namespace nemodiff

// Entry points IPluginRegistry::loadLibrary looks for (TensorRT >= 10: getCreators for V3 creators).
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* /*finder*/) {}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nemodiff::RemaskPluginCreator remaskCreator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&remaskCreator};
    nbCreators = 1;
    return creators;
}
