// Compiled with the avx512 flags set in CMakeLists.txt.
#define SPECEXT_ISA_TABLE kIsaAvx512
#define SPECEXT_ISA_NAME "avx512"
#include "cpu_isa.h"
