//! The tiled driver: one loop for every feature.
//!
//! ```text
//! item = (batch b, kv head g, tile t of query rows)            // from the shape only
//! rows of the tile: r = i·group + h' for query i and head g·group + h'  (GQA packing)
//! pack Qᵀ (d_qk × BR in slabs of NVQ row vectors, zero-padded); m = -inf, l = 0, Oᵀ = 0
//! for each K/V tile [j0, j0+BC) inside the rows' visible key range:
//!     class = mask.classify(tile)            // Empty → skip, Full → no masking
//!     K̂, V̂ = the tile's rows                 // single-head items: interleaved panels,
//!                                            //   packed once per (batch, kv head) and
//!                                            //   kept for the head's next Q tiles;
//!                                            //   else in place if f32, or packed
//!     S = K̂·Qᵀ                                // tile::bcast_block, MK keys × NVQ row vectors
//!     modifiers: scale, softcap, ALiBi, bias  (only when any is set)
//!     partial mask: -inf outside each row's key range (QK blocks and PV reductions
//!                   that no row of theirs sees are skipped: the causal diagonal)
//!     P = online_softmax(S) → α               // softmax.rs
//!     Oᵀ = α·Oᵀ + V̂ᵀ·P                        // tile::bcast_block, MC columns × NVP row vectors
//!                                            // (one-vector items: O = α·O + P·V̂, row-major)
//! o = O / (l + e^{sink - m}); lse = m + ln l
//! ```
//!
//! Tile shapes are compile-time constants per backend (see [`Job::with_simd`]); the
//! scratch of a worker is reused by every item it runs, and by later calls (kept in a
//! process-wide pool, [`crate::plan`]).

mod mask;
pub(crate) mod math;
mod softmax;
mod tile;
mod transpose;

use crate::attention::{Dims, Params};
use crate::backend::{Backend, dispatch};
use crate::element::Element;
use crate::error::Result;
use crate::kv::{DenseKv, KvSource};
use crate::tensor::Tensor;
use mask::{TileClass, TileMask};
use pulp::{Simd, WithSimd};
use softmax::OnlineSoftmax;

/// Rows per block of the Qᵀ and Oᵀ transposes: each head-dim index (or output column)
/// then writes (or reads) a run of 16 floats instead of 16 scattered ones.
const TB: usize = 16;

const fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// Keys per K/V tile. 64 keys × d 128 × 4 B = 32 KiB per packed K̂ or V̂ tile, which
/// stays in L2 next to Qᵀ and O while every row of the Q tile uses it.
const BC: usize = 64;

/// Single-head items keep the K̂/V̂ panels of their (batch, kv head) across items when
/// they fit in this many floats (16 MiB per worker): the Q tiles of one head (items
/// that follow each other) then pack each K/V tile once instead of once per Q tile.
const PANEL_CACHE_FLOATS: usize = 4 << 20;

/// Keys per K/V tile of multi-head items (decode). Their tile holds every kv head's
/// rows (8 heads × 64 keys × 2 × 512 B = 512 KiB at BC for c), and the next tile is
/// prefetched into L2 while this one is computed: 8 keys kept c32k (a 256 MiB stream)
/// at 73–79 % of the bandwidth, against 68–72 % at 16 keys and 52–56 % at 32.
const BC_MH: usize = 8;

/// Keys per split of the KV range when a call has too few (batch, kv head, Q tile)
/// groups to occupy every core (decode): at least this many tiles per split.
const MIN_TILES_PER_SPLIT: usize = 4;

/// The plan aims for at least this many work items; fewer groups are split along KV.
/// It depends on the shape only, never on the thread count, so results are
/// bit-identical for every number of threads.
const TARGET_ITEMS: usize = 32;

/// Rows per Q tile (`BR`) on AVX-512: 128 halves the K/V re-reads from L3 against 64
/// (the V pack took 26 % of the time at 64).
const BR_AVX512: usize = 192;
/// Rows per Q tile on AVX2: a multiple of 8 (lanes) and 6 (the PV rows); 192 ran 3–8 %
/// faster than 96 on a and d.
const BR_AVX2: usize = 192;
/// Rows per Q tile on NEON and Scalar.
const BR_OTHER: usize = 64;

/// Rows per Q tile for each backend, as [`Job::with_simd`] instantiates them.
pub(crate) fn tile_rows(backend: Backend) -> usize {
    match backend {
        Backend::Avx512 => BR_AVX512,
        Backend::Avx2 => BR_AVX2,
        // (The emulation runs the AVX-512 instantiation: see Cargo.toml.)
        Backend::Scalar if cfg!(feature = "emulate-avx512") => BR_AVX512,
        Backend::Neon | Backend::Scalar => BR_OTHER,
    }
}

/// Where outputs go: raw pointers shared by the workers.
///
/// Each output row `(b, i, h)`, each LSE entry and each partial slot belongs to exactly
/// one work item (or to the merge of one group, which runs once, after all its items),
/// and the output view was checked for in-bounds, non-overlapping strides, so concurrent
/// items never write the same element.
pub(crate) struct Sink<O> {
    pub out: *mut O,
    pub out_len: usize,
    pub strides: [usize; 3],
    pub dv: usize,
    pub lse: *mut f32,
    pub lse_len: usize,
    /// Partial results of split groups: per group and split, `BR` rows of `dv` floats of
    /// unnormalised O, then `BR` running maxima, then `BR` sums.
    pub partial: *mut f32,
    pub partial_len: usize,
}

// SAFETY: the pointers are only used for disjoint writes (see the type's docs), and the
// borrows they come from outlive every use (the plan holds them).
unsafe impl<O: Send> Send for Sink<O> {}
// SAFETY: as above; no element is written by two items, and split partials are read
// only by the merge, after an acquire on the group's counter.
unsafe impl<O: Send> Sync for Sink<O> {}

impl<O: Element> Sink<O> {
    /// Writes output row `(b, i, h)` from f32.
    #[inline]
    fn write_row(&self, b: usize, i: usize, h: usize, src: &[f32]) {
        assert!(src.len() == self.dv);
        O::store_row(src, self.row(b, i, h));
    }

    /// Writes output row `(b, i, h)` as `src · s`: in one pass when the output is f32,
    /// else through `tmp` (`dv` floats).
    #[inline]
    fn write_row_scaled(&self, b: usize, i: usize, h: usize, src: &[f32], s: f32, tmp: &mut [f32]) {
        assert!(src.len() == self.dv && tmp.len() == self.dv);
        let dst = self.row(b, i, h);
        match O::as_f32_mut(&mut *dst) {
            Some(d) => {
                for (x, &y) in d.iter_mut().zip(src) {
                    *x = y * s;
                }
            }
            None => {
                for (x, &y) in tmp.iter_mut().zip(src) {
                    *x = y * s;
                }
                O::store_row(tmp, dst);
            }
        }
    }

    /// Output row `(b, i, h)`.
    #[allow(clippy::mut_from_ref)] // the row is behind a raw pointer, owned by the item
    #[inline]
    fn row(&self, b: usize, i: usize, h: usize) -> &mut [O] {
        let off = b * self.strides[0] + i * self.strides[1] + h * self.strides[2];
        assert!(off + self.dv <= self.out_len);
        // SAFETY: in bounds (asserted); this item owns row (b, i, h), so no other thread
        // touches these elements while the slice lives.
        unsafe { core::slice::from_raw_parts_mut(self.out.add(off), self.dv) }
    }

    /// Asks for output row `(b, i, h)` in cache, for writing (x86-64 only).
    #[inline(always)]
    fn prefetch_row(&self, b: usize, i: usize, h: usize) {
        let off = b * self.strides[0] + i * self.strides[1] + h * self.strides[2];
        if off + self.dv <= self.out_len {
            let bytes = self.dv * core::mem::size_of::<O>();
            prefetch_lines(self.out.wrapping_add(off) as *const u8, bytes, true);
        }
    }

    #[inline]
    fn write_lse(&self, idx: usize, x: f32) {
        if !self.lse.is_null() {
            assert!(idx < self.lse_len);
            // SAFETY: in bounds (asserted) and owned by this item.
            unsafe { self.lse.add(idx).write(x) };
        }
    }

    /// The partial slot `[off, off + len)`.
    ///
    /// # Safety
    /// The caller owns the slot: it is the item that computes it, or the group's merge
    /// after every item of the group finished.
    #[allow(clippy::mut_from_ref)] // the slots are behind a raw pointer, owned as documented
    #[inline]
    unsafe fn partial(&self, off: usize, len: usize) -> &mut [f32] {
        assert!(off + len <= self.partial_len);
        // SAFETY: in bounds (asserted); exclusive by the caller's contract.
        unsafe { core::slice::from_raw_parts_mut(self.partial.add(off), len) }
    }
}

/// The work partition, from the shape alone.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    /// Rows per Q tile.
    pub br: usize,
    /// Q tiles per (batch, kv head).
    pub tiles: usize,
    /// KV heads per item: all of them when a (batch, kv head) has a single, small Q tile
    /// (decode), so an item sweeps the K/V rows of every head at a key in one pass over
    /// memory (4 KiB contiguous in BSHD) instead of 512 B from a new page per row.
    pub heads: usize,
    /// Splits of each group's KV range (1: no split).
    pub splits: usize,
    /// Groups: batch × head blocks × Q tiles.
    pub groups: usize,
    /// Rows per head of a partial slot: the rows of the largest Q tile, `min(BR, rows)`
    /// (a decode item's few rows, not `BR`: the partials are allocated per call).
    pub prow: usize,
}

/// A group holds all kv heads when its rows (over all heads) stay below this.
const MULTI_HEAD_ROWS: usize = 256;

impl Layout {
    pub fn new(d: &Dims, backend: Backend) -> Self {
        let br = tile_rows(backend);
        if d.is_empty() {
            return Layout {
                br,
                tiles: 0,
                heads: 1,
                splits: 1,
                groups: 0,
                prow: 0,
            };
        }
        // Non-empty outputs were checked to fit their buffer without overlap, so these
        // products are bounded by its length.
        let rows = d.sq * d.group();
        let tiles = rows.div_ceil(br);
        let heads = if tiles == 1 && rows * d.hkv <= MULTI_HEAD_ROWS {
            d.hkv
        } else {
            1
        };
        let groups = d.batch * d.hkv.div_ceil(heads) * tiles;
        let kv_tiles = d.skv.div_ceil(BC);
        let splits = if groups >= TARGET_ITEMS {
            1
        } else {
            TARGET_ITEMS
                .div_ceil(groups)
                .min(kv_tiles / MIN_TILES_PER_SPLIT)
                .max(1)
        };
        Layout {
            br,
            tiles,
            heads,
            splits,
            groups,
            prow: rows.min(br),
        }
    }

    pub fn items(&self) -> usize {
        self.groups * self.splits
    }

    /// Floats of one partial slot: per head, `prow` rows of `dv` floats of O, then `prow`
    /// maxima, then `prow` sums.
    pub fn slot(&self, dv: usize) -> usize {
        self.heads * self.prow * (dv + 2)
    }

    pub fn item(&self, d: &Dims, idx: usize) -> Item {
        let group = idx / self.splits;
        let blocks = d.hkv.div_ceil(self.heads);
        let g0 = (group / self.tiles) % blocks * self.heads;
        Item {
            b: group / (blocks * self.tiles),
            g0,
            g1: (g0 + self.heads).min(d.hkv),
            // Last Q tile first: under a causal mask it sees the most keys, and each
            // worker claims its share's items in index order (`plan::Claims`), so the
            // longest items start first.
            t: self.tiles - 1 - group % self.tiles,
            split: idx % self.splits,
            splits: self.splits,
            group,
        }
    }
}

