/* The two NVTX calls src/nvtx.rs makes, as plain exported functions. The
 * NVTX3 implementation is compiled in from the vendored headers
 * (third_party/nvtx3), with static linkage, so it cannot clash with another
 * library's copy; on the first call it looks for a tool
 * (NVTX_INJECTION64_PATH) and, without one, turns every call into a no-op. */
#include "nvtx3/nvToolsExt.h"

int autofocus_nvtx_range_push(const char* message) { return nvtxRangePushA(message); }

int autofocus_nvtx_range_pop(void) { return nvtxRangePop(); }
