//! What the ops' fixed layouts share: a neighbourhood, its inverse (which
//! the backwards gather over), one offset-table row per neighbour slot, and
//! the stage's offsets.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use candle_core::{Result, bail};

use crate::ops::neighbourhood::{InverseNeighbourhood, Neighbourhood};
use crate::ops::rel_pos::OffsetTable;

/// A stage's neighbour slots, as both [`super::ClusterAttention`] and
/// [`super::PointConvMerge`] read them: the neighbourhood, one offset-table
/// row per slot, and the stage's offsets. Cheap to clone: a stage builds it
/// once and hands it to both ops, so the inverse neighbourhood their
/// backwards gather over is built once per stage, by the first backward.
///
/// The rows come from [`crate::ops::rel_pos::neighbour_rows`] (the same for
/// the position bias and the merge's weight net).
#[derive(Debug, Clone)]
pub struct NeighbourSlots(pub(crate) Arc<SlotLayout>);

impl NeighbourSlots {
    /// `nbhd` (per image, or one shared by a batch), its `rows`
    /// (images×n×m) and the stage's `offsets`.
    ///
    /// # Errors
    /// When `rows` does not have one row per neighbour slot, or the
    /// neighbourhood is malformed.
    pub fn new(nbhd: Neighbourhood, rows: Vec<u32>, offsets: OffsetTable) -> Result<Self> {
        Ok(Self(Arc::new(SlotLayout::new(
            "autofocus neighbour slots",
            "rows",
            nbhd,
            rows,
            offsets,
        )?)))
    }

    /// The same slots with the tokens' positions (images×n×2, in the
    /// layout's token order), which the CUDA kernels need: they compute
    /// each slot's offset features from the two positions instead of
    /// reading a table row. The CPU ops do not need them.
    ///
    /// # Errors
    /// When `pos` is not images×n×2.
    pub fn with_positions(self, pos: Vec<f32>) -> Result<Self> {
        let expected = [self.0.nbhd.images, self.0.nbhd.tokens, 2];
        if pos.len() != expected.iter().product::<usize>() {
            bail!(
                "autofocus neighbour slots: `pos` must have shape {expected:?} (images × tokens × \
                 2), found {} values",
                pos.len()
            );
        }
        Ok(self.changed(|layout| layout.positions = Some(pos)))
    }

    /// The same slots, declared to be whole clusters of `s` consecutive
    /// tokens (as [`Neighbourhood::from_clusters`] makes them: every
    /// clustered stage), so that on a GPU the attention takes its tiled
    /// kernel, which stages each block's neighbour clusters in shared
    /// memory instead of gathering every neighbour's key per query. The CPU
    /// ops do not need it.
    ///
    /// # Errors
    /// When the lists are not whole clusters of `s` tokens.
    pub fn with_cluster_size(self, s: usize) -> Result<Self> {
        if !self.0.nbhd.is_whole_clusters(s) {
            bail!(
                "autofocus neighbour slots: the neighbour lists are not whole clusters of {s} \
                 consecutive tokens"
            );
        }
        Ok(self.changed(|layout| layout.cluster_size = Some(s)))
    }

    /// The layout with `change` made, and an empty GPU cache: what was
    /// uploaded before no longer matches. (`Arc::unwrap_or_clone` does not
    /// clone a layout held once, so the cache would otherwise carry over.)
    fn changed(self, change: impl FnOnce(&mut SlotLayout)) -> Self {
        let mut layout = Arc::unwrap_or_clone(self.0);
        change(&mut layout);
        #[cfg(feature = "candle-cuda")]
        {
            layout.on_gpu = Default::default();
        }
        Self(Arc::new(layout))
    }

    /// The neighbourhood.
    pub fn neighbourhood(&self) -> &Neighbourhood {
        &self.0.nbhd
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SlotLayout {
    pub nbhd: Neighbourhood,
    /// Built by the first backward (a forward alone never needs it).
    inverse: OnceLock<InverseNeighbourhood>,
    /// images×n×m offset-table rows, `images` being the neighbourhood's.
    rows: Vec<u32>,
    pub offsets: OffsetTable,
    /// images×n×2 token positions, for the CUDA kernels.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub positions: Option<Vec<f32>>,
    /// `Some(s)`: the lists are whole clusters of `s` tokens (checked), for
    /// the CUDA attention's tiled kernel.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub cluster_size: Option<usize>,
    /// The layout uploaded to each GPU it has run on.
    #[cfg(feature = "candle-cuda")]
    pub on_gpu: super::cuda::GpuCache<super::cuda::GpuSlots>,
}

impl SlotLayout {
    /// Checks that `rows` (named `rows_name` in errors) has one row per
    /// neighbour slot and that the neighbourhood is well formed.
    pub fn new(
        op: &str,
        rows_name: &str,
        nbhd: Neighbourhood,
        rows: Vec<u32>,
        offsets: OffsetTable,
    ) -> Result<Self> {
        let slots = nbhd.images * nbhd.tokens * nbhd.size;
        if rows.len() != slots {
            bail!(
                "{op}: `{rows_name}` must hold {} × {} × {} = {slots} rows (images × tokens × \
                 neighbours), found {}",
                nbhd.images,
                nbhd.tokens,
                nbhd.size,
                rows.len()
            );
        }
        nbhd.check("neighbourhood", nbhd.images, nbhd.tokens)
            .map_err(candle_core::Error::wrap)?;
        Ok(Self {
            nbhd,
            inverse: OnceLock::new(),
            rows,
            offsets,
            positions: None,
            cluster_size: None,
            #[cfg(feature = "candle-cuda")]
            on_gpu: Default::default(),
        })
    }

    /// The inverse neighbourhood the backwards gather over, built once.
    pub fn inverse(&self) -> &InverseNeighbourhood {
        self.inverse.get_or_init(|| {
            InverseNeighbourhood::new(&self.nbhd).expect("checked when the layout was made")
        })
    }

    /// The rows for a batch of `b` (a layout shared by the batch repeated).
    pub fn rows_for(&self, b: usize) -> Cow<'_, [u32]> {
        if self.nbhd.images == b {
            Cow::Borrowed(&self.rows)
        } else {
            Cow::Owned(self.rows.repeat(b))
        }
    }

    /// Checks that `dims` (of the input named `what`) is batch × tokens ×
    /// channels over the layout's tokens, for a batch the layout covers (its
    /// own, or any when shared); returns (batch, tokens, channels).
    pub fn check_tokens(
        &self,
        op: &str,
        what: &str,
        dims: &[usize],
    ) -> Result<(usize, usize, usize)> {
        let &[b, n, c] = dims else {
            bail!("{op}: `{what}` must be batch × tokens × channels, found shape {dims:?}")
        };
        if n != self.nbhd.tokens {
            bail!(
                "{op}: `{what}` has {n} tokens, the layout {} (shape {dims:?})",
                self.nbhd.tokens
            );
        }
        if self.nbhd.images != 1 && self.nbhd.images != b {
            bail!(
                "{op}: `{what}` has a batch of {b}, the layout {} images (shape {dims:?})",
                self.nbhd.images
            );
        }
        Ok((b, n, c))
    }
}
