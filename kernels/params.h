// Parameter structs of every kernel, one per kernel family, passed by value.
// Pointers are device addresses (host addresses in the emulator). `T` marks
// the storage type of the kernel instance (f32, f16 or bf16); shapes trail
// every indexed buffer.
//
// src/gpu/params/generated.rs is generated from this file by bindgen
// (`scripts/generate-params.sh`; CI fails when it is stale), doc comments
// (/// and ///<) included; a test checks sizes and alignments against the
// C++ compiler's.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC has no C library headers: the fixed-width types these structs use.
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#elif defined(__CUDACC__)
#include <stdint.h>
#else
#include <cstdint>
#endif

/// out = act(x · weightᵀ + bias), or residual + gamma ∘ act(...) with a residual.
struct LinearParams {
  const void* x;         ///< T, rows × in_dim
  const void* weight;    ///< T, out_dim × in_dim
  const void* bias;      ///< T, out_dim, or null
  const void* residual;  ///< T, rows × out_dim, or null (may alias out)
  const float* gamma;    ///< out_dim layer scale, or null (with a residual only)
  void* out;             ///< T, rows × out_dim
  int32_t rows, in_dim, out_dim;
  int32_t gelu;          ///< 1: GELU before the residual
};

/// A linear layer's epilogue over a product computed elsewhere (cuBLASLt):
/// out = act(product + b), optionally residual + gamma ∘ (...), as `linear`.
struct LinearEpilogueParams {
  const float* product;  ///< rows × out_dim, x · Wᵀ in f32
  const void* bias;      ///< T, out_dim, or null
  const void* residual;  ///< T, rows × out_dim, or null (may alias out)
  const float* gamma;    ///< out_dim layer scale, or null (with a residual only)
  void* out;             ///< T, rows × out_dim
  int32_t rows, out_dim;
  int32_t gelu;          ///< 1: GELU before the residual
};

/// torch.nn.LayerNorm over the last dimension (biased variance).
struct LayerNormParams {
  const void* x;         ///< T, rows × dim
  const float* weight;   ///< dim
  const float* bias;     ///< dim
  void* out;             ///< T, rows × dim (may alias x)
  int32_t rows, dim;
  float eps;
};

/// importance = sigmoid(x · weight + bias), kept in f32.
struct ImportanceParams {
  const void* x;         ///< T, rows × dim
  const float* weight;   ///< dim
  void* out;             ///< f32, rows
  int32_t rows, dim;
  float bias;
};

/// Mean over tokens: out[img][c] = mean_i x[img][i][c].
struct MeanTokensParams {
  const void* x;         ///< T, batch × tokens × channels
  void* out;             ///< T, batch × channels
  int32_t batch, tokens, channels;
};

/// out[img][r] = in[img][index[img][r]] (rows of `width` elements); with
/// index_images = 1 every image uses the same index row.
struct GatherRowsParams {
  const void* input;      ///< T, batch × in_rows × width
  const int32_t* index;   ///< index_images × out_rows, each < in_rows
  void* out;              ///< T, batch × out_rows × width
  int32_t batch, in_rows, out_rows, width, index_images;
};

/// Column sums over fixed chunks of rows, for the parameter gradients of the
/// backward (each row's share summed without atomics): launch block
/// (x, y) writes sums[x][k] = input[x·chunk][k] + … + input[x·chunk +
/// chunk − 1][k] (fewer in the last chunk), added in row order, for the
/// columns k that block y's threads cover.
struct ColumnSumsParams {
  const float* input;     ///< rows × cols
  float* sums;            ///< ceil(rows / chunk) × cols
  int32_t rows, cols, chunk;
};

/// Fused cluster attention (spec §6): logits q·k + P(f) − 100·[masked],
/// blank token, softmax and the weighted sum of values, per query and head.
struct AttentionParams {
  const void* q;             ///< T, batch × tokens × heads·head_dim (unscaled)
  const void* kv;            ///< T, batch × tokens × 2·heads·head_dim
  const int32_t* nbhd;       ///< nbhd_images × tokens × m, or null: global (m = tokens)
  const uint8_t* mask;       ///< nbhd_images × tokens × m, or null: all valid
  const float* pos;          ///< batch × tokens × 2
  const float* pos_weight;   ///< heads × 5: pos_embed weight
  const float* pos_bias;     ///< heads
  const float* blank_k;      ///< heads·head_dim
  const float* blank_v;      ///< heads·head_dim
  void* out;                 ///< T, batch × tokens × heads·head_dim
  int32_t batch, tokens, m, heads, head_dim, nbhd_images;
  float q_scale;
  float offset_clamp;        ///< offsets are clamped to ±this (segmentation: 511)
  /// Tiled kernel only: neighbour lists are whole clusters of cluster_size
  /// consecutive tokens (tokens in clustered order); up to tile_clusters
  /// distinct neighbour clusters per block are staged in shared memory, in
  /// rows of tile_row_stride elements of T.
  int32_t cluster_size, tile_clusters, tile_row_stride;
  /// Tiled kernel only: 1 keeps each query's neighbour features in shared
  /// memory for all heads; 0 recomputes them per head (room for the tile).
  int32_t features_stored;
};

