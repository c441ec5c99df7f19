// Stand-in for TensorRT's NvInfer.h (see NvInferRuntime.h here): the plugin source needs nothing beyond it.
#pragma once

#include "NvInferRuntime.h"
