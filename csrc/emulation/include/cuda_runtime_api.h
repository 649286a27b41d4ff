// CUDA emulation stand-in for <cuda_runtime_api.h> (see kfac_emulation/runtime.h).
#pragma once

#include "kfac_emulation/runtime.h"