/// Everything an item needs, shared read-only by all workers.
pub(crate) struct Ctx<'a, Q, KV, O> {
    pub dims: Dims,
    pub params: Params<'a>,
    pub mask: TileMask,
    pub q: Tensor<'a, Q>,
    pub kv: DenseKv<'a, KV>,
    pub sink: Sink<O>,
    pub layout: Layout,
    /// Scores are modified (softcap, ALiBi, bias): the scale is applied to them, not in
    /// the exponent.
    pub modified: bool,
    /// A number no other call shares: scratch kept from an earlier call (whose panel
    /// cache describes other K/V) is reset when it first meets this one.
    pub call: u64,
}

/// Source of [`Ctx::call`].
static CALLS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

impl<'a, Q, KV, O> Ctx<'a, Q, KV, O> {
    pub fn new(
        dims: Dims,
        params: Params<'a>,
        q: Tensor<'a, Q>,
        k: Tensor<'a, KV>,
        v: Tensor<'a, KV>,
        sink: Sink<O>,
        layout: Layout,
    ) -> Self {
        Ctx {
            dims,
            params,
            mask: TileMask::new(params.causal, params.window, dims.sq, dims.skv),
            q,
            kv: DenseKv { k, v },
            sink,
            layout,
            modified: params.softcap.is_some() || params.alibi.is_some() || params.bias.is_some(),
            call: CALLS.fetch_add(1, core::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Runs item `idx` on `backend`, reusing `scratch` when it was made for this backend.
pub(crate) fn run_item_on<Q: Element, KV: Element, O: Element>(
    backend: Backend,
    ctx: &Ctx<'_, Q, KV, O>,
    idx: usize,
    scratch: &mut Option<Box<dyn core::any::Any + Send>>,
) -> Result<()> {
    let it = ctx.layout.item(&ctx.dims, idx);
    dispatch(backend, Job { ctx, it, scratch })
}

struct Job<'c, 'a, 's, Q, KV, O> {
    ctx: &'c Ctx<'a, Q, KV, O>,
    it: Item,
    scratch: &'s mut Option<Box<dyn core::any::Any + Send>>,
}

impl<Q: Element, KV: Element, O: Element> WithSimd for Job<'_, '_, '_, Q, KV, O> {
    type Output = ();

    /// Picks the tile shapes for this backend: QK blocks of `MK` keys × `NVQ` row
    /// vectors, PV blocks of `MC` output columns × `NVP` row vectors (both broadcast
    /// `MK`/`MC` scalars and load `NVQ`/`NVP` vectors per step); row-major PV blocks of
    /// `OR` rows × `NVO` column vectors for items of one row vector (decode), or for all
    /// items with `ALL_ROWS`. Each block must fit the register file with room for the
    /// operands:
    /// - AVX-512 (32 zmm): QK 8×3v (24 acc, 11 loads per 24 FMAs). 8 keys divide BC (no
    ///   padded keys, against 3 % with 6×4v), a 3-vector Qᵀ slab (24 KiB at d 128) leaves
    ///   room in L1 for the K̂ panel. PV row-major for every item, 8 rows × 3 column
    ///   vectors from the cached V̂ rows: 8–10 % faster on d than the transposed 8×3v
    ///   block, the same on a and b (6 rows × 4 vectors: 2 % behind on d). BR 192 = 4
    ///   slabs; measured 5–10 % faster than BR 128 on a and b.
    /// - AVX2 (16 ymm): QK 6×2v (12 acc); PV row-major for every item, 6 rows × 2
    ///   column vectors (12 acc), V packed — 10–25 % faster than any transposed block
    ///   that fits 16 registers.
    /// - NEON (32 q): QK 6×4v, PV 4×4v, row-major PV 4 rows × 4v.
    /// - Scalar: 4×4 blocks of plain multiply-adds.
    ///
    /// `BR` (rows per Q tile, [`tile_rows`]) is a multiple of the lane count, and of `OR`
    /// where PV is row-major.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        match S::F32_LANES {
            16 => self.go::<S, 8, 3, 8, 3, 8, 3, true, BR_AVX512>(simd),
            8 => self.go::<S, 6, 2, 4, 3, 6, 2, true, BR_AVX2>(simd),
            4 => self.go::<S, 6, 4, 4, 4, 4, 4, false, BR_OTHER>(simd),
            _ => self.go::<S, 4, 4, 4, 4, 4, 4, false, BR_OTHER>(simd),
        }
    }
}

impl<Q: Element, KV: Element, O: Element> Job<'_, '_, '_, Q, KV, O> {
    #[inline(always)]
    fn go<
        S: Simd,
        const MK: usize,
        const NVQ: usize,
        const MC: usize,
        const NVP: usize,
        const OR: usize,
        const NVO: usize,
        const ALL_ROWS: bool,
        const BR: usize,
    >(
        self,
        simd: S,
    ) {
        // The plan's layout and the instantiated tile must agree (one table above).
        assert_eq!(BR, self.ctx.layout.br, "tile rows disagree with the plan");
        // Scratch of this backend is reused, whichever call made it: its buffers only
        // grow, so a model's calls stop allocating (and page-faulting) after the first.
        if !self.scratch.as_ref().is_some_and(|b| b.is::<Scratch<S>>()) {
            *self.scratch = Some(Box::new(Scratch::<S>::new()));
        }
        let sc = self
            .scratch
            .as_mut()
            .and_then(|b| b.downcast_mut::<Scratch<S>>())
            .expect("scratch was just made for this backend");
        if sc.call != Some(self.ctx.call) {
            sc.begin_call(&self.ctx.dims, self.ctx.call);
        }
        run_item::<S, Q, KV, O, MK, NVQ, MC, NVP, OR, NVO, ALL_ROWS, BR>(
            simd, self.ctx, self.it, sc,
        );
    }
}

/// One work item: split `split` of the KV range of the query rows `[t·BR, (t+1)·BR)`
/// of `(b, g)` for the kv heads `g0 <= g < g1`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Item {
    pub b: usize,
    pub g0: usize,
    pub g1: usize,
    pub t: usize,
    pub split: usize,
    pub splits: usize,
    pub group: usize,
}

/// One cache line of floats: the unit of [`Buf`]'s storage, for its alignment.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A growable run of SIMD vectors that starts on a cache line.
///
/// pulp's vector types have the alignment of `f32`, so a `Vec<S::f32s>` starts wherever
/// the allocator puts it (16 bytes into a line, here): every 64-byte vector access then
/// spans two lines. Aligned panels made shape a about 4 % faster.
struct Buf<S: Simd> {
    lines: Vec<Line>,
    /// Vectors in use (a prefix of `lines`).
    len: usize,
    _simd: core::marker::PhantomData<S>,
}

impl<S: Simd> Buf<S> {
    fn new() -> Self {
        Buf {
            lines: Vec::new(),
            len: 0,
            _simd: core::marker::PhantomData,
        }
    }
}

