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

use super::math::{exp2, exp2_keeps_nan};
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
        // The exponent is (x - m)·c·log2 e. With c·log2 e finite that is one multiply;
        // for c above f32::MAX / log2 e it is two, so that 0·∞ never makes NaN.
        let cl_scalar = c * core::f32::consts::LOG2_E;
        let one_mul = cl_scalar.is_finite();
        let (c1, c2) = if one_mul {
            (cl_scalar, 1.0)
        } else {
            (c, core::f32::consts::LOG2_E)
        };
        let (c1, c2) = (simd.splat_f32s(c1), simd.splat_f32s(c2));
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
            for row in st.chunks(stride).take(n) {
                for ((m, k), x) in mx.iter_mut().zip(&mut ok).zip(&row[v0..v0 + w]) {
                    *m = simd.max_f32s(*m, *x);
                    if !nan_exp {
                        *k = simd.and_m32s(*k, simd.equal_f32s(*x, *x));
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
            for u in 0..w {
                m_use[u] = simd.select_f32s(simd.equal_f32s(mx[u], ninf), zero, mx[u]);
                alpha[v0 + u] = exp2(simd, arg(simd.sub_f32s(self.m[v0 + u], m_use[u])));
            }
            let mut sum = [zero; G];
            for (j, row) in st.chunks_mut(stride).take(n).enumerate() {
                for u in 0..w {
                    let e = exp2(simd, arg(simd.sub_f32s(row[v0 + u], m_use[u])));
                    if IL {
                        p[(v0 + u) * p_keys + j] = e;
                    } else {
                        row[v0 + u] = e;
                    }
                    sum[u] = simd.add_f32s(sum[u], e);
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
