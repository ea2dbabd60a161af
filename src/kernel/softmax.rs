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
//! so `-inf - -inf` never makes NaN; its `p` are exactly 0 and its `l` stays 0.

use super::math::exp2;
use pulp::Simd;

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
    #[inline(always)]
    pub fn update(
        &mut self,
        simd: S,
        st: &mut [S::f32s],
        stride: usize,
        n: usize,
        c: f32,
        alpha: &mut [S::f32s],
    ) {
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
        for (v, ((m, l), a)) in self
            .m
            .iter_mut()
            .zip(self.l.iter_mut())
            .zip(alpha.iter_mut())
            .enumerate()
        {
            let mut mx = *m;
            for x in st[v..].iter().step_by(stride).take(n) {
                mx = simd.max_f32s(mx, *x);
            }
            let m_use = simd.select_f32s(simd.equal_f32s(mx, ninf), zero, mx);
            *a = exp2(simd, arg(simd.sub_f32s(*m, m_use)));
            let mut sum = zero;
            for x in st[v..].iter_mut().step_by(stride).take(n) {
                let p = exp2(simd, arg(simd.sub_f32s(*x, m_use)));
                *x = p;
                sum = simd.add_f32s(sum, p);
            }
            *l = simd.mul_add_e_f32s(*l, *a, sum);
            *m = mx;
        }
    }
}
