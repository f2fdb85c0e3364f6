// The CPU kernels for any x86-64 (or other) processor: the compiler's default target.
#define GPTEXT_CPU_ISA baseline
#include "cpu_impl.h"
