//! The tiled driver: one loop for every feature.
//!
//! ```text
//! item = (batch b, kv head g, tile t of query rows)            // from the shape only
//! rows of the tile: r = i·group + h' for query i and head g·group + h'  (GQA packing)
//! pack Qᵀ (d_qk × BR, zero-padded); m = -inf, l = 0, O = 0
//! for each K/V tile [j0, j0+BC) inside the rows' visible key range:
//!     class = mask.classify(tile)            // Empty → skip, Full → no masking
//!     K̂, V̂ = source.pack(tile)               // f32, once per tile, for all BR rows
//!     S = K̂·Qᵀ                                // tile::qk_block, MK keys × NVQ row vectors
//!     modifiers: scale, softcap, ALiBi, bias  (only when any is set)
//!     partial mask: -inf outside each row's key range
//!     P = online_softmax(S) → α; O = α·O      // softmax.rs
//!     O += Pᵀ·V̂                              // tile::pv_block, MR rows × NVO column vectors
//! o = O / (l + e^{sink - m}); lse = m + ln l
//! ```
//!
//! Tile shapes are compile-time constants per backend (see [`Job::with_simd`]); the
//! scratch of a worker is allocated once per call and reused by every item it runs.

mod mask;
pub(crate) mod math;
mod softmax;
mod tile;

use crate::attention::{Dims, Params};
use crate::backend::{Backend, dispatch};
use crate::element::Element;
use crate::error::Result;
use crate::kv::{DenseKv, KvSource};
use crate::tensor::{Tensor, TensorMut};
use mask::{TileClass, TileMask};
use pulp::{Simd, WithSimd};
use softmax::OnlineSoftmax;

/// Keys per K/V tile. 64 keys × d 128 × 4 B = 32 KiB per packed K̂ or V̂ tile, which
/// stays in L2 next to Qᵀ and O while every row of the Q tile uses it.
const BC: usize = 64;

/// Where outputs go: raw pointers shared by the workers.
///
/// Each output row `(b, i, h)` and each LSE entry belongs to exactly one work item, and
/// the output view was checked for in-bounds, non-overlapping strides, so concurrent
/// items never write the same element.
struct Sink<O> {
    out: *mut O,
    out_len: usize,
    strides: [usize; 3],
    dv: usize,
    lse: *mut f32,
    lse_len: usize,
}

// SAFETY: the pointers are only used for disjoint writes (see the type's docs), and the
// borrows they come from outlive the call that uses them.
unsafe impl<O: Send> Send for Sink<O> {}
// SAFETY: as above; no element is read or written by two items.
unsafe impl<O: Send> Sync for Sink<O> {}

impl<O: Element> Sink<O> {
    /// Writes output row `(b, i, h)` from f32.
    #[inline]
    fn write_row(&self, b: usize, i: usize, h: usize, src: &[f32]) {
        let off = b * self.strides[0] + i * self.strides[1] + h * self.strides[2];
        assert!(src.len() == self.dv && off + self.dv <= self.out_len);
        // SAFETY: in bounds (asserted); this item owns row (b, i, h), so no other thread
        // touches these elements while the slice lives.
        let dst = unsafe { core::slice::from_raw_parts_mut(self.out.add(off), self.dv) };
        O::store_row(src, dst);
    }

    #[inline]
    fn write_lse(&self, idx: usize, x: f32) {
        if !self.lse.is_null() {
            assert!(idx < self.lse_len);
            // SAFETY: in bounds (asserted) and owned by this item.
            unsafe { self.lse.add(idx).write(x) };
        }
    }
}

/// Everything an item needs, shared read-only by all workers.
struct Ctx<'a, Q, KV, O> {
    dims: Dims,
    params: Params<'a>,
    mask: TileMask,
    q: Tensor<'a, Q>,
    kv: DenseKv<'a, KV>,
    sink: Sink<O>,
    /// Scores are raw dot products (no modifier): the scale enters in the exponent.
    modified: bool,
}

