// The CPU inner loops of all three kernel families for one instruction set: included by
// cpu_isa_scalar.cpp, cpu_isa_avx2.cpp and cpu_isa_avx512.cpp, each compiled with its own
// flags, and picked at run time (cpu_dispatch.cpp). Everything the family headers define
// has internal linkage; only the table SPECEXT_ISA_TABLE is exported, so no instruction of
// a wider ISA can leak into another path through a shared inline function.
#pragma once
#include "accumulate_isa.h"
#include "cpu_isa_table.h"
#include "norms_isa.h"
#include "specialization_isa.h"

namespace specext {

extern const IsaTable SPECEXT_ISA_TABLE;
const IsaTable SPECEXT_ISA_TABLE = {SPECEXT_ISA_NAME, accum_row, sqnorm_row, sqsum, spec_tile};

}  // namespace specext
