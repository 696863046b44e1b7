//! `#[repr(C)]` mirrors of `kernels/params.h`, field for field: each kernel
//! takes one of these by value. Pointers are device addresses ([`Ptr`]; 0 is
//! null). `layout_matches_the_c_header` checks sizes and alignments against
//! the C++ compiler's.

/// A device address (a host address in the emulator); 0 is null.
pub type Ptr = u64;

/// out = act(x · weightᵀ + bias), or residual + gamma ∘ act(...) with a residual.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearParams {
    /// T, rows × in_dim
    pub x: Ptr,
    /// T, out_dim × in_dim
    pub weight: Ptr,
    /// T, out_dim, or null
    pub bias: Ptr,
    /// T, rows × out_dim, or null (may alias out)
    pub residual: Ptr,
    /// out_dim layer scale, or null (with a residual only)
    pub gamma: Ptr,
    /// T, rows × out_dim
    pub out: Ptr,
    pub rows: i32,
    pub in_dim: i32,
    pub out_dim: i32,
    /// 1: GELU before the residual
    pub gelu: i32,
}

/// torch.nn.LayerNorm over the last dimension (biased variance).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerNormParams {
    /// T, rows × dim
    pub x: Ptr,
    /// dim
    pub weight: Ptr,
    /// dim
    pub bias: Ptr,
    /// T, rows × dim (may alias x)
    pub out: Ptr,
    pub rows: i32,
    pub dim: i32,
    pub eps: f32,
}

/// importance = sigmoid(x · weight + bias), kept in f32.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportanceParams {
    /// T, rows × dim
    pub x: Ptr,
    /// dim
    pub weight: Ptr,
    /// f32, rows
    pub out: Ptr,
    pub rows: i32,
    pub dim: i32,
    pub bias: f32,
}

/// Mean over tokens: `out[img][c] = mean_i x[img][i][c]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MeanTokensParams {
    /// T, batch × tokens × channels
    pub x: Ptr,
    /// T, batch × channels
    pub out: Ptr,
    pub batch: i32,
    pub tokens: i32,
    pub channels: i32,
}

/// `out[img][r] = in[img][index[img][r]]` (rows of `width` elements).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GatherRowsParams {
    /// T, batch × in_rows × width
    pub r#in: Ptr,
    /// batch × out_rows, each < in_rows
    pub index: Ptr,
    /// T, batch × out_rows × width
    pub out: Ptr,
    pub batch: i32,
    pub in_rows: i32,
    pub out_rows: i32,
    pub width: i32,
    pub index_images: i32,
}

/// Fused cluster attention (spec §6): logits `q·k + P(f) − 100·[masked]`,
/// blank token, softmax and the weighted sum of values, per query and head.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionParams {
    /// T, batch × tokens × heads·head_dim (unscaled)
    pub q: Ptr,
    /// T, batch × tokens × 2·heads·head_dim
    pub kv: Ptr,
    /// nbhd_images × tokens × m, or null: global (m = tokens)
    pub nbhd: Ptr,
    /// nbhd_images × tokens × m, or null: all valid
    pub mask: Ptr,
    /// batch × tokens × 2
    pub pos: Ptr,
    /// heads × 5: pos_embed weight
    pub pos_weight: Ptr,
    /// heads
    pub pos_bias: Ptr,
    /// heads·head_dim
    pub blank_k: Ptr,
    /// heads·head_dim
    pub blank_v: Ptr,
    /// T, batch × tokens × heads·head_dim
    pub out: Ptr,
    pub batch: i32,
    pub tokens: i32,
    pub m: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub nbhd_images: i32,
    pub q_scale: f32,
    /// offsets are clamped to ±this (segmentation: 511)
    pub offset_clamp: f32,
    /// Tiled kernel only: the clusters' size, and how many distinct
    /// neighbour clusters per block are staged in shared memory.
    pub cluster_size: i32,
    pub tile_clusters: i32,
}

/// Backward of the cluster attention (kernels/cluster_attention_backward.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionBackwardParams {
    /// the forward's inputs (forward.out unused)
    pub forward: AttentionParams,
    /// T, batch × tokens × c: the forward's output
    pub out: Ptr,
    /// T, batch × tokens × c
    pub grad_out: Ptr,
    /// nbhd_images × (tokens + 1), or null: global
    pub inv_start: Ptr,
    /// nbhd_images × tokens·m × 2: (query, slot)
    pub inv_pairs: Ptr,
    /// batch × tokens × heads
    pub lse: Ptr,
    /// batch × tokens × heads
    pub delta: Ptr,
    /// T, batch × tokens × c
    pub grad_q: Ptr,
    /// T, batch × tokens × 2c
    pub grad_kv: Ptr,
    /// batch·tokens × params: each row's share
    pub row_partials: Ptr,
    /// params = 6·heads + 2·c: pos_weight, pos_bias, blank_k, blank_v
    pub grad_params: Ptr,
    pub params: i32,
}

