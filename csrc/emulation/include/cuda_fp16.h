// CUDA emulation stand-in for <cuda_fp16.h> (see kfac_emulation/half.h).
#pragma once

#include "kfac_emulation/half.h"