/// Entry point from [`crate::Attention`]: validated inputs in, outputs written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<Q: Element, KV: Element, O: Element>(
    backend: Backend,
    threads: usize,
    dims: Dims,
    params: Params<'_>,
    q: Tensor<'_, Q>,
    k: Tensor<'_, KV>,
    v: Tensor<'_, KV>,
    o: &mut TensorMut<'_, O>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let (lse_ptr, lse_len) = match lse {
        Some(l) => (l.as_mut_ptr(), l.len()),
        None => (core::ptr::null_mut(), 0),
    };
    let ctx = Ctx {
        dims,
        params,
        mask: TileMask::new(params.causal, params.window, dims.sq, dims.skv),
        q,
        kv: DenseKv { k, v },
        sink: Sink {
            out: o.data.as_mut_ptr(),
            out_len: o.data.len(),
            strides: o.strides,
            dv: dims.dv,
            lse: lse_ptr,
            lse_len,
        },
        modified: params.softcap.is_some() || params.alibi.is_some() || params.bias.is_some(),
    };
    dispatch(backend, Job { ctx: &ctx, threads })
}

struct Job<'c, 'a, Q, KV, O> {
    ctx: &'c Ctx<'a, Q, KV, O>,
    threads: usize,
}

impl<Q: Element, KV: Element, O: Element> WithSimd for Job<'_, '_, Q, KV, O> {
    type Output = ();

    /// Picks the tile shapes for this backend. `MK×NVQ` and `MR×NVO` accumulator blocks
    /// must fit the register file with room for the operands:
    /// - AVX-512 (32 zmm): QK 6 keys × 4 vectors (24 acc), PV 4 rows × 4 vectors (16 acc);
    ///   4×4v ran at 97 % and 6×4v at 94 % of FMA peak in the tooling spike.
    /// - AVX2 (16 ymm): QK 6×2v (12 acc) and PV 6×2v, the 98 % shape; 16+ accumulators spill.
    /// - NEON (32 q): QK 6×4v, PV 4×4v, as AVX-512 with 4 lanes.
    /// - Scalar: 4×4 blocks of plain multiply-adds.
    ///
    /// `BR` (rows per Q tile) is a multiple of `NVQ·lanes` and of `MR`.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        match S::F32_LANES {
            16 => drive::<S, Q, KV, O, 6, 4, 4, 4, 256>(simd, self.ctx, self.threads),
            8 => drive::<S, Q, KV, O, 6, 2, 6, 2, 48>(simd, self.ctx, self.threads),
            4 => drive::<S, Q, KV, O, 6, 4, 4, 4, 64>(simd, self.ctx, self.threads),
            _ => drive::<S, Q, KV, O, 4, 4, 4, 4, 64>(simd, self.ctx, self.threads),
        }
    }
}

/// One work item: the query rows `[t·BR, (t+1)·BR)` of `(b, g)`.
#[derive(Clone, Copy, Debug)]
struct Item {
    b: usize,
    g: usize,
    t: usize,
}

/// Per-worker scratch, allocated once and reused by every item the worker runs.
struct Scratch<S: Simd> {
    qt: Vec<S::f32s>,
    k: Vec<S::f32s>,
    v: Vec<S::f32s>,
    st: Vec<S::f32s>,
    o: Vec<S::f32s>,
    m: Vec<S::f32s>,
    l: Vec<S::f32s>,
    alpha: Vec<S::f32s>,
    slope: Vec<S::f32s>,
    posf: Vec<S::f32s>,
    row: Vec<f32>,
}

fn vecs<S: Simd>(simd: S, floats: usize) -> Vec<S::f32s> {
    vec![simd.splat_f32s(0.0); floats.div_ceil(S::F32_LANES)]
}

fn floats<S: Simd>(v: &[S::f32s]) -> &[f32] {
    bytemuck::cast_slice(v)
}