impl<S: Simd> core::ops::Deref for Buf<S> {
    type Target = [S::f32s];
    fn deref(&self) -> &[S::f32s] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl<S: Simd> core::ops::DerefMut for Buf<S> {
    fn deref_mut(&mut self) -> &mut [S::f32s] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

/// Per-worker scratch, reused by every item the worker runs and kept across calls (its
/// buffers only grow); nothing may rely on it being zero.
/// Vectors of `S::f32s` keep every packed panel aligned to the vector width. Per-head
/// state (`qt`, `o`, `m`, `l`, `alpha`, `slope`, `posf`) holds one block per kv head of
/// the item, sized to the item's rows, not to `BR`.
struct Scratch<S: Simd> {
    qt: Buf<S>,
    k: Buf<S>,
    v: Buf<S>,
    st: Buf<S>,
    /// P interleaved by row vector (`rsv` runs of `bcp` key vectors), for row-major PV
    /// blocks that stay within one vector of rows.
    pi: Buf<S>,
    o: Buf<S>,
    m: Buf<S>,
    l: Buf<S>,
    alpha: Buf<S>,
    slope: Buf<S>,
    posf: Buf<S>,
    /// One output row.
    row: Vec<f32>,
    /// Q rows, row-major and padded to whole vectors (multi-head decode items).
    qr: Buf<S>,
    /// The group whose Q rows `qr` holds (of the call `call`).
    qr_group: Option<usize>,
    /// TB rows of Q, or of O, on their way through a transpose.
    blk: Vec<f32>,
    /// K̂ panels of one (batch, kv head), per tile of BC keys (`kc_tile` floats each):
    /// blocks of MK keys, each `dqk` runs of MK floats (key-interleaved, so a QK step
    /// broadcasts MK consecutive floats). Padded keys are zero.
    kc: Buf<S>,
    /// V̂ panels of the same head, per tile (`BC · dvp` floats): column blocks of MC,
    /// each BC runs of MC floats (one per key). Padded columns are zero.
    vc: Buf<S>,
    /// Which tiles of `kc`/`vc` hold the head `chead` (batch, kv head, row-major PV).
    cdone: Vec<bool>,
    chead: Option<(usize, usize, bool)>,
    /// The call ([`Ctx::call`]) this scratch last served.
    call: Option<u64>,
}

impl<S: Simd> Scratch<S> {
    fn new() -> Self {
        Scratch {
            qt: Buf::new(),
            qr: Buf::new(),
            qr_group: None,
            k: Buf::new(),
            v: Buf::new(),
            st: Buf::new(),
            pi: Buf::new(),
            o: Buf::new(),
            m: Buf::new(),
            l: Buf::new(),
            alpha: Buf::new(),
            slope: Buf::new(),
            posf: Buf::new(),
            row: Vec::new(),
            blk: Vec::new(),
            kc: Buf::new(),
            vc: Buf::new(),
            cdone: Vec::new(),
            chead: None,
            call: None,
        }
    }

    /// Readies the scratch for a new call: per-shape rows, and a panel cache that holds
    /// nothing (it described another call's K/V).
    fn begin_call(&mut self, d: &Dims, call: u64) {
        self.row.resize(d.dv, 0.0);
        // TB rows of either head dim (transposes), or MK ≤ TB K rows then a V row
        // (`pack_panels`).
        self.blk.resize(TB * d.dqk.max(d.dv) + d.dv, 0.0);
        self.chead = None;
        self.cdone.clear();
        self.qr_group = None;
        self.call = Some(call);
    }
}

/// Grows `v` to hold at least `floats` floats, zero-filled (allocates only the first
/// time a size is seen; every item of a plan asks for the same sizes).
fn ensure<S: Simd>(v: &mut Buf<S>, floats: usize) {
    let n = floats.div_ceil(S::F32_LANES);
    if v.len < n {
        let lines = (n * S::F32_LANES).div_ceil(16);
        if v.lines.len() < lines {
            v.lines.resize(lines, Line([0.0; 16]));
        }
        v.len = n;
    }
}

fn floats<S: Simd>(v: &[S::f32s]) -> &[f32] {
    bytemuck::cast_slice(v)
}

fn floats_mut<S: Simd>(v: &mut [S::f32s]) -> &mut [f32] {
    bytemuck::cast_slice_mut(v)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn run_item<
    S: Simd,
    Q: Element,
    KV: Element,
    O: Element,
    const MK: usize,
    const NVQ: usize,
    const MC: usize,
    const NVP: usize,
    const OR: usize,
    const NVO: usize,
    const ALL_ROWS: bool,
    const BR: usize,
>(
    simd: S,
    ctx: &Ctx<'_, Q, KV, O>,
    it: Item,
    sc: &mut Scratch<S>,
) {
    let lanes = S::F32_LANES;
    let d = ctx.dims;
    let p = &ctx.params;
    let group = d.group();
    let (dqk, dv) = (d.dqk, d.dv);
    let nh = it.g1 - it.g0;
    // Oᵀ has a row per output column, padded to whole PV column blocks.
    let dvp = dv.next_multiple_of(MC);
    let r0 = it.t * BR;
    let nr = (d.sq * group - r0).min(BR);
    let nvec = nr.div_ceil(lanes);
    // Items of one row vector (decode: a GQA group's few query heads) keep O row-major
    // and run PV the other way round (broadcast P, load V̂ vectors): with rows in lanes
    // they would spend a broadcast per column for one useful FMA per row vector. AVX2
    // and AVX-512 do so for every item (`ALL_ROWS`): with 16 registers AVX2's transposed
    // PV block (4 columns × 3 vectors) ran 10–25 % slower than 6 rows × 2 column
    // vectors; on AVX-512, 8 rows × 3 vectors beat the transposed 8 × 3v on d.
    // (Not on the scalar backend, whose one-lane "vectors" hold a single row.)
    let o_rows = ALL_ROWS || (nvec == 1 && lanes >= OR);
    // Row stride of Qᵀ, S, P, O and the per-row state: whole vectors, and whole blocks of
    // OR rows for row-major PV.
    let rs = nr.next_multiple_of(if o_rows { lcm(lanes, OR) } else { lanes });
    let rsv = rs / lanes;
    debug_assert!(rs <= BR && BR.is_multiple_of(lanes));

    let dvq = dv.next_multiple_of(lanes); // O row length, row-major
    let dvqv = dvq / lanes;
    // V̂ rows: whole PV column blocks and whole vectors.
    let vrow = dv.next_multiple_of(lcm(MC, lanes));
    // Keys per tile, at most: short KV ranges get scratch to match (a multi-head item of
    // 16 keys allocated and zeroed 256 KiB of K̂/V̂ per call with BC).
    let bc = if nh > 1 { BC_MH } else { BC };
    let bck = bc.min(d.skv);
    let bcp = bck.next_multiple_of(MK);
    let row_of = |g: usize, r: usize| ((r0 + r) / group, g * group + (r0 + r) % group); // (i, h)

    // Scratch: per head, Qᵀ (dqk × rs, by slabs), Oᵀ (dvp × rs) or O (rs × dvq) and rsv vectors
    // of row state;
    // shared by the heads, S (bcp × rs), K̂ and V̂.
    // Qᵀ is stored slab by slab (NVQ row vectors × dqk, contiguous): a QK pass then
    // reads one dense run instead of NVQ vectors of rows `rs` floats apart.
    let sw = NVQ * lanes;
    let qt_len = dqk * rsv.div_ceil(NVQ) * sw; // floats per head
    ensure(&mut sc.qt, nh * qt_len);
    let o_len = if o_rows { rs * dvq } else { dvp * rs }; // floats per head
    ensure(&mut sc.o, nh * o_len);
    for v in [
        &mut sc.m,
        &mut sc.l,
        &mut sc.alpha,
        &mut sc.slope,
        &mut sc.posf,
    ] {
        ensure(v, nh * rs);
    }
    // Multi-head items of one row vector (decode) compute S as dot products along the
    // head dim (K̂ and Q rows in vectors, one horizontal sum per score): the broadcast
    // block would fill one lane in four for a GQA group of 4. K̂ rows are then padded to
    // whole vectors, with zeros.
    let dot = o_rows && nh > 1;
    // Row-major PV blocks that never straddle two row vectors read P interleaved by row
    // vector: each key's OR probabilities then sit one line after the previous key's
    // (in the key-major S they are a whole S row apart, a new line per key); the PV
    // block alone ran 8–9 % faster so. Not dot-product items, whose P stays in S (below).
    let il = o_rows && lanes.is_multiple_of(OR) && !dot;
    if il {
        ensure(&mut sc.pi, bcp * rs);
    }
    // Dot-product items hold every head's rows in one S and one row state, head after
    // head: row `hi·nr + r` is row r of head hi. The softmax then runs once per
    // tile over full vectors (8 heads × 4 rows: 4 vectors on AVX2, 2 on AVX-512) instead
    // of once per head over one vector mostly filled with padding (on AVX2, decode with
    // 1024 keys ran 12 % faster so). PV reads each head's rows at their offset; a head's
    // padding rows read the next head's P, or padding that may hold stale values from
    // earlier items (even NaN), which only reach padding rows of its O, never gathered
    // or written out. `rs_s` covers the last head's widest PV block.
    let (nr_s, rs_s) = if dot {
        let widest = nr.next_multiple_of(OR).max(4);
        (nh * nr, ((nh - 1) * nr + widest).next_multiple_of(lanes))
    } else {
        (nr, rs)
    };
    let (rsv_s, nvec_s) = (rs_s / lanes, nr_s.div_ceil(lanes));
    // Index of row r of head hi in the row state (m, l, α, ALiBi lanes).
    let srow = |hi: usize, r: usize| if dot { hi * nr + r } else { hi * rs + r };
    let dqkp = dqk.next_multiple_of(lanes);
    let kst = if dot { dqkp } else { dqk }; // K̂ row stride
    // A worker runs a group's splits one after another (`plan::Claims`), so they
    // gather the group's Q rows once.
    let q_ready = dot && sc.qr_group == Some(it.group);
    if dot {
        ensure(&mut sc.qr, nh * nr * dqkp);
        sc.qr_group = Some(it.group);
    }
    // Multi-head items over f32 K and V whose rows hold whole vectors (V rows a whole
    // number of vectors apart) read both in place: each tile's rows were prefetched
    // into L2 while the previous tile was computed, so no copy is needed.
    let in_place = dot
        && d.skv > 0
        && dqk.is_multiple_of(lanes)
        && dv.is_multiple_of(lanes)
        && ctx.kv.k_in_place(it.b, it.g0, 0).is_some()
        && ctx
            .kv
            .v_in_place(it.b, it.g0, 0)
            .is_some_and(|(_, vs)| vs.is_multiple_of(lanes));
    // So do those over f16 or bf16 K and V on AVX-512 and AVX2, converting each vector
    // as it is loaded (`tile::HalfRows`; rows of whole vectors, any stride): converted
    // into scratch first, decode c over an f16 cache ran slower than over f32 (AVX-512:
    // 2.15 against 1.82 ms with K/V in L3, Sapphire Rapids), a quarter of it in the
    // conversion calls, though it reads half the bytes. `Some(bf16?)` with the token.
    #[cfg(target_arch = "x86_64")]
    let half = HalfSimd::of(simd)
        .filter(|_| {
            dot && d.skv > 0
                && dqk.is_multiple_of(lanes)
                && dv.is_multiple_of(lanes)
                && ctx.kv.v_half(it.b, it.g0, 0).is_some()
        })
        .and_then(|hs| Some((hs, ctx.kv.k_half(it.b, it.g0, 0)?.2)));
    #[cfg(not(target_arch = "x86_64"))]
    let half: Option<((), bool)> = None;
    // K and V rows are read where they are, not copied into K̂/V̂.
    let direct = in_place || half.is_some();
    // K̂: a tile of one head, or (dot-product items) the two keys of one score pass; V̂:
    // a tile of one head. Rows that are not read in place are converted into them just
    // before use, so they stay in L1.
    ensure(&mut sc.k, if dot { 2 * kst } else { bcp * kst });
    ensure(&mut sc.v, bck * vrow);
    // (nh·rs floats of row state cover rs_s: rs ≥ nr and rs ≥ the widest PV block.)
    debug_assert!(rs_s <= nh * rs);
    ensure(&mut sc.st, bcp * rs_s);

    // Single-head items use the head's cached panels (K̂ blocks read as MK consecutive
    // floats per step; V̂ column blocks as one run each, or V̂ rows for row-major PV)
    // when they fit: a head's Q tiles run one after another, so each K/V tile is
    // packed once per head, not once per Q tile. Tiles then start at multiples of BC.
    let kc_tile = BC.next_multiple_of(MK) * dqk;
    // V̂ tiles: column blocks for transposed PV, rows of `vrow` floats for row-major PV.
    let vc_tile = if o_rows { BC * vrow } else { BC * dvp };
    let all_tiles = d.skv.div_ceil(BC);
    // (Checked: a zero-stride K/V view may have any number of keys.)
    let cache = nh == 1
        && all_tiles
            .checked_mul(kc_tile + vc_tile)
            .is_some_and(|f| f <= PANEL_CACHE_FLOATS);
    if cache {
        ensure(&mut sc.kc, all_tiles * kc_tile);
        ensure(&mut sc.vc, all_tiles * vc_tile);
        // The V̂ layout depends on the PV form, which a head's short last Q tile may
        // not share with its other tiles: it is part of the key.
        if sc.chead != Some((it.b, it.g0, o_rows)) {
            sc.cdone.clear();
            sc.cdone.resize(all_tiles, false);
            sc.chead = Some((it.b, it.g0, o_rows));
        }
    }

    // Positions of ALiBi rows are kept relative to the item's first (smallest) one.
    let pbase = ctx.mask.pos(row_of(it.g0, 0).0);
    for hi in 0..nh {
        let g = it.g0 + hi;
        // Pack Qᵀ: per slab of `sw` rows, d-major; zero rows past `nr`.
        let qt = &mut floats_mut::<S>(&mut sc.qt)[hi * qt_len..][..qt_len];
        if nr < rs && !dot {
            qt.fill(0.0);
        }
        // Dot-product items read Q rows, not Qᵀ: copied (or converted) straight in.
        if dot && !q_ready {
            let qr = &mut floats_mut::<S>(&mut sc.qr)[hi * nr * dqkp..][..nr * dqkp];
            for (r, dst) in qr.chunks_exact_mut(dqkp).enumerate() {
                let (i, h) = row_of(g, r);
                let src = ctx.q.row(it.b, i, h);
                match Q::as_f32(src) {
                    Some(src) => copy_row::<S>(src, &mut dst[..dqk]),
                    None => Q::load_row(src, &mut dst[..dqk]),
                }
                // Scratch outlives calls: the pad must be zeroed, not assumed zero.
                dst[dqk..].fill(0.0);
            }
        }
        // Others pack Qᵀ, TB rows at a time, so that each d writes a run of TB floats.
        let blk = &mut sc.blk[..TB * dqk];
        let qt_rows = if dot { 0 } else { nr };
        for r0 in (0..qt_rows).step_by(TB) {
            let nb = (nr - r0).min(TB);
            for (rr, dst) in blk.chunks_exact_mut(dqk).take(nb).enumerate() {
                let (i, h) = row_of(g, r0 + rr);
                if r0 + rr + PACK_AHEAD < nr {
                    let (ia, ha) = row_of(g, r0 + rr + PACK_AHEAD);
                    prefetch(ctx.q.row(it.b, ia, ha));
                }
                let src = ctx.q.row(it.b, i, h);
                // f32 rows by an inlined vector copy, not a call to memmove per row.
                match Q::as_f32(src) {
                    Some(src) => copy_row::<S>(src, dst),
                    None => Q::load_row(src, dst),
                }
            }
            // Runs of rows within one slab (TB rows may span two when a slab is narrower).
            let mut r = r0;
            while r < r0 + nb {
                let e = (r / sw + 1) * sw;
                let m = (r0 + nb).min(e) - r;
                let dst = &mut qt[r / sw * dqk * sw + r % sw..];
                transpose::transpose(lanes == 16, &blk[(r - r0) * dqk..], dqk, m, dqk, dst, sw);
                r += m;
            }
        }
        // Per-row ALiBi slopes and positions, as lanes.
        if let Some(slopes) = p.alibi {
            let sl = floats_mut::<S>(&mut sc.slope);
            let ps = floats_mut::<S>(&mut sc.posf);
            for r in 0..nr {
                let (i, h) = row_of(g, r);
                sl[srow(hi, r)] = slopes[h];
                // Relative to the item's first row, so exact in f32 (a tile spans a
                // few hundred positions; absolute positions lose integers past 2^24).
                ps[srow(hi, r)] = (ctx.mask.pos(i) - pbase) as f32;
            }
        }
        if !dot || hi == 0 {
            let mut sm = OnlineSoftmax::<S> {
                m: &mut sc.m[hi * rsv_s..][..nvec_s],
                l: &mut sc.l[hi * rsv_s..][..nvec_s],
            };
            sm.reset(simd);
        }
    }
    // Row-major O: only the rows the PV blocks touch (whole OR-row blocks, or the 4-row
    // block of small groups), not the padding to `rs` (a GQA group of 4 has rs = 24 on
    // AVX2: 96 KiB of zeros per decode item instead of 16).
    let o_zero = if o_rows {
        nr.next_multiple_of(OR).max(4).min(rs) * dvq
    } else {
        o_len
    };
    for hi in 0..nh {
        sc.o[hi * o_len / lanes..][..o_zero / lanes].fill(simd.splat_f32s(0.0));
    }

    // Rows are position-major, so the first and last rows bound the positions.
    let pmin = ctx.mask.pos(row_of(it.g0, 0).0);
    let pmax = ctx.mask.pos(row_of(it.g0, nr - 1).0);
    let (jlo, _) = ctx.mask.key_range(pmin);
    let (_, jhi) = ctx.mask.key_range(pmax);
    let c_dom = if ctx.modified { 1.0 } else { p.scale };

    // K/V tiles [start + k·BC, ...) for k < n_tiles. Odd Q tiles walk them backwards, so
    // a worker running the Q tiles of one kv head in turn starts each pass on the tiles
    // the previous pass touched last, which are still in L2. The order depends on the
    // item alone, so results stay identical for every thread count.
    let start = if cache {
        jlo.max(0) / BC as i64 * BC as i64
    } else {
        jlo.max(0)
    };
    let n_tiles = if jhi > start {
        ((jhi - start) as usize).div_ceil(bc)
    } else {
        0
    };
    let tile_at = |k: usize| {
        let k = if it.t % 2 == 1 { n_tiles - 1 - k } else { k };
        let j0 = start + (k * bc) as i64;
        (j0, ((jhi - j0) as usize).min(bc))
    };
    // This item's share of the tiles (all of them unless the group is split).
    let k_lo = n_tiles * it.split / it.splits;
    let k_hi = n_tiles * (it.split + 1) / it.splits;
    for kt in k_lo..k_hi {
        let (j0, n) = tile_at(kt);
        let class = ctx.mask.classify(pmin, pmax, j0, j0 + n as i64);
        let ju = j0 as usize;
        if class == TileClass::Empty {
            continue;
        }
        // Multi-head items (decode) prefetch the next tile's K/V rows into L2 while
        // computing this one, so that DRAM streams while they compute: with the 16-key
        // tiles of then (the next tile fits in L2 beside this one; BC_MH is 8 now) and K/V
        // read in place, decode c went from 64 to 94–98 % of the bandwidth on one thread
        // (Ice Lake). K row j of head hi is prefetched during score row j of head hi.
        // V rows read in place are prefetched during their head's PV: spread over the
        // column blocks of the 4-row block, or all at once before the OR-row blocks (V
        // rows that are copied are still prefetched with K, during the sweep). Issued
        // with K, all of a tile's prefetches came in a burst during the score sweep and
        // none during PV, and on Zen 3 (whose software prefetches stall once the miss
        // buffers fill) c32k ran 6–7 % slower on one and on two threads.
        // Single-head items do not prefetch: their next Q tile finds K/V in the panel
        // cache, and spreading prefetches of the next KV tile over the first pass
        // measured no better on a and d.
        // An item's last tile prefetches the first tile of the next split of its group:
        // a worker runs its share of the items in order (`plan::Claims`), so that is
        // usually its next item, which then does not start cold (decode c, Sapphire
        // Rapids, caches flushed, 10 interleaved rounds: 1 % faster on 1 and 2 threads).
        let ahead = if nh > 1 && kt + 1 < n_tiles {
            Some(tile_at(kt + 1))
        } else {
            None
        };
        // Rows lo..hi of the next tile's V, head g.
        let prefetch_v = |g: usize, lo: usize, hi: usize| {
            if let Some((j1, n1)) = ahead {
                for jj in lo..hi.min(n1) {
                    prefetch(ctx.kv.v.row(it.b, j1 as usize + jj, g));
                }
            }
        };
        if dot {
            // Scores of every head, key by key (two keys per pass where two are left:
            // eight FMA chains instead of four). In BSHD a position's heads are
            // adjacent, so K is read in address order, which the hardware prefetchers
            // stream; head by head, each key row was a page from the last, and on Zen 3
            // decode c ran 15–20 % slower. The next tile's K rows (and V rows, when they
            // are converted) are prefetched in the same order.
            let dv_ = dqkp / lanes;
            // K rows in place: key jj of head hi at jj·sj + hi·sh.
            let kin = if in_place {
                let (src, sj) = ctx.kv.k_in_place(it.b, it.g0, ju).expect("f32 K");
                Some((src, sj, ctx.kv.k.strides[2]))
            } else {
                None
            };
            // Or as halves.
            #[cfg(target_arch = "x86_64")]
            let khalf = if half.is_some() {
                let (src, sj, _) = ctx.kv.k_half(it.b, it.g0, ju).expect("half K");
                Some((src, sj, ctx.kv.k.strides[2]))
            } else {
                None
            };
            let mut j = 0;
            while j < n {
                let nk = (n - j).min(2);
                for hi in 0..nh {
                    let g = it.g0 + hi;
                    if let Some((j1, n1)) = ahead {
                        for jj in (j..j + nk).filter(|&jj| jj < n1) {
                            prefetch(ctx.kv.k.row(it.b, j1 as usize + jj, g));
                        }
                    }
                    if !direct {
                        prefetch_v(g, j, j + nk);
                    }
                    // K rows not read in place: keys j.. of head g are converted (or
                    // copied) into K̂ just before use, padded with zeros (the dot
                    // products read whole vectors).
                    if !direct {
                        let kh = floats_mut::<S>(&mut sc.k);
                        let jj = ju + j;
                        fetch_rows::<S>(ctx.kv.k_in_place(it.b, g, jj), kh, kst, nk, dqk, |dst| {
                            ctx.kv.pack_k(it.b, g, jj, nk, dst, kst)
                        });
                        for k in kh.chunks_exact_mut(kst).take(nk) {
                            k[dqk..].fill(0.0);
                        }
                    }
                    let kh: &[S::f32s] = &sc.k;
                    let krow = |jj: usize| -> &[S::f32s] {
                        match kin {
                            Some((src, sj, sh)) => {
                                bytemuck::cast_slice(&src[jj * sj + hi * sh..][..dqk])
                            }
                            None => &kh[(jj - j) * kst / lanes..][..dv_],
                        }
                    };
                    let qh = &sc.qr[hi * nr * dv_..][..nr * dv_];
                    // Rows off..off + nr of S, keys j and j + 1.
                    let off = hi * nr;
                    let srows = &mut floats_mut::<S>(&mut sc.st)[j * rs_s..][..nk * rs_s];
                    let (s0, s1) = srows.split_at_mut(rs_s);
                    let s0 = &mut s0[off..off + nr];
                    #[cfg(target_arch = "x86_64")]
                    if let (Some((hs, bf)), Some((src, sj, sh))) = (half, khalf) {
                        let kr = |jj: usize| src[jj * sj + hi * sh..][..dqk].as_ptr();
                        // SAFETY: each K row holds dqk = lanes·dv_ values (sliced above).
                        unsafe {
                            if nk == 2 {
                                let s1 = &mut s1[off..off + nr];
                                let k = [kr(j), kr(j + 1)];
                                dot_rows_half::<S, 2>(hs, bf, k, qh, dv_, [s0, s1]);
                            } else {
                                dot_rows_half::<S, 1>(hs, bf, [kr(j)], qh, dv_, [s0]);
                            }
                        }
                        continue;
                    }
                    // SAFETY: every K row is dv_ vectors long (`krow`).
                    unsafe {
                        if nk == 2 {
                            let k = [krow(j).as_ptr(), krow(j + 1).as_ptr()];
                            dot_rows::<S, 2, _>(simd, k, qh, dv_, [s0, &mut s1[off..off + nr]]);
                        } else {
                            dot_rows::<S, 1, _>(simd, [krow(j).as_ptr()], qh, dv_, [s0]);
                        }
                    }
                }
                j += nk;
            }
            // Lanes past the rows: finite, like the broadcast block leaves them.
            let st = floats_mut::<S>(&mut sc.st);
            for srow in st.chunks_exact_mut(rs_s).take(n) {
                srow[nr_s..nvec_s * lanes].fill(0.0);
            }
            // Every head's rows at once; P stays in S (not interleaved).
            let rows = |x: usize| row_of(it.g0 + x / nr, x % nr);
            let tile = (ju, n, pbase);
            scores_to_p(
                simd, ctx, it.b, sc, 0, tile, class, nr_s, rs_s, &rows, c_dom, false, bcp,
            );
        }
        for hi in 0..nh {
            let g = it.g0 + hi;
            let nkb = n.div_ceil(MK);
            // Keys [lo, hi) of this tile (relative to ju) that rows ra..rb can see: on a
            // partial tile (the causal diagonal, a window's edges) QK blocks and PV
            // reductions outside them are skipped. Rows are position-major and both ends
            // of a row's range are monotone in its position.
            let span = |ra: usize, rb: usize| -> (usize, usize) {
                if class != TileClass::Partial || rb <= ra {
                    return (0, n);
                }
                let (lo, _) = ctx.mask.key_range(ctx.mask.pos(row_of(g, ra).0));
                let (_, hi) = ctx.mask.key_range(ctx.mask.pos(row_of(g, rb - 1).0));
                let lo = (lo - ju as i64).clamp(0, n as i64) as usize;
                let hi = (hi - ju as i64).clamp(lo as i64, n as i64) as usize;
                (lo, hi)
            };
            // K (broadcast QK): full key blocks are read in place when K is f32 (no
            // copy); the tail block and other types use K̂.
            let mut kd_blocks = 0;
            let mut kd: (*const f32, usize) = (core::ptr::null(), 0);
            // The head's cached panels of this tile, packed first if no earlier item on
            // this scratch did.
            let mut cached: (*const f32, *const f32) = (core::ptr::null(), core::ptr::null());
            if cache {
                let tile = ju / BC;
                if !sc.cdone[tile] {
                    let kc = &mut floats_mut::<S>(&mut sc.kc)[tile * kc_tile..][..kc_tile];
                    let vc = &mut floats_mut::<S>(&mut sc.vc)[tile * vc_tile..][..vc_tile];
                    let vr = if o_rows { vrow } else { 0 };
                    let blk = &mut sc.blk;
                    pack_panels::<S, _, _, _, MK, MC>(
                        ctx,
                        it.b,
                        g,
                        tile,
                        kc,
                        vc,
                        vr,
                        blk,
                        lanes == 16,
                    );
                    sc.cdone[tile] = true;
                }
                // SAFETY: tile < all_tiles, within both caches (`ensure` above).
                cached = unsafe {
                    (
                        (sc.kc.as_ptr() as *const f32).add(tile * kc_tile),
                        (sc.vc.as_ptr() as *const f32).add(tile * vc_tile),
                    )
                };
            }
            if !dot && !cache {
                if let Some((src, stride)) = ctx.kv.k_in_place(it.b, g, ju) {
                    kd_blocks = n / MK;
                    if kd_blocks > 0 {
                        assert!((kd_blocks * MK - 1) * stride + dqk <= src.len());
                        kd = (src.as_ptr(), stride);
                    }
                }
                let packed_keys = n - kd_blocks * MK;
                if packed_keys > 0 {
                    let dst = floats_mut::<S>(&mut sc.k);
                    ctx.kv
                        .pack_k(it.b, g, ju + kd_blocks * MK, packed_keys, dst, dqk);
                }
            }
            // V: read in place when it is f32 and its columns fill whole PV blocks (for
            // dot-product items, whole vectors); else packed into V̂ (rows of vrow floats,
            // whose padding columns only ever reach padding columns of O). PV broadcasts
            // V, so in place it costs no copy, and rows that share an L1 set (BSHD rows
            // 4 KiB apart) cost one L2 read per key.
            let mut vsrc: (*const f32, usize) = (core::ptr::null(), vrow);
            // Or V rows of halves, converted as the PV blocks load them: (row 0, stride).
            let mut vhalf: Option<(*const u16, usize)> = None;
            if half.is_some() {
                let (src, stride, _) = ctx.kv.v_half(it.b, g, ju).expect("half V");
                assert!(n > 0 && (n - 1) * stride + dv <= src.len());
                vhalf = Some((src.as_ptr(), stride));
            } else if cache {
                vsrc = (cached.1, if o_rows { vrow } else { MC });
            } else if in_place {
                let (src, stride) = ctx.kv.v_in_place(it.b, g, ju).expect("f32 V");
                assert!(n > 0 && (n - 1) * stride + dv <= src.len());
                vsrc = (src.as_ptr(), stride);
            } else if !dot
                && !o_rows
                && n > 0
                && dv.is_multiple_of(MC)
                && let Some((src, stride)) = ctx.kv.v_in_place(it.b, g, ju)
            {
                assert!((n - 1) * stride + dv <= src.len());
                vsrc = (src.as_ptr(), stride);
            }
            if vsrc.0.is_null() && vhalf.is_none() {
                assert!(n * vrow <= sc.v.len() * lanes);
                let vh = floats_mut::<S>(&mut sc.v);
                if dot {
                    fetch_rows::<S>(ctx.kv.v_in_place(it.b, g, ju), vh, vrow, n, dv, |dst| {
                        ctx.kv.pack_v(it.b, g, ju, n, dst, vrow)
                    });
                } else {
                    ctx.kv.pack_v(it.b, g, ju, n, vh, vrow);
                }
                vsrc.0 = sc.v.as_ptr() as *const f32;
            }

            // S = K̂·Qᵀ (dot-product items: computed by the sweep above).
            if !dot {
                assert!(cache || (nkb - kd_blocks) * MK * dqk <= sc.k.len() * lanes);
                assert!(nkb * MK * dqk <= kc_tile);
                assert!((hi + 1) * qt_len <= sc.qt.len() * lanes);
                assert!(nkb * MK * rsv <= sc.st.len() && nvec <= rsv);
                // SAFETY: head hi's Qᵀ block is in bounds (asserted).
                let qp = unsafe { sc.qt.as_ptr().add(hi * qt_len / lanes) };
                let sp = sc.st.as_mut_ptr();
                let kp = sc.k.as_ptr() as *const f32;
                let mut rb = 0;
                while rb < nvec {
                    let w = (nvec - rb).min(NVQ);
                    let (klo, khi) = span(rb * lanes, ((rb + w) * lanes).min(nr));
                    let (kb_lo, kb_hi) = (klo / MK, khi.div_ceil(MK));
                    for kb in 0..nkb {
                        if kb < kb_lo || kb >= kb_hi {
                            // No row of the slab sees these keys: -inf, without the
                            // dot products (the partial mask below writes the same).
                            // Through `sp`, which the calls below keep using.
                            let ninf = simd.splat_f32s(f32::NEG_INFINITY);
                            for x in (0..MK).flat_map(|j| (rb..rb + w).map(move |v| (j, v))) {
                                // SAFETY: key kb·MK + j < nkb·MK and vector v < rb + w ≤
                                // nvec ≤ rsv: inside S (asserted above).
                                unsafe { sp.add((kb * MK + x.0) * rsv + x.1).write(ninf) };
                            }
                            continue;
                        }
                        // (first key, key stride, head-dim stride) of the block
                        let (k, kr, kd_) = if cache {
                            // SAFETY: nkb blocks of MK·dqk floats fit a cached tile
                            // (asserted above).
                            (unsafe { cached.0.add(kb * MK * dqk) }, 1, MK)
                        } else if kb < kd_blocks {
                            // SAFETY: block kb < kd_blocks lies inside `src` (asserted above).
                            (unsafe { kd.0.add(kb * MK * kd.1) }, kd.1, 1)
                        } else {
                            // SAFETY: packed blocks fit in `sc.k` (asserted above).
                            (unsafe { kp.add((kb - kd_blocks) * MK * dqk) }, dqk, 1)
                        };
                        // SAFETY: the asserts above bound every extent `bcast_block` touches:
                        // MK rows of K at `k` (in place or packed), Qᵀ vectors rb..rb+w ≤ rsv
                        // of each of the dqk rows, and the same rows/vectors of S.
                        // The cached panels get their own call, with constant strides,
                        // so that its loop addresses the MK keys as one pointer.
                        unsafe {
                            let q = qp.add(rb / NVQ * dqk * NVQ);
                            let s = sp.add(kb * MK * rsv + rb);
                            let blk = |a_row, a_red| tile::Block {
                                a: k,
                                a_row,
                                a_red,
                                b: q,
                                b_stride: NVQ,
                                red: dqk,
                                c: s,
                                c_stride: rsv,
                                alpha: core::ptr::null(),
                            };
                            if cache {
                                tile::bcast_block_w::<S, MK, NVQ, { tile::SET }, _>(
                                    simd,
                                    w,
                                    blk(1, MK),
                                )
                            } else {
                                tile::bcast_block_w::<S, MK, NVQ, { tile::SET }, _>(
                                    simd,
                                    w,
                                    blk(kr, kd_),
                                )
                            }
                        }
                    }
                    rb += w;
                }
            }

            if !dot {
                let rows = |r: usize| row_of(g, r);
                let tile = (ju, n, pbase);
                scores_to_p(
                    simd, ctx, it.b, sc, hi, tile, class, nr, rs, &rows, c_dom, il, bcp,
                );
            }

            // Oᵀ = α·Oᵀ + V̂ᵀ·P. Row blocks outer: one block of P (n keys × NVP vectors,
            // 12 KiB at n = 64, NVP = 3 on AVX-512) stays in L1 while every column block
            // of V streams past it.
            let ohead = &mut sc.o[hi * o_len / lanes..][..o_len / lanes];
            // α of this head's rows (and of the rows after them, up to a PV block).
            let alpha = &floats::<S>(&sc.alpha)[srow(hi, 0)..][..rs];
            assert!(n * rsv_s <= sc.st.len());
            let op = ohead.as_mut_ptr();
            let (vp, vstride) = vsrc;
            if o_rows {
                // O = α·O + P·V̂ over blocks of OR rows × NVO column vectors. P of row r
                // and key j: interleaved at (r / lanes, j, r % lanes), or S's (j, r) (row
                // hi·nr + r of S for dot-product items).
                let (pp, p_key) = if il {
                    (sc.pi.as_ptr() as *const f32, lanes)
                } else {
                    let off = if dot { hi * nr } else { 0 };
                    ((sc.st.as_ptr() as *const f32).wrapping_add(off), rs_s)
                };
                let p_at = |r: usize| {
                    if il {
                        r / lanes * bcp * lanes + r % lanes
                    } else {
                        r
                    }
                };
                // Both layouts hold rsv (S: rsv_s) row vectors × bcp ≥ n keys; in a
                // dot-product item's S this head's rows start at hi·nr, and its PV blocks
                // end by rs_s.
                assert!(n <= bcp && bcp * rsv_s <= if il { sc.pi.len() } else { sc.st.len() });
                let vv = vp as *const S::f32s;
                debug_assert!(vstride.is_multiple_of(lanes));
                if nr <= 4 && OR > 4 {
                    // A GQA group of at most 4 rows (decode) would fill half of an
                    // OR-row block with padding: 4 rows × 4 (or 2) column vectors.
                    let nvo = if lanes >= 16 { 4 } else { 2 };
                    let (klo, khi) = span(0, nr);
                    let nb = dvqv.div_ceil(nvo);
                    let mut cb = 0;
                    while cb < dvqv {
                        let w = (dvqv - cb).min(nvo);
                        if direct {
                            // Block b of nb prefetches the next tile's rows b·bc/nb..
                            let b = cb / nvo;
                            prefetch_v(g, b * bc / nb, (b + 1) * bc / nb);
                        }
                        // SAFETY: as for the OR-row blocks below, with 4 ≤ OR rows.
                        unsafe {
                            let blk = tile::Block {
                                a: pp.add(klo * p_key),
                                a_row: 1,
                                a_red: p_key,
                                b: (),
                                b_stride: 0,
                                red: khi - klo,
                                c: op.add(cb),
                                c_stride: dvqv,
                                alpha: alpha.as_ptr(),
                            };
                            // w ≤ nvo: the 4-vector instantiation dispatches narrower
                            // widths (2 on 16-register ISAs) to their own blocks.
                            match (half, vhalf) {
                                #[cfg(target_arch = "x86_64")]
                                (Some((h, bf)), Some((vh, vst))) => {
                                    let b = vh.add(cb * lanes + klo * vst);
                                    pv_half::<S, 4, 4>(h, bf, w, blk.with_b(b, vst))
                                }
                                _ => {
                                    let vs = vstride / lanes;
                                    let b = vv.add(cb + klo * vs);
                                    tile::bcast_block_w::<S, 4, 4, { tile::ACC_ROWS }, _>(
                                        simd,
                                        w,
                                        blk.with_b(b, vs),
                                    )
                                }
                            }
                        }
                        cb += w;
                    }
                    continue;
                }
                if direct {
                    prefetch_v(g, 0, bc);
                }
                for r0 in (0..nr).step_by(OR) {
                    assert!(r0 + OR <= rs);
                    // Keys past the block's visible range have p = 0: not reduced over.
                    let (klo, khi) = span(r0, (r0 + OR).min(nr));
                    let mut cb = 0;
                    while cb < dvqv {
                        let w = (dvqv - cb).min(NVO);
                        // SAFETY: P of keys klo ≤ j < khi ≤ n and rows r0..r0+OR ≤ rs from
                        // `pp` (dot-product items: S rows hi·nr + r0 + OR ≤ rs_s) (asserted; an
                        // OR-row block stays within one row vector when interleaved);
                        // V̂ rows j < n, vectors cb..cb+w ≤ dvqv ≤ vrow/lanes (packed in
                        // `sc.v`, asserted above); O rows r0..r0+OR ≤ rs of dvqv vectors
                        // and α floats r0..r0+OR ≤ rs: in this head's blocks.
                        unsafe {
                            let blk = tile::Block {
                                a: pp.add(p_at(r0) + klo * p_key),
                                a_row: 1,
                                a_red: p_key,
                                b: (),
                                b_stride: 0,
                                red: khi - klo,
                                c: op.add(r0 * dvqv + cb),
                                c_stride: dvqv,
                                alpha: alpha.as_ptr().add(r0),
                            };
                            match (half, vhalf) {
                                #[cfg(target_arch = "x86_64")]
                                (Some((h, bf)), Some((vh, vst))) => {
                                    let b = vh.add(cb * lanes + klo * vst);
                                    pv_half::<S, OR, NVO>(h, bf, w, blk.with_b(b, vst))
                                }
                                _ => {
                                    let vs = vstride / lanes;
                                    let b = vv.add(cb + klo * vs);
                                    tile::bcast_block_w::<S, OR, NVO, { tile::ACC_ROWS }, _>(
                                        simd,
                                        w,
                                        blk.with_b(b, vs),
                                    )
                                }
                            }
                        }
                        cb += w;
                    }
                }
                continue;
            }
            // Column block cb starts at column cb of a V row, or at run cb·BC of the cache.
            let vcb = if cache { BC } else { 1 };
            let pp = sc.st.as_ptr();
            let mut rb = 0;
            while rb < nvec {
                let w = (nvec - rb).min(NVP);
                let (klo, khi) = span(rb * lanes, ((rb + w) * lanes).min(nr));
                for cb in (0..dvp).step_by(MC) {
                    // SAFETY: P rows klo ≤ j < khi ≤ n of rs floats (asserted), Oᵀ rows cb..cb+MC ≤ dvp
                    // and row vectors rb..rb+w ≤ nvec ≤ rsv of this head's block, α
                    // vectors rb..rb+w < nvec, and V rows j < n, columns cb..cb+MC: in
                    // place those are < dv (dv is a multiple of MC there) within the
                    // asserted extent, packed < dvp within `sc.v` (asserted).
                    unsafe {
                        let blk = tile::Block {
                            a: vp.add(cb * vcb + klo * vstride),
                            a_row: 1,
                            a_red: vstride,
                            b: pp.add(rb + klo * rsv),
                            b_stride: rsv,
                            red: khi - klo,
                            c: op.add(cb * rsv + rb),
                            c_stride: rsv,
                            alpha: alpha.as_ptr().add(rb * lanes),
                        };
                        tile::bcast_block_w::<S, MC, NVP, { tile::ACC_LANES }, _>(simd, w, blk)
                    }
                }
                rb += w;
            }
        }
    }

    let m = floats::<S>(&sc.m);
    let l = floats::<S>(&sc.l);
    let o = floats::<S>(&sc.o);
    // Row r of head hi's output: row r of its O block, or column r of its Oᵀ block.
    let gather = |hi: usize, r: usize, dst: &mut [f32]| {
        if o_rows {
            copy_row::<S>(&o[hi * o_len + r * dvq..][..dv], dst);
        } else {
            let col = &o[hi * o_len + r..];
            for (c, x) in dst.iter_mut().enumerate() {
                *x = col[c * rs];
            }
        }
    };
    if it.splits > 1 {
        // A split item leaves its unnormalised state for the group's merge.
        let br = ctx.layout.prow;
        debug_assert!(nr <= br);
        let slot = ctx.layout.slot(dv);
        // SAFETY: this item is the only writer of its slot; the merge reads it after
        // the group's counter says every split finished.
        let part = unsafe {
            ctx.sink
                .partial((it.group * it.splits + it.split) * slot, slot)
        };
        for hi in 0..nh {
            let ph = &mut part[hi * br * (dv + 2)..][..br * (dv + 2)];
            let (po, rest) = ph.split_at_mut(br * dv);
            let (pm, pl) = rest.split_at_mut(br);
            for r in 0..nr {
                gather(hi, r, &mut po[r * dv..][..dv]);
                pm[r] = m[srow(hi, r)];
                pl[r] = l[srow(hi, r)];
            }
        }
        return;
    }
    // TB rows at a time, so that each output column reads a run of TB floats of Oᵀ.
    let out = &mut sc.row[..dv];
    let blk = &mut sc.blk[..TB * dv];
    for hi in 0..nh {
        if o_rows {
            for r in 0..nr {
                let (i, h) = row_of(it.g0 + hi, r);
                if r + PACK_AHEAD < nr {
                    let (ia, ha) = row_of(it.g0 + hi, r + PACK_AHEAD);
                    ctx.sink.prefetch_row(it.b, ia, ha);
                }
                let x = srow(hi, r);
                let orow = &o[hi * o_len + r * dvq..][..dv];
                finish_row(ctx, it.b, i, h, m[x] as f64, l[x] as f64, orow, out);
            }
            continue;
        }
        let ot = &o[hi * o_len..][..dvp * rs];
        for r0 in (0..nr).step_by(TB) {
            let nb = (nr - r0).min(TB);
            for (c, run) in ot.chunks_exact(rs).take(dv).enumerate() {
                for (rr, &x) in run[r0..r0 + nb].iter().enumerate() {
                    blk[rr * dv + c] = x;
                }
            }
            for (rr, orow) in blk.chunks_exact(dv).take(nb).enumerate() {
                let (i, h) = row_of(it.g0 + hi, r0 + rr);
                let x = srow(hi, r0 + rr);
                finish_row(ctx, it.b, i, h, m[x] as f64, l[x] as f64, orow, out);
            }
        }
    }
}

/// Fills `n` rows of `dst` (`dst_stride` floats apart) with `len` values each of K or V:
/// from f32 storage read in place (`src`: rows and their stride) by an inlined vector
/// copy (a call to memcpy per row cost decode more than a tenth of its time), else
/// through `convert` (one call for all the rows).
#[inline(always)]
fn fetch_rows<S: Simd>(
    src: Option<(&[f32], usize)>,
    dst: &mut [f32],
    dst_stride: usize,
    n: usize,
    len: usize,
    convert: impl FnOnce(&mut [f32]),
) {
    match src {
        Some((src, stride)) => {
            for r in 0..n {
                copy_row::<S>(&src[r * stride..][..len], &mut dst[r * dst_stride..][..len]);
            }
        }
        None => convert(dst),
    }
}

/// Hints that the lines of `row` will be needed soon (into L2 on x86-64; a no-op
/// elsewhere).
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    prefetch_lines(
        row.as_ptr() as *const u8,
        core::mem::size_of_val(row),
        false,
    );
}

/// Prefetches the lines of `bytes` bytes from `p`: into L2 to be read, or into L1 to be
/// written (`write`). A hint that never faults; a no-op off x86-64.
#[inline(always)]
fn prefetch_lines(p: *const u8, bytes: usize, write: bool) {
    // Every line the range touches, `(skew + bytes).div_ceil(64)` of them from the line
    // of `p`: stepping from `p` itself missed the last line of a row that does not start
    // on a line boundary (an f16 row of odd length in BSHD, say).
    let skew = p as usize % 64;
    let first = p.wrapping_sub(skew);
    #[cfg(target_arch = "x86_64")]
    for off in (0..skew + bytes).step_by(64) {
        use core::arch::x86_64::{_MM_HINT_ET0, _MM_HINT_T1, _mm_prefetch};
        let at = first.wrapping_add(off) as *const i8;
        // SAFETY: a prefetch is a hint that never faults, whatever the address.
        unsafe {
            if write {
                _mm_prefetch::<_MM_HINT_ET0>(at)
            } else {
                _mm_prefetch::<_MM_HINT_T1>(at)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (first, bytes, write);
}

/// `dst = src` (equal lengths), by whole vectors and then floats, inlined.
#[inline(always)]
fn copy_row<S: Simd>(src: &[f32], dst: &mut [f32]) {
    let (sv, st) = S::as_simd_f32s(src);
    let (dv, dt) = S::as_mut_simd_f32s(dst);
    for (d, s) in dv.iter_mut().zip(sv) {
        *d = *s;
    }
    dt.copy_from_slice(st);
}

/// Rows ahead that the row copies (K/V packing, Q loads, output writes) prefetch.
///
/// Rows of one head are a page apart, so these fetches are bound by the line fill
/// buffers (about 8 GB/s here), and they take ~6 % of a's and d's time. Spreading the
/// same prefetches (next K/V tile, next item's Q, this item's output rows) between the
/// micro-kernel calls made a and d 2–3 % slower: they hold the fill buffers that the
/// panels' L2 reads need.
const PACK_AHEAD: usize = 8;

/// Packs tile `tile` (keys `tile·BC ..`) of `(b, g)` into the panel cache: K̂ into `kc`
/// (blocks of MK keys, each `dqk` runs of MK floats), V̂ into `vc` (column blocks of MC,
/// each BC runs of MC floats; or, with `vrow > 0`, rows of `vrow` floats). Padding (keys
/// past the tile, columns past `dv`) is zeroed: scratch outlives calls, so it may hold
/// another shape's floats.
#[allow(clippy::too_many_arguments)]
fn pack_panels<S: Simd, Q, KV: Element, O, const MK: usize, const MC: usize>(
    ctx: &Ctx<'_, Q, KV, O>,
    b: usize,
    g: usize,
    tile: usize,
    kc: &mut [f32],
    vc: &mut [f32],
    vrow: usize,
    blk: &mut [f32],
    avx512: bool,
) {
    let (dqk, dv) = (ctx.dims.dqk, ctx.dims.dv);
    let j0 = tile * BC;
    let n = BC.min(ctx.dims.skv - j0);
    if n < BC {
        kc.fill(0.0);
    }
    if n < BC || !dv.is_multiple_of(MC) || vrow > dv {
        vc.fill(0.0);
    }
    let skv = ctx.dims.skv;
    // f32 K and V are read in place: K blocks transposed straight from their rows, V rows
    // copied by an inlined vector loop (not a call to memmove per row). With the Q and
    // output rows done alike, a ran ~1 % faster; the DRAM waits the calls' samples held
    // mostly moved to the row prefetches (see PACK_AHEAD).
    let k_f32 = ctx.kv.k_in_place(b, g, j0);
    let v_f32 = ctx.kv.v_in_place(b, g, j0).filter(|_| vrow > 0);
    for jj in 0..n {
        // Rows of one head are a head count apart (4 KiB in BSHD at 8 kv heads × d 128),
        // so each is a new page and the hardware prefetchers do not run ahead: ask for
        // the row PACK_AHEAD keys on (into the next tile, too) while copying this one.
        let ja = j0 + jj + PACK_AHEAD;
        if ja < skv {
            prefetch(ctx.kv.k.row(b, ja, g));
            prefetch(ctx.kv.v.row(b, ja, g));
        }
        // Each block of MK keys is transposed into K̂ at once, from K's rows in place or
        // from the rows gathered in `kblk`.
        let (kblk, row) = blk.split_at_mut(MK * dqk);
        if k_f32.is_none() {
            ctx.kv
                .pack_k(b, g, j0 + jj, 1, &mut kblk[jj % MK * dqk..], dqk);
        }
        if jj % MK == MK - 1 || jj + 1 == n {
            let rows = jj % MK + 1;
            let block = &mut kc[jj / MK * MK * dqk..][..MK * dqk];
            match k_f32 {
                Some((src, stride)) => {
                    let first = &src[(jj + 1 - rows) * stride..];
                    transpose::transpose(avx512, first, stride, rows, dqk, block, MK)
                }
                None => transpose::transpose(avx512, kblk, dqk, rows, dqk, block, MK),
            }
        }
        if vrow > 0 {
            let dst = &mut vc[jj * vrow..][..dv];
            match v_f32 {
                Some((src, stride)) => copy_row::<S>(&src[jj * stride..][..dv], dst),
                None => ctx.kv.pack_v(b, g, j0 + jj, 1, dst, vrow),
            }
            continue;
        }
        ctx.kv.pack_v(b, g, j0 + jj, 1, row, dv);
        for (cb, ch) in row[..dv].chunks(MC).enumerate() {
            vc[cb * BC * MC + jj * MC..][..ch.len()].copy_from_slice(ch);
        }
    }
}

/// o = O / (l + e^{sink - m}); lse = m + ln l, with `m` in the score domain of the
/// kernel (raw dot products unless `ctx.modified`). Rows with no visible key (m = -inf)
/// write exactly 0 and lse = -inf.
#[allow(clippy::too_many_arguments)]
fn finish_row<Q, KV, O: Element>(
    ctx: &Ctx<'_, Q, KV, O>,
    b: usize,
    i: usize,
    h: usize,
    m: f64,
    l: f64,
    o: &[f32],
    out: &mut [f32],
) {
    let d = &ctx.dims;
    let lse_idx = (b * d.hq + h) * d.sq + i;
    if m.is_nan() || l.is_nan() || m == f64::INFINITY {
        // A NaN score (NaN in Q or in a visible key of K), or a dot product past f32's
        // range (+inf; the f32 result would be meaningless): the row is NaN.
        out.fill(f32::NAN);
        ctx.sink.write_row(b, i, h, out);
        ctx.sink.write_lse(lse_idx, f32::NAN);
        return;
    }
    if m == f64::NEG_INFINITY || l <= 0.0 {
        out.fill(0.0);
        ctx.sink.write_row(b, i, h, out);
        ctx.sink.write_lse(lse_idx, f32::NEG_INFINITY);
        return;
    }
    let c = if ctx.modified { 1.0 } else { ctx.params.scale };
    // `l` is relative to the kernel's shift for m (its f32 rounding included).
    let ms = softmax::shift_ln(m as f32, c);
    let mut denom = l;
    if let Some(sinks) = ctx.params.sinks {
        denom += (sinks[h] as f64 - ms).exp();
    }
    let inv = (1.0 / denom) as f32;
    ctx.sink.write_row_scaled(b, i, h, o, inv, out);
    ctx.sink.write_lse(lse_idx, (ms + l.ln()) as f32);
}

/// Merges the splits of `group` into its output rows, in split order (deterministic).
///
/// # Safety
/// Every item of the group has finished, and their writes happen-before this call
/// (the plan's acquire/release counter).
pub(crate) unsafe fn merge_group<Q, KV, O: Element>(ctx: &Ctx<'_, Q, KV, O>, group: usize) {
    let d = &ctx.dims;
    let lay = &ctx.layout;
    let it = lay.item(d, group * lay.splits);
    let (br, dv, splits) = (lay.prow, d.dv, lay.splits);
    let groupsz = d.group();
    let r0 = it.t * lay.br;
    let nr = (d.sq * groupsz - r0).min(lay.br);
    debug_assert!(nr <= br);
    let slot = lay.slot(dv);
    let mut acc = vec![0.0f32; dv];
    let mut out = vec![0.0f32; dv];
    let c = if ctx.modified { 1.0 } else { ctx.params.scale };
    // SAFETY: all splits finished (the caller's contract): the slots are ours to read.
    let parts: Vec<&mut [f32]> = (0..splits)
        .map(|s| unsafe { ctx.sink.partial((group * splits + s) * slot, slot) })
        .collect();
    for hi in 0..it.g1 - it.g0 {
        let base = hi * br * (dv + 2);
        for r in 0..nr {
            let g = it.g0 + hi;
            let (i, h) = ((r0 + r) / groupsz, g * groupsz + (r0 + r) % groupsz);
            let m_at = |p: &[f32]| p[base + br * dv + r] as f64;
            // NaN (a split met a NaN score) wins, so that the row's output is NaN.
            let mx = parts
                .iter()
                .map(|p| m_at(p))
                .fold(f64::NEG_INFINITY, |a, b| {
                    if a.is_nan() || b.is_nan() {
                        f64::NAN
                    } else {
                        a.max(b)
                    }
                });
            acc.fill(0.0);
            let mut l = 0.0f64;
            // The next row's output in every slot: a row reads its dv floats from each slot
            // in turn, which the hardware prefetchers do not follow, and half the slots
            // are in the other core's cache after a 2-thread call (decode c on 2
            // threads: 40–43 µs, against 48–50 without).
            let next = if r + 1 < nr {
                Some(base + (r + 1) * dv)
            } else {
                (hi + 1 < it.g1 - it.g0).then_some(base + br * (dv + 2))
            };
            if let Some(n) = next {
                for p in &parts {
                    prefetch(&p[n..][..dv]);
                }
            }
            if mx != f64::NEG_INFINITY {
                for p in &parts {
                    let (ms, ls) = (m_at(p), p[base + br * dv + br + r] as f64);
                    if ms == f64::NEG_INFINITY {
                        continue;
                    }
                    // Each split's `l` and O are relative to its own shift.
                    let shift = |m: f64| softmax::shift_ln(m as f32, c);
                    let w = (shift(ms) - shift(mx)).exp();
                    l += ls * w;
                    let wf = w as f32;
                    for (a, &x) in acc.iter_mut().zip(&p[base + r * dv..][..dv]) {
                        *a += x * wf;
                    }
                }
            }
            finish_row(ctx, it.b, i, h, mx, l, &acc, &mut out);
        }
    }
}

/// Scores to probabilities for `nr` rows of S (`sc.st`, row stride `rs`), whose row
/// state (and ALiBi lanes) is block `hb` of `rs` floats, and which map to `(i, h)`
/// through `row_of`: the modifiers, the partial mask (-inf outside each row's keys),
/// then the online softmax, which writes P in place or, with `il`, interleaved into
/// `sc.pi` (`bcp` keys per row vector).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores_to_p<S: Simd, Q, KV, O>(
    simd: S,
    ctx: &Ctx<'_, Q, KV, O>,
    b: usize,
    sc: &mut Scratch<S>,
    hb: usize,
    (ju, n, pbase): (usize, usize, i64),
    class: TileClass,
    nr: usize,
    rs: usize,
    row_of: &impl Fn(usize) -> (usize, usize),
    c_dom: f32,
    il: bool,
    bcp: usize,
) {
    let (rsv, nvec) = (rs / S::F32_LANES, nr.div_ceil(S::F32_LANES));
    if ctx.modified {
        apply_modifiers(simd, ctx, b, sc, hb, (ju, n, pbase), nr, nvec, rs, row_of);
    }
    if class == TileClass::Partial {
        let st = floats_mut::<S>(&mut sc.st);
        for r in 0..nr {
            let (lo, hi) = ctx.mask.key_range(ctx.mask.pos(row_of(r).0));
            let a = (lo - ju as i64).clamp(0, n as i64) as usize;
            let e = (hi - ju as i64).clamp(a as i64, n as i64) as usize;
            for j in (0..a).chain(e..n) {
                st[j * rs + r] = f32::NEG_INFINITY;
            }
        }
    }
    let mut sm = OnlineSoftmax::<S> {
        m: &mut sc.m[hb * rsv..][..nvec],
        l: &mut sc.l[hb * rsv..][..nvec],
    };
    let al = &mut sc.alpha[hb * rsv..][..nvec];
    if il {
        sm.update::<true>(simd, &mut sc.st, rsv, n, c_dom, al, &mut sc.pi, bcp);
    } else {
        sm.update::<false>(simd, &mut sc.st, rsv, n, c_dom, al, &mut [], 0);
    }
}

/// Scale, softcap, ALiBi and bias on the tile's scores (`s` domain from here on), for
/// head block `hb` of the item, whose rows map to `(i, h)` through `row_of`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn apply_modifiers<S: Simd, Q, KV, O>(
    simd: S,
    ctx: &Ctx<'_, Q, KV, O>,
    b: usize,
    sc: &mut Scratch<S>,
    hb: usize,
    (j0, n, pbase): (usize, usize, i64),
    nr: usize,
    nvec: usize,
    br: usize,
    row_of: &impl Fn(usize) -> (usize, usize),
) {
    let p = &ctx.params;
    let brv = br / S::F32_LANES;
    let scale = simd.splat_f32s(p.scale);
    // Scores that overflow f32 (scale 1e30 times a large dot, a negative ALiBi slope)
    // saturate at ±f32::MAX instead of becoming ±inf, which would turn into NaN at the
    // max subtraction; -inf from the bias or the mask is applied after this clamp.
    let (lo, hi) = (simd.splat_f32s(-f32::MAX), simd.splat_f32s(f32::MAX));
    for j in 0..n {
        let row = &mut sc.st[j * brv..j * brv + nvec];
        // Key position relative to the rows' base (`posf`): |p - j| is then exact up to
        // distances of 2^24, and rounds like f32(|p - j|) beyond.
        let jf = simd.splat_f32s(((j0 + j) as i64 - pbase) as f32);
        for (v, x) in row.iter_mut().enumerate() {
            let raw = *x;
            let mut s = simd.min_f32s(simd.max_f32s(simd.mul_f32s(raw, scale), lo), hi);
            if let Some(cap) = p.softcap {
                let capv = simd.splat_f32s(cap);
                s = simd.mul_f32s(capv, math::tanh(simd, simd.div_f32s(s, capv)));
            }
            if p.alibi.is_some() {
                let dist = simd.abs_f32s(simd.sub_f32s(sc.posf[hb * brv + v], jf));
                s = simd.sub_f32s(s, simd.mul_f32s(sc.slope[hb * brv + v], dist));
                s = simd.min_f32s(s, hi);
            }
            // The clamps drop NaN (a NaN from Q or K): keep it, for the softmax to see.
            *x = simd.select_f32s(simd.equal_f32s(raw, raw), s, raw);
        }
    }
    if let Some(bias) = &p.bias {
        let st = floats_mut::<S>(&mut sc.st);
        for r in 0..nr {
            let (i, h) = row_of(r);
            let brow = &bias.row(b, h, i)[j0..j0 + n];
            for (j, &bj) in brow.iter().enumerate() {
                // Saturate +inf at f32::MAX; NaN stays NaN (`min` would drop it).
                let y = st[j * br + r] + bj;
                st[j * br + r] = if y > f32::MAX { f32::MAX } else { y };
            }
        }
    }
}

/// The lane sums of NK × 4 vectors: on AVX2 four at a time by horizontal adds (3
/// `vhaddps`, an extract and an add for four, against 6 operations each), on AVX-512
/// eight at a time when NK = 2 ([`sum_lanes_8_v4`]), elsewhere one by one.
#[inline(always)]
fn sum_lanes_4<S: Simd, const NK: usize>(simd: S, a: [[S::f32s; 4]; NK]) -> [[f32; 4]; NK] {
    // Plain loops: through `array::map`'s closures the intrinsics were not inlined (a
    // call per `vhaddps`, decode 30–60 % slower).
    let mut out = [[0.0; 4]; NK];
    #[cfg(target_arch = "x86_64")]
    if let Some(&v3) = (&simd as &dyn core::any::Any).downcast_ref::<pulp::x86::V3>() {
        for kk in 0..NK {
            out[kk] = sum_lanes_4_v3(v3, bytemuck::cast(a[kk]));
        }
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if NK == 2
        && let Some(&v4) = (&simd as &dyn core::any::Any).downcast_ref::<pulp::x86::V4>()
    {
        let s = sum_lanes_8_v4(v4, bytemuck::cast([a[0], a[1]]));
        out[0] = [s[0], s[1], s[2], s[3]];
        out[1] = [s[4], s[5], s[6], s[7]];
        return out;
    }
    for kk in 0..NK {
        for r in 0..4 {
            out[kk][r] = simd.reduce_sum_f32s(a[kk][r]);
        }
    }
    out
}

/// The lane sums of four AVX2 vectors.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sum_lanes_4_v3(simd: pulp::x86::V3, a: [core::arch::x86_64::__m256; 4]) -> [f32; 4] {
    // In each 128-bit half: pair sums of a0 and a1 (and of a2, a3), then the half's sum
    // of each of the four; the two halves are added last.
    let h01 = simd.avx._mm256_hadd_ps(a[0], a[1]);
    let h23 = simd.avx._mm256_hadd_ps(a[2], a[3]);
    let h = simd.avx._mm256_hadd_ps(h01, h23);
    let lo = simd.avx._mm256_castps256_ps128(h);
    let hi = simd.avx._mm256_extractf128_ps::<1>(h);
    bytemuck::cast(simd.sse._mm_add_ps(lo, hi))
}

/// The lane sums of eight AVX-512 vectors, in their order. Each step adds halves of two
/// vectors at once (512 → 256 → 128 lanes' worth, then within 128-bit blocks), 24 µops
/// against ~70 for eight separate reductions (each 256 + 128-bit extracts and two
/// in-lane shuffles, all on the shuffle port), which took as many µops as the pass's 64
/// FMAs. Decode c on Sapphire Rapids, one thread: 1.84 → 1.79 ms with K/V in L3; with
/// K/V cold, where DRAM bounds it, 3.07 → 2.99 ms (within the noise).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sum_lanes_8_v4(simd: pulp::x86::V4, a: [core::arch::x86_64::__m512; 8]) -> [f32; 8] {
    let f = simd.avx512f;
    // [x.b0, x.b1, y.b0, y.b1] + [x.b2, x.b3, y.b2, y.b3] (b: 128-bit blocks).
    let halves = |x, y| {
        f._mm512_add_ps(
            f._mm512_shuffle_f32x4::<0x44>(x, y),
            f._mm512_shuffle_f32x4::<0xee>(x, y),
        )
    };
    let (w0, w1) = (halves(a[0], a[1]), halves(a[2], a[3]));
    let (w2, w3) = (halves(a[4], a[5]), halves(a[6], a[7]));
    // [x.b0, x.b2, y.b0, y.b2] + [x.b1, x.b3, y.b1, y.b3]: block i holds 4 partial sums
    // of vector i (of a[0..4] in lo, a[4..8] in hi).
    let quarters = |x, y| {
        f._mm512_add_ps(
            f._mm512_shuffle_f32x4::<0x88>(x, y),
            f._mm512_shuffle_f32x4::<0xdd>(x, y),
        )
    };
    let (lo, hi) = (quarters(w0, w1), quarters(w2, w3));
    // Per block i: [lo0 + lo2, hi0 + hi2, lo1 + lo3, hi1 + hi3], then lanes 0 and 1 get
    // the sums of a[i] and a[4 + i].
    let c = f._mm512_add_ps(f._mm512_unpacklo_ps(lo, hi), f._mm512_unpackhi_ps(lo, hi));
    let c = f._mm512_add_ps(c, f._mm512_permute_ps::<0x4e>(c));
    let idx = f._mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    let r = f._mm512_permutexvar_ps(idx, c);
    let r: [f32; 16] = bytemuck::cast(r);
    core::array::from_fn(|i| r[i])
}

/// The backend of a decode item that reads f16/bf16 K and V in place (`tile::HalfRows`).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum HalfSimd {
    V4(pulp::x86::V4),
    /// AVX2 with F16C, which the AVX2 backend is compiled with (`backend::dispatch`);
    /// checked again here, as `HalfRows` relies on it.
    V3(pulp::x86::V3),
}

#[cfg(target_arch = "x86_64")]
impl HalfSimd {
    #[inline(always)]
    fn of<S: Simd>(simd: S) -> Option<HalfSimd> {
        let any = &simd as &dyn core::any::Any;
        if let Some(&v4) = any.downcast_ref::<pulp::x86::V4>() {
            return Some(HalfSimd::V4(v4));
        }
        let v3 = *any.downcast_ref::<pulp::x86::V3>()?;
        std::arch::is_x86_feature_detected!("f16c").then_some(HalfSimd::V3(v3))
    }
}

/// [`dot_rows`] over K rows of f16 (`bf` false) or bf16 values, converted as they load.
///
/// # Safety
/// Each `k` row holds `lanes·dv` values; `hs` is the backend `S`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_rows_half<S: Simd, const NK: usize>(
    hs: HalfSimd,
    bf: bool,
    k: [*const u16; NK],
    qh: &[S::f32s],
    dv: usize,
    s: [&mut [f32]; NK],
) {
    let qh = floats::<S>(qh);
    // SAFETY: the caller's contract; V3 is only made with F16C present.
    unsafe {
        match (hs, bf) {
            (HalfSimd::V4(v4), true) => {
                let k = k.map(tile::HalfRows::<true>);
                dot_rows::<_, NK, _>(v4, k, bytemuck::cast_slice(qh), dv, s)
            }
            (HalfSimd::V4(v4), false) => {
                let k = k.map(tile::HalfRows::<false>);
                dot_rows::<_, NK, _>(v4, k, bytemuck::cast_slice(qh), dv, s)
            }
            (HalfSimd::V3(v3), true) => {
                let k = k.map(tile::HalfRows::<true>);
                dot_rows::<_, NK, _>(v3, k, bytemuck::cast_slice(qh), dv, s)
            }
            (HalfSimd::V3(v3), false) => {
                let k = k.map(tile::HalfRows::<false>);
                dot_rows::<_, NK, _>(v3, k, bytemuck::cast_slice(qh), dv, s)
            }
        }
    }
}

