// Compiled with the scalar flags set in CMakeLists.txt.
#define SPECEXT_ISA_TABLE kIsaScalar
#define SPECEXT_ISA_NAME "scalar"
#include "cpu_isa.h"
