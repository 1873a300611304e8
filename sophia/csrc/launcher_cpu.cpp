/*
---
title: The CPU build of the launcher
summary: The CUDA launcher and kernel, compiled as C++ with the emulation header in front.
---

Say that this is the emulation, bring in the [emulation header](cpu_emulation.html),
and include the CUDA launcher's source, which includes the kernel's: a C++ compiler
compiles the text that `nvcc` compiles, nothing copied or rewritten. The
[binding](binding.html) links against this file in the CPU build and against
`sophia_launcher.cu` in the CUDA build; the flags are on
[how the fused kernel is built](../../engineering/kernel.md).
*/
#define SOPHIA_CPU_EMULATION
#include "cpu_emulation.h"
#include "sophia_launcher.cu"