/// The row-major PV block ([`tile::bcast_block_w`], `ACC_ROWS`, P broadcast with unit
/// row stride) over V rows of f16 (`bf` false) or bf16 values, `op.b_stride` values
/// apart, converted as they load.
///
/// # Safety
/// As [`tile::bcast_block_w`], with V row `t` at `op.b + t·op.b_stride` holding `lanes·w`
/// values; `hs` is the backend `S`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pv_half<S: Simd, const M: usize, const NV: usize>(
    hs: HalfSimd,
    bf: bool,
    w: usize,
    op: tile::Block<*const u16, S::f32s>,
) {
    // SAFETY: the caller's contract; V3 is only made with F16C present.
    unsafe {
        match (hs, bf) {
            (HalfSimd::V4(v4), true) => pv_rows::<_, M, NV, true>(v4, w, op.cast()),
            (HalfSimd::V4(v4), false) => pv_rows::<_, M, NV, false>(v4, w, op.cast()),
            (HalfSimd::V3(v3), true) => pv_rows::<_, M, NV, true>(v3, w, op.cast()),
            (HalfSimd::V3(v3), false) => pv_rows::<_, M, NV, false>(v3, w, op.cast()),
        }
    }
}

/// [`pv_half`] for one backend and type.
///
/// # Safety
/// As [`pv_half`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pv_rows<S: Simd, const M: usize, const NV: usize, const BF: bool>(
    simd: S,
    w: usize,
    op: tile::Block<*const u16, S::f32s>,
) where
    tile::HalfRows<BF>: tile::Rows<S>,
{
    let b = tile::HalfRows::<BF>(op.b);
    // SAFETY: the caller's contract.
    unsafe {
        tile::bcast_block_w::<_, M, NV, { tile::ACC_ROWS }, _>(simd, w, op.with_b(b, op.b_stride))
    }
}

