//! The specification: a plain two-pass f64 implementation.
//!
//! It materialises every score row, so it is slow and obviously right; the kernels are
//! tested against it, and it is public so engines can test their integration too.

use crate::attention::{Attention, Dims, Params, check_inputs};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The reference result: `out` is `[batch, seq_q, heads_q, d_v]` and `lse` is
/// `[batch, heads_q, seq_q]`, both contiguous f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    /// `[batch, seq_q, heads_q, d_v]`, contiguous.
    pub out: Vec<f64>,
    /// `[batch, heads_q, seq_q]`, contiguous; `-inf` for a row with no visible key, NaN
    /// (with a NaN output row) for a row that sees a NaN score (NaN in q or in a visible
    /// key of k).
    pub lse: Vec<f64>,
    /// `[batch, seq_q, heads_q, d_v]`.
    pub shape: [usize; 4],
}

impl Reference {
    /// Output element `(b, i, h, c)`.
    pub fn out_at(&self, b: usize, i: usize, h: usize, c: usize) -> f64 {
        let [_, sq, hq, dv] = self.shape;
        self.out[((b * sq + i) * hq + h) * dv + c]
    }
    /// LSE of row `(b, h, i)`.
    pub fn lse_at(&self, b: usize, h: usize, i: usize) -> f64 {
        let [_, sq, hq, _] = self.shape;
        self.lse[(b * hq + h) * sq + i]
    }
}

/// Whether key `j` is visible from query `i` (mask only).
pub(crate) fn visible(p: &Params<'_>, d: &Dims, i: usize, j: usize) -> bool {
    let pos = i as i64 + d.skv as i64 - d.sq as i64;
    let j = j as i64;
    if p.causal && j > pos {
        return false;
    }
    if let Some((left, right)) = p.window {
        let left = i64::try_from(left).unwrap_or(i64::MAX);
        let right = i64::try_from(right).unwrap_or(i64::MAX);
        if j < pos.saturating_sub(left) || j > pos.saturating_add(right) {
            return false;
        }
    }
    true
}

/// Computes attention in f64 exactly as the crate documents it, validating like
/// [`Attention::forward`] (the output shape is implied).
pub fn attention<Q: Element, KV: Element>(
    attn: &Attention<'_>,
    q: Tensor<'_, Q>,
    k: Tensor<'_, KV>,
    v: Tensor<'_, KV>,
) -> Result<Reference> {
    let d = check_inputs(&q, &k, &v)?;
    let p = attn.check_params(&d)?;
    let group = d.group();
    let shape = [d.batch, d.sq, d.hq, d.dv];
    if d.is_empty() {
        return Ok(Reference {
            out: Vec::new(),
            lse: Vec::new(),
            shape,
        });
    }
    // Views may repeat rows (zero strides), so sizes are not bounded by any buffer here.
    let alloc = |n: Option<usize>, fill: f64| -> Result<Vec<f64>> {
        let n =
            n.ok_or_else(|| Error::shape("q", "the output would exceed usize::MAX elements"))?;
        let mut v = Vec::new();
        v.try_reserve_exact(n)
            .map_err(|_| Error::shape("q", format!("cannot allocate {n} reference outputs")))?;
        v.resize(n, fill);
        Ok(v)
    };
    let rows = d.batch.checked_mul(d.sq).and_then(|x| x.checked_mul(d.hq));
    let mut out = alloc(rows.and_then(|x| x.checked_mul(d.dv)), 0.0)?;
    let mut lse = alloc(rows, f64::NEG_INFINITY)?;
    let mut s = alloc(Some(d.skv), 0.0)?;
    let scale = p.scale as f64;
    for b in 0..d.batch {
        for h in 0..d.hq {
            let g = h / group;
            for i in 0..d.sq {
                let qr = q.row(b, i, h);
                let pos = i as f64 + d.skv as f64 - d.sq as f64;
                let mut m = f64::NEG_INFINITY;
                let mut nan = false;
                for (j, sj) in s.iter_mut().enumerate() {
                    let kr = k.row(b, j, g);
                    let dot: f64 = qr
                        .iter()
                        .zip(kr)
                        .map(|(a, b)| a.to_f32() as f64 * b.to_f32() as f64)
                        .sum();
                    let mut x = scale * dot;
                    if let Some(c) = p.softcap {
                        let c = c as f64;
                        x = c * (x / c).tanh();
                    }
                    if let Some(bias) = &p.bias {
                        x += bias.row(b, h, i)[j] as f64;
                    }
                    if let Some(sl) = p.alibi {
                        x -= sl[h] as f64 * (pos - j as f64).abs();
                    }
                    if !visible(&p, &d, i, j) {
                        x = f64::NEG_INFINITY;
                    }
                    *sj = x;
                    nan |= x.is_nan();
                    m = m.max(x);
                }
                let o = &mut out[((b * d.sq + i) * d.hq + h) * d.dv..][..d.dv];
                if nan {
                    // A NaN score (NaN in q or in a visible key of k): the row is NaN.
                    o.fill(f64::NAN);
                    lse[(b * d.hq + h) * d.sq + i] = f64::NAN;
                    continue;
                }
                if m == f64::NEG_INFINITY {
                    continue; // no visible key: o = 0, lse = -inf
                }
                let mut l = 0.0f64;
                for (j, &sj) in s.iter().enumerate() {
                    let w = (sj - m).exp();
                    if w == 0.0 {
                        continue;
                    }
                    l += w;
                    for (oc, vc) in o.iter_mut().zip(v.row(b, j, g)) {
                        *oc += w * vc.to_f32() as f64;
                    }
                }
                let mut denom = l;
                if let Some(sinks) = p.sinks {
                    denom += (sinks[h] as f64 - m).exp();
                }
                for oc in o.iter_mut() {
                    *oc /= denom;
                }
                lse[(b * d.hq + h) * d.sq + i] = m + l.ln();
            }
        }
    }
    Ok(Reference {
        out,
        lse,
        shape: [d.batch, d.sq, d.hq, d.dv],
    })
}
