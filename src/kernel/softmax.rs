//! The online softmax, for the rows of a Q tile held in SIMD lanes.
//!
//! Scores arrive transposed (`st[j][v]`: key `j`, vector `v` of query rows), so the
//! running max and sum of a row live in one lane and no horizontal reduction is ever
//! needed. Scores are in a domain `x` with `s = c·x`: raw dot products with `c = scale`
//! when no modifier is active, otherwise the modified scores with `c = 1`. The max is
//! subtracted in that domain *before* `c·log2 e` enters the exponent, so logits near the
//! max keep full precision even at ±1e4.
//!
//! Invariants: a row whose max is still `-inf` (nothing visible yet) uses 0 as its max,
//! so `-inf - -inf` never makes NaN; its `p` are exactly 0 and its `l` stays 0. A row
//! that meets a NaN score (NaN in Q, or in a key of K it sees) keeps `m = NaN` for the
//! rest of the call, and the driver writes its output as NaN.

use super::math::{exp2, exp2_keeps_nan, fused_mul_add};
use pulp::Simd;

/// Row vectors per pass over the scores.
const G: usize = 4;

/// Running max `m` (x domain) and sum `l`, one lane per query row.
pub(crate) struct OnlineSoftmax<'a, S: Simd> {
    pub m: &'a mut [S::f32s],
    pub l: &'a mut [S::f32s],
}

