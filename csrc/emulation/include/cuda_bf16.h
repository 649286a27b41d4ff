// CUDA emulation stand-in for <cuda_bf16.h> (see kfac_emulation/half.h).
#pragma once

#include "kfac_emulation/half.h"
