/*
---
title: The CPU build of the launcher
summary: The CUDA launcher and kernel, compiled as C++ with the emulation header in front.
---

# The CPU build of the launcher

Three lines: say that this is the emulation, bring in the
[emulation header](cpu_emulation.html), and include the CUDA launcher's source,
which includes the kernel's. Nothing is copied or rewritten: a C++ compiler compiles
the text that `nvcc` compiles. The [binding](binding.html) links against this file in
the CPU build and against `sophia_launcher.cu` in the CUDA build.

Build with `-ffp-contract=off` (see the emulation header), and with `-fopenmp` to run
the blocks of a launch in parallel.
*/
#define SOPHIA_CPU_EMULATION
#include "cpu_emulation.h"
#include "sophia_launcher.cu"
