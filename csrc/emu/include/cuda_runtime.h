// CUDA emulator stand-in (tests only): see csrc/emu/README.md.
#pragma once
#include "dlmkern_emu/device.h"
