// Sizes and alignments of the parameter structs as the C++ compiler lays
// them out, so a Rust test can check its #[repr(C)] mirrors against them.
#include <cstring>

#include "../params.h"

#define AF_LAYOUT(Struct)                 \
  if (std::strcmp(name, #Struct) == 0) {  \
    *align = alignof(Struct);             \
    return sizeof(Struct);                \
  }

extern "C" size_t af_emu_params_layout(const char* name, size_t* align) {
  AF_LAYOUT(LinearParams)
  AF_LAYOUT(LinearEpilogueParams)
  AF_LAYOUT(LayerNormParams)
  AF_LAYOUT(ImportanceParams)
  AF_LAYOUT(MeanTokensParams)
  AF_LAYOUT(GatherRowsParams)
  AF_LAYOUT(ColumnSumsParams)
  AF_LAYOUT(AttentionParams)
  AF_LAYOUT(AttentionBackwardParams)
  AF_LAYOUT(ClusterRatioParams)
  AF_LAYOUT(ClusterKeysParams)
  AF_LAYOUT(StableSortParams)
  AF_LAYOUT(ClusterMeansParams)
  AF_LAYOUT(NeighbourhoodParams)
  AF_LAYOUT(ClusterXKeysParams)
  AF_LAYOUT(SelectionKeysParams)
  AF_LAYOUT(SelectionOrderParams)
  AF_LAYOUT(SelectionCheckParams)
  AF_LAYOUT(MergeParams)
  AF_LAYOUT(MergeBackwardParams)
  AF_LAYOUT(ImportanceBackwardParams)
  AF_LAYOUT(DenseParams)
  AF_LAYOUT(Im2colParams)
  *align = 0;
  return 0;
}
