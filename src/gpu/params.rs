//! The kernels' parameter structs: each kernel takes one of these by value.
//! They are generated from `kernels/params.h` by bindgen
//! (`scripts/generate-params.sh`, checked in as [`generated`]; CI fails when
//! it is stale), pointers as device addresses ([`Ptr`]; 0 is null).
//! `layout_matches_the_c_header` checks sizes and alignments against the C++
//! compiler's.

/// A device address (a host address in the emulator); 0 is null.
pub type Ptr = u64;

// Generated text, formatted by its generator; `[..]` in the header's comments
// are indexing, not links.
#[rustfmt::skip]
#[allow(rustdoc::broken_intra_doc_links)]
pub mod generated;
pub use generated::*;

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

kernel_params!(
    LinearParams,
    LinearEpilogueParams,
    LayerNormParams,
    ImportanceParams,
    MeanTokensParams,
    GatherRowsParams,
    ColumnSumsParams,
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
    SelectionCheckParams,
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