fn floats_mut<S: Simd>(v: &mut [S::f32s]) -> &mut [f32] {
    bytemuck::cast_slice_mut(v)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn drive<
    S: Simd,
    Q: Element,
    KV: Element,
    O: Element,
    const MK: usize,
    const NVQ: usize,
    const MR: usize,
    const NVO: usize,
    const BR: usize,
>(
    simd: S,
    ctx: &Ctx<'_, Q, KV, O>,
    threads: usize,
) {
    let d = ctx.dims;
    let rows = d.sq * d.group();
    let tiles = rows.div_ceil(BR);
    let n_items = d.batch * d.hkv * tiles;
    if n_items == 0 {
        return;
    }
    let item = |idx: usize| Item {
        b: idx / (d.hkv * tiles),
        g: (idx / tiles) % d.hkv,
        t: idx % tiles,
    };
    let new_scratch = || {
        let lanes = S::F32_LANES;
        let dvp = d.dv.next_multiple_of(lanes);
        let bcp = BC.next_multiple_of(MK);
        Scratch::<S> {
            qt: vecs(simd, d.dqk * BR),
            k: vecs(simd, bcp * d.dqk),
            v: vecs(simd, BC * dvp),
            st: vecs(simd, bcp * BR),
            o: vecs(simd, BR * dvp),
            m: vecs(simd, BR),
            l: vecs(simd, BR),
            alpha: vecs(simd, BR),
            slope: vecs(simd, BR),
            posf: vecs(simd, BR),
            row: vec![0.0; d.dqk.max(d.dv)],
        }
    };

    #[cfg(feature = "rayon")]
    if threads != 1 && n_items > 1 {
        use rayon::prelude::*;
        (0..n_items)
            .into_par_iter()
            .for_each_init(new_scratch, |sc, idx| {
                run_item::<S, Q, KV, O, MK, NVQ, MR, NVO, BR>(simd, ctx, item(idx), sc)
            });
        return;
    }
    let _ = threads;
    let mut sc = new_scratch();
    for idx in 0..n_items {
        run_item::<S, Q, KV, O, MK, NVQ, MR, NVO, BR>(simd, ctx, item(idx), &mut sc);
    }
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
    const MR: usize,
    const NVO: usize,
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
    let dvv = dv.div_ceil(lanes); // O and V̂ row length in vectors
    let brv = BR / lanes; // Qᵀ and S row length in vectors
    let r0 = it.t * BR;
    let nr = (d.sq * group - r0).min(BR);
    let nvec = nr.div_ceil(lanes);
    let row_of = |r: usize| ((r0 + r) / group, it.g * group + (r0 + r) % group); // (i, h)

    // Pack Qᵀ: d-major, BR rows per d, zero rows past `nr`.
    {
        let qt = floats_mut::<S>(&mut sc.qt);
        if nr < BR {
            qt.fill(0.0);
        }
        let tmp = &mut sc.row[..dqk];
        for r in 0..nr {
            let (i, h) = row_of(r);
            Q::load_row(ctx.q.row(it.b, i, h), tmp);
            for (c, &x) in tmp.iter().enumerate() {
                qt[c * BR + r] = x;
            }
        }
    }
    // Per-row ALiBi slopes and positions, as lanes.
    if let Some(slopes) = p.alibi {
        let sl = floats_mut::<S>(&mut sc.slope);
        let ps = floats_mut::<S>(&mut sc.posf);
        for r in 0..nr {
            let (i, h) = row_of(r);
            sl[r] = slopes[h];
            ps[r] = ctx.mask.pos(i) as f32;
        }
    }

    let mut sm = OnlineSoftmax::<S> {
        m: &mut sc.m[..nvec],
        l: &mut sc.l[..nvec],
    };
    sm.reset(simd);
    sc.o[..BR * dvv].fill(simd.splat_f32s(0.0));

    let pmin = ctx.mask.pos(row_of(0).0);
    let pmax = ctx.mask.pos(row_of(nr - 1).0);
    let (jlo, _) = ctx.mask.key_range(pmin);
    let (_, jhi) = ctx.mask.key_range(pmax);
    let c_log2e = if ctx.modified {
        core::f32::consts::LOG2_E
    } else {
        p.scale * core::f32::consts::LOG2_E
    };

    // K/V tiles [start + k·BC, ...) for k < n_tiles. Odd Q tiles walk them backwards, so
    // a worker running the Q tiles of one kv head in turn starts each pass on the tiles
    // the previous pass touched last, which are still in L2. The order depends on the
    // item alone, so results stay identical for every thread count.
    let start = jlo.max(0);
    let n_tiles = if jhi > start {
        ((jhi - start) as usize).div_ceil(BC)
    } else {
        0
    };
    let tile_at = |k: usize| {
        let k = if it.t % 2 == 1 { n_tiles - 1 - k } else { k };
        let j0 = start + (k * BC) as i64;
        (j0, ((jhi - j0) as usize).min(BC))
    };
    for kt in 0..n_tiles {
        let (j0, n) = tile_at(kt);
        let class = ctx.mask.classify(pmin, pmax, j0, j0 + n as i64);
        let ju = j0 as usize;
        if class == TileClass::Empty {
            continue;
        }
        if kt + 1 < n_tiles {
            let (jn, nn) = tile_at(kt + 1);
            ctx.kv.prefetch(it.b, it.g, jn as usize, nn);
        }
        let nkb = n.div_ceil(MK);
        // K: full key blocks are read in place when K is f32 (no copy, no extra pass
        // over memory); the tail block, and every block of other types, is packed.
        let mut kd_blocks = 0;
        let mut kd: (*const f32, usize) = (core::ptr::null(), 0);
        if let Some((src, stride)) = ctx.kv.k_in_place(it.b, it.g, ju) {
            kd_blocks = n / MK;
            if kd_blocks > 0 {
                assert!((kd_blocks * MK - 1) * stride + dqk <= src.len());
                kd = (src.as_ptr(), stride);
            }
        }
        let packed_keys = n - kd_blocks * MK;
        if packed_keys > 0 {
            ctx.kv.pack_k(
                it.b,
                it.g,
                ju + kd_blocks * MK,
                packed_keys,
                floats_mut::<S>(&mut sc.k),
                dqk,
            );
        }
        // V is always packed: read in place, rows 4 KiB apart (BSHD with 8 heads × 128)
        // all land in the same L1 set and the PV loop, which re-reads each column block
        // once per row block, thrashes (measured 54 % of the time in PV).
        ctx.kv
            .pack_v(it.b, it.g, ju, n, floats_mut::<S>(&mut sc.v), dvv * lanes);
        assert!(n * dvv <= sc.v.len());
        let (vp, vstride) = (sc.v.as_ptr() as *const f32, dvv * lanes);

        // S = K̂·Qᵀ.
        assert!(
            (nkb - kd_blocks) * MK * dqk <= sc.k.len() * lanes && dqk * BR <= sc.qt.len() * lanes
        );
        assert!(nkb * MK * brv <= sc.st.len() && nvec <= brv);
        let qp = sc.qt.as_ptr();
        let sp = sc.st.as_mut_ptr();
        let mut rb = 0;
        while rb < nvec {
            let w = (nvec - rb).min(NVQ);
            for kb in 0..nkb {
                let (k, ks) = if kb < kd_blocks {
                    // SAFETY: block kb < kd_blocks lies inside `src` (asserted above).
                    (unsafe { kd.0.add(kb * MK * kd.1) }, kd.1)
                } else {
                    // SAFETY: packed blocks fit in `sc.k` (asserted above).
                    (
                        unsafe { (sc.k.as_ptr() as *const f32).add((kb - kd_blocks) * MK * dqk) },
                        dqk,
                    )
                };
                // SAFETY: the asserts above bound every extent `qk_block` touches:
                // MK rows of K at `k` (in place or packed), Qᵀ vectors rb..rb+w ≤ brv
                // of each of the dqk rows, and the same rows/vectors of S.
                unsafe {
                    let q = qp.add(rb);
                    let s = sp.add(kb * MK * brv + rb);
                    match w {
                        _ if w == NVQ => {
                            tile::qk_block::<S, MK, NVQ>(simd, k, ks, q, brv, dqk, s, brv)
                        }
                        1 => tile::qk_block::<S, MK, 1>(simd, k, ks, q, brv, dqk, s, brv),
                        2 => tile::qk_block::<S, MK, 2>(simd, k, ks, q, brv, dqk, s, brv),
                        _ => tile::qk_block::<S, MK, 3>(simd, k, ks, q, brv, dqk, s, brv),
                    }
                }
            }
            rb += w;
        }

        if ctx.modified {
            apply_modifiers(simd, ctx, it, sc, ju, n, nr, nvec, BR, &row_of);
        }
        if class == TileClass::Partial {
            let st = floats_mut::<S>(&mut sc.st);
            for r in 0..nr {
                let (lo, hi) = ctx.mask.key_range(ctx.mask.pos(row_of(r).0));
                let a = (lo - ju as i64).clamp(0, n as i64) as usize;
                let e = (hi - ju as i64).clamp(a as i64, n as i64) as usize;
                for j in (0..a).chain(e..n) {
                    st[j * BR + r] = f32::NEG_INFINITY;
                }
            }
        }

        let mut sm = OnlineSoftmax::<S> {
            m: &mut sc.m[..nvec],
            l: &mut sc.l[..nvec],
        };
        sm.update(simd, &mut sc.st, brv, n, c_log2e, &mut sc.alpha[..nvec]);

        // O = α·O for rows whose max moved.
        {
            let alpha = floats::<S>(&sc.alpha);
            for (r, orow) in sc.o.chunks_exact_mut(dvv).take(nr).enumerate() {
                let a = alpha[r];
                if a != 1.0 {
                    let av = simd.splat_f32s(a);
                    for x in orow {
                        *x = simd.mul_f32s(*x, av);
                    }
                }
            }
        }

        // O += Pᵀ·V̂.
        let nrb = nr.div_ceil(MR);
        assert!(nrb * MR <= BR && n * brv <= sc.st.len() && BR * dvv <= sc.o.len());
        let pp = sc.st.as_ptr() as *const f32;
        let op = sc.o.as_mut_ptr();
        // Column blocks outer: one block of V (n keys × NVO vectors, 16 KiB at n = 64 on
        // AVX-512) stays in L1 while every row block of the tile streams past it.
        let mut cb = 0;
        while cb < dvv {
            let w = (dvv - cb).min(NVO);
            for rbk in 0..nrb {
                let rr = rbk * MR;
                // SAFETY: rows rr..rr+MR ≤ BR of P (n key rows of BR floats) and of O
                // (dvv vectors each), column vectors cb..cb+w ≤ dvv of V (n rows of
                // `vstride` floats, in place or packed) and O: all inside the extents
                // asserted above.
                unsafe {
                    let pr = pp.add(rr);
                    let vv = vp.add(cb * lanes);
                    let o = op.add(rr * dvv + cb);
                    match w {
                        _ if w == NVO => {
                            tile::pv_block::<S, MR, NVO>(simd, pr, BR, n, vv, vstride, o, dvv)
                        }
                        1 => tile::pv_block::<S, MR, 1>(simd, pr, BR, n, vv, vstride, o, dvv),
                        2 => tile::pv_block::<S, MR, 2>(simd, pr, BR, n, vv, vstride, o, dvv),
                        _ => tile::pv_block::<S, MR, 3>(simd, pr, BR, n, vv, vstride, o, dvv),
                    }
                }
            }
            cb += w;
        }
    }

    // o = O / (l + e^{sink - m}); lse = m + ln l.
    let m = floats::<S>(&sc.m);
    let l = floats::<S>(&sc.l);
    let c = if ctx.modified { 1.0f64 } else { p.scale as f64 };
    let out = &mut sc.row[..dv];
    for r in 0..nr {
        let (i, h) = row_of(r);
        let lse_idx = (it.b * d.hq + h) * d.sq + i;
        let (mr, lr) = (m[r], l[r]);
        if mr == f32::NEG_INFINITY || lr <= 0.0 {
            out.fill(0.0);
            ctx.sink.write_row(it.b, i, h, out);
            ctx.sink.write_lse(lse_idx, f32::NEG_INFINITY);
            continue;
        }
        let ms = mr as f64 * c;
        let mut denom = lr as f64;
        if let Some(sinks) = p.sinks {
            denom += (sinks[h] as f64 - ms).exp();
        }
        let inv = (1.0 / denom) as f32;
        let orow = &floats::<S>(&sc.o)[r * dvv * lanes..][..dv];
        for (x, &y) in out.iter_mut().zip(orow) {
            *x = y * inv;
        }
        ctx.sink.write_row(it.b, i, h, out);
        ctx.sink.write_lse(lse_idx, (ms + (lr as f64).ln()) as f32);
    }
}

/// Scale, softcap, ALiBi and bias on the tile's scores (`s` domain from here on).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn apply_modifiers<S: Simd, Q, KV, O>(
    simd: S,
    ctx: &Ctx<'_, Q, KV, O>,
    it: Item,
    sc: &mut Scratch<S>,
    j0: usize,
    n: usize,
    nr: usize,
    nvec: usize,
    br: usize,
    row_of: &impl Fn(usize) -> (usize, usize),
) {
    let p = &ctx.params;
    let brv = br / S::F32_LANES;
    let scale = simd.splat_f32s(p.scale);
    for j in 0..n {
        let row = &mut sc.st[j * brv..j * brv + nvec];
        let jf = simd.splat_f32s((j0 + j) as f32);
        for (v, x) in row.iter_mut().enumerate() {
            let mut s = simd.mul_f32s(*x, scale);
            if let Some(cap) = p.softcap {
                let capv = simd.splat_f32s(cap);
                s = simd.mul_f32s(capv, math::tanh(simd, simd.div_f32s(s, capv)));
            }
            if p.alibi.is_some() {
                let dist = simd.abs_f32s(simd.sub_f32s(sc.posf[v], jf));
                s = simd.sub_f32s(s, simd.mul_f32s(sc.slope[v], dist));
            }
            *x = s;
        }
    }
    if let Some(bias) = &p.bias {
        let st = floats_mut::<S>(&mut sc.st);
        for r in 0..nr {
            let (i, h) = row_of(r);
            let brow = &bias.row(it.b, h, i)[j0..j0 + n];
            for (j, &bj) in brow.iter().enumerate() {
                st[j * br + r] += bj;
            }
        }
    }
}
