//! KV sources: where the K/V rows of a tile come from, converted to f32 once per tile
//! and reused by every query row of the tile.
//!
//! The driver only sees [`KvSource`]; dense strided tensors are the first source, and
//! paged caches, varlen batches and index gathers slot in beside it.

mod dense;

pub(crate) use dense::DenseKv;

/// Packs K and V rows of one (batch, kv head) into f32 tiles.
pub(crate) trait KvSource: Sync {
    /// Writes keys `j0..j0 + n` of `(batch, kv_head)` as rows of `dst`, `stride` floats
    /// apart, each `d_qk` long.
    fn pack_k(
        &self,
        batch: usize,
        kv_head: usize,
        j0: usize,
        n: usize,
        dst: &mut [f32],
        stride: usize,
    );
    /// K rows of `(batch, kv_head)` from key `j0` on, read in place when they are
    /// already f32: the slice starts at row `j0` and rows are `stride` floats apart.
    fn k_in_place(&self, batch: usize, kv_head: usize, j0: usize) -> Option<(&[f32], usize)>;
    /// V rows of `(batch, kv_head)` from key `j0` on, read in place when they are
    /// already f32: the slice starts at row `j0` and rows are `stride` floats apart.
    fn v_in_place(&self, batch: usize, kv_head: usize, j0: usize) -> Option<(&[f32], usize)>;
    /// K rows of `(batch, kv_head)` from key `j0` on as raw 16-bit words, when they are
    /// f16 (`false`) or bf16 (`true`): the slice starts at row `j0` and rows are `stride`
    /// values apart. (Only x86-64 reads halves in place.)
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn k_half(&self, batch: usize, kv_head: usize, j0: usize) -> Option<(&[u16], usize, bool)>;
    /// V rows as [`KvSource::k_half`] gives K rows.
    fn v_half(&self, batch: usize, kv_head: usize, j0: usize) -> Option<(&[u16], usize, bool)>;
    /// Writes values `j0..j0 + n` as rows of `dst`, `stride` floats apart, each `d_v` long.
    fn pack_v(
        &self,
        batch: usize,
        kv_head: usize,
        j0: usize,
        n: usize,
        dst: &mut [f32],
        stride: usize,
    );
}