/// Backward of the cluster attention (kernels/cluster_attention_backward.cu).
/// The query kernel recomputes each row's log-sum-exp and D = dO·O and
/// writes dq and the row's share of the parameter gradients; the key kernel
/// gathers dk, dv over the inverse lists (the tiled one, for lists of whole
/// clusters of forward.cluster_size, with its cluster's holders staged);
/// column_sums then adds the rows' shares (ColumnSumsParams).
struct AttentionBackwardParams {
  AttentionParams forward;   ///< the forward's inputs (forward.out unused)
  const void* out;           ///< T, batch × tokens × c: the forward's output
  const void* grad_out;      ///< T, batch × tokens × c
  const int32_t* inv_start;  ///< nbhd_images × (tokens + 1), or null: global
  const int32_t* inv_pairs;  ///< nbhd_images × tokens·m × 2: (query, slot)
  float* lse;                ///< batch × tokens × heads
  float* delta;              ///< batch × tokens × heads
  void* grad_q;              ///< T, batch × tokens × c
  void* grad_kv;             ///< T, batch × tokens × 2c
  /// batch·tokens × (6·heads + 2·c): each row's share of the gradients of
  /// pos_weight, pos_bias, blank_k and blank_v
  float* row_partials;
  /// Tiled key kernel: the most holder queries a block stages
  int32_t staged_queries;
  /// Tiled key kernel: elements of T per staged row (an odd number of
  /// 4-byte words)
  int32_t staged_row_stride;
};

/// Clustering step 1 (spec §3.4): anchor rank and progress ratio per token,
/// and the batch's largest ratio.
struct ClusterRatioParams {
  const float* pos;          ///< count × 2
  const float* prev;         ///< anchors × 2, snake order
  const float* next;         ///< anchors × 2
  int32_t* rank;             ///< count
  float* ratio;              ///< count
  uint32_t* max_ratio;       ///< count / group: bits of each group's largest ratio (zeroed before)
  /// count: tokens; group: tokens sharing one normaliser (n or b·n).
  int32_t count, group;
  int32_t pw, ph;
  float cell_w, cell_h;
};

/// Clustering step 2 (spec §3.5): key = rank · (max + 1) + ratio.
struct ClusterKeysParams {
  const int32_t* rank;       ///< count
  const float* ratio;        ///< count
  const uint32_t* max_ratio; ///< count / group
  float* keys;               ///< count
  int32_t count, group;
};

/// One pass of the stable merge sort of each image's keys (sort.cu): merges
/// pairs of sorted runs of `width` element indices, ordered by (key, index).
struct StableSortParams {
  const float* keys;         ///< batch × n
  const int32_t* src;        ///< batch × n: runs of `width` sorted; null: the identity
  int32_t* dst;              ///< batch × n: runs of 2·width sorted
  int32_t batch, n, width;
};

/// Cluster means of consecutive runs of `size` tokens (valid members only).
struct ClusterMeansParams {
  const float* pos;          ///< batch × n × 2, clustered order
  float* means;              ///< batch × clusters × 2
  int32_t batch, n, size, clusters;
};

/// The nnc nearest cluster means of every token (exact, ties to the lower
/// cluster), written as neighbour lists of their members (spec §4).
struct NeighbourhoodParams {
  const float* pos;          ///< batch × n × 2
  const float* means;        ///< batch × clusters × 2
  const int32_t* by_x;       ///< batch × clusters: each image's clusters by ascending mean x
  int32_t* nbhd;             ///< batch × n × nnc·size
  uint8_t* mask;             ///< batch × n × nnc·size, or null when n = clusters·size
  int32_t batch, n, clusters, nnc, size;
};

/// The x of every cluster mean, as sort keys.
struct ClusterXKeysParams {
  const float* means;        ///< batch × clusters × 2
  float* keys;               ///< batch × clusters
  int32_t batch, clusters;
};

