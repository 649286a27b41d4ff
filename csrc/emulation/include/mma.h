// CUDA emulation stand-in for <mma.h> (see kfac_emulation/wmma.h).
#pragma once

#include "kfac_emulation/wmma.h"