/// Clustering step 1 (spec §3.4): anchor rank and progress ratio per token,
/// and the batch's largest ratio.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterRatioParams {
    /// count × 2
    pub pos: Ptr,
    /// anchors × 2, snake order
    pub prev: Ptr,
    /// anchors × 2
    pub next: Ptr,
    /// count
    pub rank: Ptr,
    /// count
    pub ratio: Ptr,
    /// count / group: bits of each group's largest ratio (zeroed before)
    pub max_ratio: Ptr,
    /// tokens, tokens sharing one normaliser (n or b·n)
    pub count: i32,
    pub group: i32,
    pub pw: i32,
    pub ph: i32,
    pub cell_w: f32,
    pub cell_h: f32,
}

/// Clustering step 2 (spec §3.5): key = rank · (max + 1) + ratio.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterKeysParams {
    /// count
    pub rank: Ptr,
    /// count
    pub ratio: Ptr,
    /// count / group
    pub max_ratio: Ptr,
    /// count
    pub keys: Ptr,
    pub count: i32,
    pub group: i32,
}

/// One pass of the stable merge sort of each image's keys (`sort.cu`):
/// merges pairs of sorted runs of `width` element indices, ordered by
/// (key, index).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct StableSortParams {
    /// batch × n
    pub keys: Ptr,
    /// batch × n: runs of `width` sorted; null: the identity
    pub src: Ptr,
    /// batch × n: runs of 2·width sorted
    pub dst: Ptr,
    pub batch: i32,
    pub n: i32,
    pub width: i32,
}

/// Cluster means of consecutive runs of `size` tokens (valid members only).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterMeansParams {
    /// batch × n × 2, clustered order
    pub pos: Ptr,
    /// batch × clusters × 2
    pub means: Ptr,
    pub batch: i32,
    pub n: i32,
    pub size: i32,
    pub clusters: i32,
}

/// The nnc nearest cluster means of every token (exact, ties to the lower
/// cluster), written as neighbour lists of their members (spec §4).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NeighbourhoodParams {
    /// batch × n × 2
    pub pos: Ptr,
    /// batch × clusters × 2
    pub means: Ptr,
    /// batch × clusters: each image's clusters by ascending mean x
    pub by_x: Ptr,
    /// batch × n × nnc·size
    pub nbhd: Ptr,
    /// batch × n × nnc·size, or null when n = clusters·size
    pub mask: Ptr,
    pub batch: i32,
    pub n: i32,
    pub clusters: i32,
    pub nnc: i32,
    pub size: i32,
}

/// The x of every cluster mean, as sort keys.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterXKeysParams {
    /// batch × clusters × 2
    pub means: Ptr,
    /// batch × clusters
    pub keys: Ptr,
    pub batch: i32,
    pub clusters: i32,
}

/// Token selection keys (spec §7): −(grid prior + alpha · importance), or +inf
/// for reserve tokens, so a stable ascending sort gives the new order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SelectionKeysParams {
    /// batch × n × 2
    pub pos: Ptr,
    /// batch × n
    pub importance: Ptr,
    /// batch × n
    pub keys: Ptr,
    /// batch, zeroed before: reserve tokens per image
    pub reserve_count: Ptr,
    pub batch: i32,
    pub n: i32,
    pub stride: i32,
    pub alpha: f32,
}

/// The kept tokens: the first `sampled` of the sorted order, then the
/// `reserve` tokens at its end.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SelectionOrderParams {
    /// batch × n
    pub sorted: Ptr,
    /// batch × (sampled + reserve)
    pub order: Ptr,
    pub batch: i32,
    pub n: i32,
    pub sampled: i32,
    pub reserve: i32,
}

/// PointConv merge (spec §7): `u[i][ic·C + c] = Σ_j w_ij[ic] · p_j · mask_ij · x_j[c]`,
/// w_ij = GELU(LN(Linear(5 → 4)(f_ij))) computed from the positions.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeParams {
    /// T, batch × n × channels
    pub feat: Ptr,
    /// batch × n
    pub importance: Ptr,
    /// nbhd_images × n × m, or null: global (m = n)
    pub nbhd: Ptr,
    /// nbhd_images × n × m, or null
    pub mask: Ptr,
    /// batch × kept
    pub centres: Ptr,
    /// batch × n × 2
    pub pos: Ptr,
    /// 4 × 5
    pub net_weight: Ptr,
    /// 4
    pub net_bias: Ptr,
    /// 4
    pub norm_weight: Ptr,
    /// 4
    pub norm_bias: Ptr,
    /// T, batch × kept × 4·channels
    pub out: Ptr,
    pub batch: i32,
    pub n: i32,
    pub m: i32,
    pub nbhd_images: i32,
    pub kept: i32,
    pub channels: i32,
    pub offset_clamp: f32,
    pub eps: f32,
}

