// CUDA emulation stand-in for <cuda_runtime.h>: the runtime API and the device built-ins (see
// kfac_emulation/*.h). Only on the include path of the emulated build.
#pragma once

#include "kfac_emulation/device.h"
#include "kfac_emulation/launch.h"
#include "kfac_emulation/runtime.h"
