// Compiled with the avx2 flags set in CMakeLists.txt.
#define SPECEXT_ISA_TABLE kIsaAvx2
#define SPECEXT_ISA_NAME "avx2"
#include "cpu_isa.h"