impl<S: Simd> OnlineSoftmax<'_, S> {
    pub fn reset(&mut self, simd: S) {
        self.m.fill(simd.splat_f32s(f32::NEG_INFINITY));
        self.l.fill(simd.splat_f32s(0.0));
    }

    /// Turns scores `st[j * stride + v]` (`j < n`, `v < m.len()`) into probabilities
    /// relative to the new running max, folds their sums into `l`, and writes each row's
    /// rescale factor `e^{c(m_old - m_new)}` into `alpha` (0 for rows with no history).
    ///
    /// The probabilities replace the scores, or with `IL` go to `p[v * p_keys + j]`
    /// instead: interleaved by row vector, so that a block of rows within one vector
    /// finds each key's probabilities in the line after the previous key's.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn update<const IL: bool>(
        &mut self,
        simd: S,
        st: &mut [S::f32s],
        stride: usize,
        n: usize,
        c: f32,
        alpha: &mut [S::f32s],
        p: &mut [S::f32s],
        p_keys: usize,
    ) {
        // exp2 keeps NaN on AVX-512 (see math::exp2), so a NaN score or a NaN m makes
        // the row's sum NaN: no per-score check is needed there.
        let nan_exp = exp2_keeps_nan::<S>();
        let ninf = simd.splat_f32s(f32::NEG_INFINITY);
        let zero = simd.splat_f32s(0.0);
        // The exponent is x·c·log2 e less a per-row shift. When c·log2 e ≤ 1 (any
        // unmodified call with scale ≤ ln 2) the shift is fl(m·c·log2 e), which cannot
        // overflow, and the exponent is one FMA, x·c1 − shift with a single rounding: the
        // shift's own rounding is common to the whole row, and α, `l`, the LSE and the
        // split merge all use the same f32 shift ([`shift_ln`]), so it cancels. Backends
        // without a fused multiply-add compute (x − m)·c1 + (m·c1 − shift) instead. Else
        // the exponent is (x − m)·c·log2 e, the max subtracted before scaling so that
        // logits near it keep full precision; one multiply, or two for c·log2 e above
        // f32::MAX (so that 0·∞ never makes NaN).
        let cl_scalar = c * core::f32::consts::LOG2_E;
        let rounded = rounded_shift(c);
        let fused = rounded && fused_mul_add::<S>();
        let one_mul = cl_scalar.is_finite();
        let (c1, c2) = if one_mul {
            (cl_scalar, 1.0)
        } else {
            (c, core::f32::consts::LOG2_E)
        };
        let (c1, c2) = (simd.splat_f32s(c1), simd.splat_f32s(c2));
        // The unrounded form, for α (the exp pass spells each form out).
        let arg = |d: S::f32s| {
            let t = simd.mul_f32s(d, c1);
            if one_mul { t } else { simd.mul_f32s(t, c2) }
        };
        // Four row vectors at a time: four independent max (and sum) chains per key
        // instead of one, whose 4-cycle latency bound the max pass.
        let nv = self.m.len();
        let mut v0 = 0;
        while v0 < nv {
            let w = (nv - v0).min(G);
            let mut mx = [ninf; G];
            mx[..w].copy_from_slice(&self.m[v0..v0 + w]);
            // SIMD max drops NaN (and which operand it keeps differs by backend), so a
            // NaN score (from Q or K) must be found otherwise: such a row keeps m = NaN,
            // which makes its output NaN. Where exp2 keeps NaN (AVX-512) the new sum
            // finds it below; elsewhere the scores are checked here.
            let mut ok = [simd.equal_f32s(zero, zero); G];
            assert!(n == 0 || (n - 1) * stride + v0 + w <= st.len());
            let sp = st.as_ptr().wrapping_add(v0);
            // SAFETY: rows j < n of `st` hold vectors v0..v0 + w (asserted).
            unsafe {
                if w == G {
                    max_pass::<S, G>(simd, sp, stride, n, nan_exp, &mut mx, &mut ok);
                } else {
                    for u in 0..w {
                        let (m, k) = (&mut mx[u..u + 1], &mut ok[u..u + 1]);
                        let (m, k) = (m.try_into().unwrap(), k.try_into().unwrap());
                        max_pass::<S, 1>(simd, sp.wrapping_add(u), stride, n, nan_exp, m, k);
                    }
                }
            }
            let nan = simd.splat_f32s(f32::NAN);
            if !nan_exp {
                for u in 0..w {
                    let old = self.m[v0 + u];
                    let ok = simd.and_m32s(ok[u], simd.equal_f32s(old, old));
                    mx[u] = simd.select_f32s(ok, mx[u], nan);
                }
            }
            let mut m_use = [zero; G];
            // Per row: the shift's negation (fused), or the exact m·c1 − shift (not).
            let mut neg_shift = [zero; G];
            let mut delta = [zero; G];
            for u in 0..w {
                m_use[u] = simd.select_f32s(simd.equal_f32s(mx[u], ninf), zero, mx[u]);
                let old = self.m[v0 + u];
                alpha[v0 + u] = if rounded {
                    let shift = simd.mul_f32s(m_use[u], c1);
                    neg_shift[u] = simd.sub_f32s(zero, shift);
                    if !fused {
                        // m·c1 − shift exactly, by a (scalar, per row) fused multiply-add.
                        let mut d = shift;
                        let ml: &[f32] = bytemuck::cast_slice(core::slice::from_ref(&m_use[u]));
                        let dl: &mut [f32] =
                            bytemuck::cast_slice_mut(core::slice::from_mut(&mut d));
                        for (d, &m) in dl.iter_mut().zip(ml) {
                            *d = m.mul_add(cl_scalar, -*d);
                        }
                        delta[u] = d;
                    }
                    exp2(simd, simd.sub_f32s(simd.mul_f32s(old, c1), shift))
                } else {
                    exp2(simd, arg(simd.sub_f32s(old, m_use[u])))
                };
            }
            // The exp pass, with its exponent form fixed outside the loop (a form chosen
            // per score kept the loop at ~50 instructions per vector) and raw pointers:
            // the extents are asserted here once.
            let mode = if fused {
                FUSED
            } else if rounded {
                ROUNDED
            } else if one_mul {
                ONE_MUL
            } else {
                TWO_MUL
            };
            assert!(!IL || (n <= p_keys && (v0 + w) * p_keys <= p.len()));
            let k = Consts {
                c1,
                c2,
                m: m_use,
                ns: neg_shift,
                delta,
            };
            let sp = st.as_mut_ptr().wrapping_add(v0);
            let pp = p.as_mut_ptr().wrapping_add(v0 * p_keys);
            let mut sum = [zero; G];
            // One pass over W row vectors starting at `sp`/`pp`, in the chosen form.
            macro_rules! pass {
                ($w:literal, $sp:expr, $pp:expr, $u:expr) => {
                    match mode {
                        FUSED => {
                            exp_pass::<S, IL, $w, FUSED>(simd, $sp, stride, n, $pp, p_keys, &k, $u)
                        }
                        ROUNDED => exp_pass::<S, IL, $w, ROUNDED>(
                            simd, $sp, stride, n, $pp, p_keys, &k, $u,
                        ),
                        ONE_MUL => exp_pass::<S, IL, $w, ONE_MUL>(
                            simd, $sp, stride, n, $pp, p_keys, &k, $u,
                        ),
                        _ => exp_pass::<S, IL, $w, TWO_MUL>(
                            simd, $sp, stride, n, $pp, p_keys, &k, $u,
                        ),
                    }
                };
            }
            // SAFETY: rows j < n of `st` hold vectors v0..v0 + w, and with IL rows v0..v0 + w
            // of `p` hold keys j < n ≤ p_keys (both asserted).
            unsafe {
                if w == G {
                    sum = pass!(4, sp, pp, 0);
                } else {
                    for (u, su) in sum.iter_mut().enumerate().take(w) {
                        *su = pass!(1, sp.wrapping_add(u), pp.wrapping_add(u * p_keys), u)[0];
                    }
                }
            }
            for u in 0..w {
                let v = v0 + u;
                let l = simd.mul_add_e_f32s(self.l[v], alpha[v], sum[u]);
                self.l[v] = l;
                // A NaN score, or a NaN m or l from an earlier tile (through α or l),
                // leaves l NaN: the row's m becomes NaN for good.
                self.m[v] = if nan_exp {
                    simd.select_f32s(simd.equal_f32s(l, l), mx[u], nan)
                } else {
                    mx[u]
                };
            }
            v0 += w;
        }
    }
}