/// Backward of the PointConv merge (kernels/pointconv_merge_backward.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeBackwardParams {
    /// the forward's inputs (forward.out unused)
    pub forward: MergeParams,
    /// T, batch × kept × 4·channels
    pub grad_out: Ptr,
    /// nbhd_images × (n + 1), or null: global
    pub inv_start: Ptr,
    /// nbhd_images × n·m × 2: (query, slot)
    pub inv_pairs: Ptr,
    /// batch × n: each centre's output row, −1 for other tokens
    pub centre_row: Ptr,
    /// T, batch × n × channels
    pub grad_feat: Ptr,
    /// batch × n
    pub grad_importance: Ptr,
    /// batch·kept × 32: each centre's share
    pub row_partials: Ptr,
    /// 32: net_weight (4×5), net_bias, norm_weight, norm_bias (4 each)
    pub grad_params: Ptr,
}

/// Backward of the importance p = sigmoid(x·w + b).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportanceBackwardParams {
    /// T, rows × dim
    pub x: Ptr,
    /// dim
    pub weight: Ptr,
    /// rows: the forward's output
    pub p: Ptr,
    /// rows
    pub grad_p: Ptr,
    /// T, rows × dim
    pub grad_x: Ptr,
    /// rows × (dim + 1)
    pub row_partials: Ptr,
    /// dim + 1: dw, then db
    pub grad_params: Ptr,
    pub rows: i32,
    pub dim: i32,
}

/// Tokens onto the h × w grid; empty cells by inverse-distance weighting of
/// the k nearest tokens (ties to the lower index).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseParams {
    /// batch × n × 2
    pub pos: Ptr,
    /// T, batch × n × channels
    pub feat: Ptr,
    /// T, batch × channels × h × w
    pub out: Ptr,
    pub batch: i32,
    pub n: i32,
    pub channels: i32,
    pub h: i32,
    pub w: i32,
    pub k: i32,
    pub power: f32,
}

/// A kernel parameter struct: plain data, laid out as its C twin.
///
/// # Safety
/// Implementors are `#[repr(C)]` mirrors of a struct in `kernels/params.h`.
pub unsafe trait KernelParams: Copy + cudarc::driver::DeviceRepr + 'static {}

macro_rules! kernel_params {
    ($($name:ident),* $(,)?) => {
        $(
            // SAFETY: a #[repr(C)] mirror of the C struct of the same name.
            unsafe impl cudarc::driver::DeviceRepr for $name {}
            // SAFETY: as above.
            unsafe impl KernelParams for $name {}
        )*
        /// Every struct's name, size and alignment.
        #[cfg(test)]
        const LAYOUTS: &[(&str, usize, usize)] = &[
            $((stringify!($name), size_of::<$name>(), align_of::<$name>())),*
        ];
    };
}

/// im2col of a 3×3, stride-2, padding-1 convolution (spec §2): patches in
/// PyTorch's weight order (ci, ky, kx), zero outside the input.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Im2colParams {
    /// T, batch × image_stride
    pub input: Ptr,
    /// T, batch × (oh·ow) × channels·9
    pub out: Ptr,
    pub batch: i32,
    pub channels: i32,
    pub ih: i32,
    pub iw: i32,
    pub oh: i32,
    pub ow: i32,
    pub image_stride: i64,
    pub channel_stride: i64,
    pub pixel_stride: i64,
}

kernel_params!(
    LinearParams,
    LayerNormParams,
    ImportanceParams,
    MeanTokensParams,
    GatherRowsParams,
    AttentionParams,
    AttentionBackwardParams,
    ClusterRatioParams,
    ClusterKeysParams,
    StableSortParams,
    ClusterMeansParams,
    NeighbourhoodParams,
    ClusterXKeysParams,
    SelectionKeysParams,
    SelectionOrderParams,
    MergeParams,
    MergeBackwardParams,
    ImportanceBackwardParams,
    DenseParams,
    Im2colParams
);

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn af_emu_params_layout(name: *const core::ffi::c_char, align: *mut usize) -> usize;
    }

    #[test]
    fn layout_matches_the_c_header() {
        for &(name, size, align) in LAYOUTS {
            let c_name = std::ffi::CString::new(name).unwrap();
            let mut c_align = 0usize;
            // SAFETY: a NUL-terminated name and a valid out-pointer.
            let c_size = unsafe { af_emu_params_layout(c_name.as_ptr(), &mut c_align) };
            assert_eq!((size, align), (c_size, c_align), "{name}");
        }
    }
}