/// Scores of NK keys against every query row of a decode item, as dot products along
/// the head dim: `s[k][r] = K_k · Q_r` for the `qh.len() / dv` rows of `qh` (row-major,
/// `dv` vectors each), K rows of f32 vectors or of halves converted as they load. Four
/// query rows × NK keys per pass keep 4·NK independent FMA chains: with one key (4
/// chains of d/lanes dependent FMAs) the loop was bound by the FMA latency, not its
/// throughput.
///
/// # Safety
/// Vectors `0..dv` of each of the `k` rows are readable ([`tile::Rows::get`]).
#[inline(always)]
unsafe fn dot_rows<S: Simd, const NK: usize, K: tile::Rows<S>>(
    simd: S,
    k: [K; NK],
    qh: &[S::f32s],
    dv: usize,
    s: [&mut [f32]; NK],
) {
    let zero = simd.splat_f32s(0.0);
    let rows = qh.len() / dv;
    for sk in &s {
        assert!(sk.len() >= rows);
    }
    let mut x = 0;
    while x + 4 <= rows {
        let q = &qh[x * dv..][..4 * dv];
        let mut a = [[zero; 4]; NK];
        let qp = q.as_ptr();
        for t in 0..dv {
            // SAFETY: t < dv, the length of each of the 4 Q rows, and K's by the
            // caller.
            unsafe {
                let y = [
                    *qp.add(t),
                    *qp.add(dv + t),
                    *qp.add(2 * dv + t),
                    *qp.add(3 * dv + t),
                ];
                for kk in 0..NK {
                    let kv = k[kk].get(simd, t);
                    for r in 0..4 {
                        a[kk][r] = simd.mul_add_e_f32s(kv, y[r], a[kk][r]);
                    }
                }
            }
        }
        let sums = sum_lanes_4::<S, NK>(simd, a);
        for kk in 0..NK {
            s[kk][x..x + 4].copy_from_slice(&sums[kk]);
        }
        x += 4;
    }
    while x < rows {
        let q = &qh[x * dv..][..dv];
        let mut a = [zero; NK];
        for (t, &qt) in q.iter().enumerate() {
            for kk in 0..NK {
                // SAFETY: t < dv (by the caller).
                a[kk] = simd.mul_add_e_f32s(unsafe { k[kk].get(simd, t) }, qt, a[kk]);
            }
        }
        for kk in 0..NK {
            s[kk][x] = simd.reduce_sum_f32s(a[kk]);
        }
        x += 1;
    }
}