/// Exponent forms of the exp pass (see [`OnlineSoftmax::update`]).
const FUSED: u8 = 0;
const ROUNDED: u8 = 1;
const ONE_MUL: u8 = 2;
const TWO_MUL: u8 = 3;

/// Per-row values of one group of row vectors for the exp pass.
struct Consts<S: Simd> {
    c1: S::f32s,
    c2: S::f32s,
    /// The max used (0 for rows with none yet).
    m: [S::f32s; G],
    /// −fl(m·c1).
    ns: [S::f32s; G],
    /// m·c1 − fl(m·c1), exactly (backends without a fused multiply-add).
    delta: [S::f32s; G],
}

/// Folds keys `j < n` of `W` row vectors (`st[j·stride + u]`) into the running maxima
/// `mx`, and (unless `nan_exp`) clears `ok` in lanes that meet a NaN. The `W` chains are
/// independent and stay in registers (a width known only at run time kept them on the
/// stack, one store-to-load round trip per key).
///
/// # Safety
/// `st` is valid for reads at `j·stride + u` for `j < n`, `u < W`.
#[inline(always)]
unsafe fn max_pass<S: Simd, const W: usize>(
    simd: S,
    st: *const S::f32s,
    stride: usize,
    n: usize,
    nan_exp: bool,
    mx: &mut [S::f32s; W],
    ok: &mut [S::m32s; W],
) {
    let (mut m, mut k) = (*mx, *ok);
    let mut row = st;
    for _ in 0..n {
        for u in 0..W {
            // SAFETY: j < n and u < W (the caller's contract).
            let x = unsafe { row.add(u).read() };
            m[u] = simd.max_f32s(m[u], x);
            if !nan_exp {
                k[u] = simd.and_m32s(k[u], simd.equal_f32s(x, x));
            }
        }
        row = row.wrapping_add(stride);
    }
    (*mx, *ok) = (m, k);
}