/// Token selection keys (spec §7): −(grid prior + alpha · importance), or +inf
/// for reserve tokens, so a stable ascending sort gives the new order.
struct SelectionKeysParams {
  const float* pos;          ///< batch × n × 2
  const float* importance;   ///< batch × n
  float* keys;               ///< batch × n
  int32_t* reserve_count;    ///< batch, zeroed before: reserve tokens per image
  int32_t batch, n, stride;
  float alpha;
};

/// The kept tokens: the first `sampled` of the sorted order, then the
/// `reserve` tokens at its end.
struct SelectionOrderParams {
  const int32_t* sorted;     ///< batch × n
  int32_t* order;            ///< batch × (sampled + reserve)
  int32_t batch, n, sampled, reserve;
};

/// Checks the reserve counts `selection_keys` found against the count the
/// host expects from the grid: any image that differs sets `mismatch[0]`
/// (read once, after the forward, instead of a read-back per merge).
struct SelectionCheckParams {
  const int32_t* reserve_count;  ///< batch
  int32_t* mismatch;             ///< 1 value, zeroed once per forward
  int32_t batch, reserve;
};

/// PointConv merge (spec §7): u[i][ic·C + c] = Σ_j w_ij[ic] · p_j · mask_ij · x_j[c],
/// w_ij = GELU(LN(Linear(5 → 4)(f_ij))) computed from the positions.
struct MergeParams {
  const void* feat;          ///< T, batch × n × channels
  const float* importance;   ///< batch × n
  const int32_t* nbhd;       ///< nbhd_images × n × m, or null: global (m = n)
  const uint8_t* mask;       ///< nbhd_images × n × m, or null
  const int32_t* centres;    ///< batch × kept
  const float* pos;          ///< batch × n × 2
  const float* net_weight;   ///< 4 × 5
  const float* net_bias;     ///< 4
  const float* norm_weight;  ///< 4
  const float* norm_bias;    ///< 4
  void* out;                 ///< T, batch × kept × 4·channels
  int32_t batch, n, m, nbhd_images, kept, channels;
  float offset_clamp, eps;
};

/// Backward of the PointConv merge (kernels/pointconv_merge_backward.cu).
struct MergeBackwardParams {
  MergeParams forward;       ///< the forward's inputs (forward.out unused)
  const void* grad_out;      ///< T, batch × kept × 4·channels
  const int32_t* inv_start;  ///< nbhd_images × (n + 1), or null: global
  const int32_t* inv_pairs;  ///< nbhd_images × n·m × 2: (query, slot)
  int32_t* centre_row;       ///< batch × n: each centre's output row, −1 for other tokens
  void* grad_feat;           ///< T, batch × n × channels
  float* grad_importance;    ///< batch × n
  /// batch·kept × 32: each centre's share of the gradients of net_weight
  /// (4×5), net_bias, norm_weight and norm_bias (4 each)
  float* row_partials;
};

/// Backward of the importance p = sigmoid(x·w + b): dx, and the rows' shares
/// of dw, db (added by column_sums).
struct ImportanceBackwardParams {
  const void* x;          ///< T, rows × dim
  const float* weight;    ///< dim
  const float* p;         ///< rows: the forward's output
  const float* grad_p;    ///< rows
  void* grad_x;           ///< T, rows × dim
  float* row_partials;    ///< rows × (dim + 1): each row's share of dw, then db
  int32_t rows, dim;
};

/// Tokens onto the h × w grid; empty cells by inverse-distance weighting of
/// the k nearest tokens (ties to the lower index).
struct DenseParams {
  const float* pos;          ///< batch × n × 2
  const void* feat;          ///< T, batch × n × channels
  void* out;                 ///< T, batch × channels × h × w
  /// batch × h × w: n − (the lowest token on the cell), 0 when empty
  /// (written by dense_occupancy); null: to_dense scans every token
  int32_t* occupancy;
  int32_t batch, n, channels, h, w, k;
  float power;
};

/// im2col of a 3×3, stride-2, padding-1 convolution (spec §2): patches in
/// PyTorch's weight order (ci, ky, kx), zero outside the input. Channel ci
/// of pixel (y, x) of image img is
/// input[img·image_stride + ci·channel_stride + (y·iw + x)·pixel_stride].
struct Im2colParams {
  const void* input;   ///< T, batch × image_stride
  void* out;           ///< T, batch × (oh·ow) × channels·9
  int32_t batch, channels, ih, iw, oh, ow;
  int64_t image_stride, channel_stride, pixel_stride;
};