/// `p = 2^exponent(x)` for keys `j < n` of `W` row vectors (`st[j·stride + u]`, rows
/// `u0 + u` of `k`), written in place or to `p[u·p_keys + j]` (`IL`); returns the sums.
///
/// # Safety
/// `st` is valid for reads and writes at `j·stride + u` and, with `IL`, `p` for writes at
/// `u·p_keys + j`, for `j < n`, `u < W`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn exp_pass<S: Simd, const IL: bool, const W: usize, const MODE: u8>(
    simd: S,
    st: *mut S::f32s,
    stride: usize,
    n: usize,
    p: *mut S::f32s,
    p_keys: usize,
    k: &Consts<S>,
    u0: usize,
) -> [S::f32s; W] {
    let zero = simd.splat_f32s(0.0);
    let mut sum = [zero; W];
    let m: [S::f32s; W] = core::array::from_fn(|u| k.m[u0 + u]);
    let ns: [S::f32s; W] = core::array::from_fn(|u| k.ns[u0 + u]);
    let delta: [S::f32s; W] = core::array::from_fn(|u| k.delta[u0 + u]);
    let mut row = st;
    for j in 0..n {
        for u in 0..W {
            // SAFETY: j < n and u < W (the caller's contract).
            let x = unsafe { row.add(u).read() };
            let t = match MODE {
                FUSED => simd.mul_add_e_f32s(x, k.c1, ns[u]),
                ROUNDED => {
                    let t = simd.mul_f32s(simd.sub_f32s(x, m[u]), k.c1);
                    simd.add_f32s(t, delta[u])
                }
                ONE_MUL => simd.mul_f32s(simd.sub_f32s(x, m[u]), k.c1),
                _ => simd.mul_f32s(simd.mul_f32s(simd.sub_f32s(x, m[u]), k.c1), k.c2),
            };
            let e = exp2(simd, t);
            // SAFETY: as above.
            unsafe {
                if IL {
                    p.add(u * p_keys + j).write(e);
                } else {
                    row.add(u).write(e);
                }
            }
            sum[u] = simd.add_f32s(sum[u], e);
        }
        row = row.wrapping_add(stride);
    }
    sum
}

/// Whether rows use the rounded shift fl(m·c·log2 e) at exponent scale `c` (see
/// [`OnlineSoftmax::update`]): when c·log2 e ≤ 1, so that it never overflows.
#[inline]
pub(crate) fn rounded_shift(c: f32) -> bool {
    c * core::f32::consts::LOG2_E <= 1.0
}

/// The natural-log shift that a row's `p` and `l` are relative to, for running max `m`
/// (finite) at exponent scale `c`: `l·e^shift` is the row's sum of e^scores. The LSE, the
/// sinks and the split merge use it, so that they match the kernel's rounding exactly.
///
/// On the rounded path the kernel's exponents are `x·c1 − fl(m·c1)` with `c1 = fl(c·log2 e)`,
/// so `l` sums `2^(x·c1)`, not `e^(x·c)`: the shift adds `m·(c − c1·ln 2)` (in f64), the
/// offset of the rounded scale at the row's level (~1e-4 at logits of 1e4), leaving only
/// `(x − m)·(c − c1·ln 2)` per key, as on the unrounded path.
pub(crate) fn shift_ln(m: f32, c: f32) -> f64 {
    if rounded_shift(c) {
        let c1 = c * core::f32::consts::LOG2_E;
        let ln2 = core::f64::consts::LN_2;
        (m * c1) as f64 * ln2 + m as f64 * (c as f64 - c1 as f64 * ln2)
    } else {
        m as f64 * c as f64
    }
}
