//! The [`Attention`] builder: parameters, validation and the entry points.

use crate::backend::Backend;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::tensor::{Bias, Tensor, TensorMut};

/// One attention configuration: a plain value, cheap to build and reuse across calls.
///
/// ```
/// use flashcpu::{Attention, Tensor, TensorMut};
/// let (b, s, hq, hkv, d) = (1, 4, 2, 1, 8);
/// let q = vec![0.1f32; b * s * hq * d];
/// let kv = vec![0.2f32; b * s * hkv * d];
/// let mut o = vec![0.0f32; b * s * hq * d];
/// Attention::new()
///     .causal()
///     .forward(
///         Tensor::bshd(&q, [b, s, hq, d])?,
///         Tensor::bshd(&kv, [b, s, hkv, d])?,
///         Tensor::bshd(&kv, [b, s, hkv, d])?,
///         &mut TensorMut::bshd(&mut o, [b, s, hq, d])?,
///     )?;
/// assert!((o[0] - 0.2).abs() < 1e-6);
/// # Ok::<(), flashcpu::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Attention<'a> {
    pub(crate) scale: Option<f32>,
    pub(crate) causal: bool,
    pub(crate) window: Option<(usize, usize)>,
    pub(crate) softcap: Option<f32>,
    pub(crate) alibi: Option<&'a [f32]>,
    pub(crate) bias: Option<Bias<'a>>,
    pub(crate) sinks: Option<&'a [f32]>,
    pub(crate) backend: Option<Backend>,
    pub(crate) threads: usize,
}

/// The sizes of one call, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub sq: usize,
    pub skv: usize,
    pub hq: usize,
    pub hkv: usize,
    pub dqk: usize,
    pub dv: usize,
}

impl Dims {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }

    /// No output row at all (other sizes may then be anything, even overflow in product).
    pub fn is_empty(&self) -> bool {
        self.batch == 0 || self.sq == 0 || self.hq == 0
    }
}

/// The validated parameters the kernel and the reference read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params<'a> {
    pub scale: f32,
    pub causal: bool,
    pub window: Option<(usize, usize)>,
    pub softcap: Option<f32>,
    pub alibi: Option<&'a [f32]>,
    pub bias: Option<Bias<'a>>,
    pub sinks: Option<&'a [f32]>,
}

impl<'a> Attention<'a> {
    /// Plain softmax attention: scale `1/sqrt(d_qk)`, no mask, the detected backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the score scale (any finite value > 0; Gemma 4 uses 1.0).
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Causal mask, bottom-right aligned: query `i` sits at position `i + skv - sq` and
    /// sees keys `j <= i + skv - sq`.
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// Sliding window: the query at position `p` sees keys `p - left <= j <= p + right`.
    /// `usize::MAX` leaves a side unbounded. Combines with [`causal`](Self::causal).
    pub fn window(mut self, left: usize, right: usize) -> Self {
        self.window = Some((left, right));
        self
    }

    /// Gemma 2 logit soft-capping `s = cap * tanh(s / cap)`, applied after the scale.
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// ALiBi: adds `-slopes[h] * |p - j|` (one finite slope per query head).
    pub fn alibi(mut self, slopes: &'a [f32]) -> Self {
        self.alibi = Some(slopes);
        self
    }

    /// An additive score bias, indexed by query head and broadcast as its shape says.
    pub fn bias(mut self, bias: Bias<'a>) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Learned attention sinks: one raw logit per query head, added to the softmax
    /// denominator only (gpt-oss). `-inf` disables a head's sink.
    pub fn sinks(mut self, sinks: &'a [f32]) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// Forces a backend; calls fail with [`Error::Backend`] if the CPU lacks it.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Limits the worker threads: 0 (the default) uses as many workers as the current
    /// rayon pool has threads, `n ≥ 2` at most `n` (rayon's global pool unless the call runs inside
    /// [`ThreadPool::install`](https://docs.rs/rayon/latest/rayon/struct.ThreadPool.html#method.install)),
    /// 1 runs on the calling thread; without the `rayon` feature every call runs on the
    /// calling thread. Several workers are the calling thread and tasks on the pool; a
    /// calling thread outside the pool that finishes first busy-waits for the others (at
    /// most its longest work item + 200 µs) rather than sleep and be woken late.
    /// Results are bit-identical for every thread count.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// The backend a call will use, or why it cannot run.
    pub fn resolved_backend(&self) -> Result<Backend> {
        match self.backend {
            Some(b) => b.require(),
            None => Ok(Backend::detect()),
        }
    }

    /// Computes `o = softmax(scale·q·kᵀ + modifiers, masked) · v`.
    ///
    /// `q`: `[batch, seq_q, heads_q, d_qk]`, `k`: `[batch, seq_kv, heads_kv, d_qk]`,
    /// `v`: `[batch, seq_kv, heads_kv, d_v]`, `o`: `[batch, seq_q, heads_q, d_v]`.
    pub fn forward<Q: Element, KV: Element, O: Element>(
        &self,
        q: Tensor<'_, Q>,
        k: Tensor<'_, KV>,
        v: Tensor<'_, KV>,
        o: &mut TensorMut<'_, O>,
    ) -> Result<()> {
        self.run(q, k, v, o, None)
    }

    /// Like [`forward`](Self::forward), and also writes the natural-log sum of exponentials
    /// of each row's visible scores (sinks excluded) into `lse`, laid out
    /// `[batch, heads_q, seq_q]`. Fully masked rows get `-inf`.
    pub fn forward_with_lse<Q: Element, KV: Element, O: Element>(
        &self,
        q: Tensor<'_, Q>,
        k: Tensor<'_, KV>,
        v: Tensor<'_, KV>,
        o: &mut TensorMut<'_, O>,
        lse: &mut [f32],
    ) -> Result<()> {
        self.run(q, k, v, o, Some(lse))
    }

    fn run<Q: Element, KV: Element, O: Element>(
        &self,
        q: Tensor<'_, Q>,
        k: Tensor<'_, KV>,
        v: Tensor<'_, KV>,
        o: &mut TensorMut<'_, O>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        self.plan(q, k, v, o, lse)?.run_all(self.threads)
    }

    /// Validates a call and cuts it into work items without running any, for engines
    /// that schedule work on their own threads: run each item of the [`Plan`] once.
    /// `lse`, when given, is laid out as in [`forward_with_lse`](Self::forward_with_lse).
    pub fn plan<'p, Q: Element, KV: Element, O: Element>(
        &self,
        q: Tensor<'p, Q>,
        k: Tensor<'p, KV>,
        v: Tensor<'p, KV>,
        o: &'p mut TensorMut<'_, O>,
        lse: Option<&'p mut [f32]>,
    ) -> Result<Plan<'p, Q, KV, O>>
    where
        'a: 'p,
    {
        let dims = check_inputs(&q, &k, &v)?;
        if o.shape != [dims.batch, dims.sq, dims.hq, dims.dv] {
            return Err(Error::shape(
                "o",
                format!(
                    "expected [batch, seq_q, heads_q, d_v] = {:?}, got {:?}",
                    [dims.batch, dims.sq, dims.hq, dims.dv],
                    o.shape
                ),
            ));
        }
        if let Some(lse) = &lse {
            let want = if dims.is_empty() {
                Some(0)
            } else {
                dims.batch
                    .checked_mul(dims.sq)
                    .and_then(|x| x.checked_mul(dims.hq))
            };
            if want != Some(lse.len()) {
                let want = want.map_or("more than usize::MAX".to_string(), |w| w.to_string());
                return Err(Error::shape(
                    "lse",
                    format!(
                        "expected batch·heads_q·seq_q = {want} entries, got {}",
                        lse.len()
                    ),
                ));
            }
        }
        let params = self.check_params(&dims)?;
        let backend = self.resolved_backend()?;
        Ok(Plan::new(backend, dims, params, q, k, v, o, lse))
    }

    pub(crate) fn check_params(&self, dims: &Dims) -> Result<Params<'a>> {
        let scale = match self.scale {
            Some(s) => {
                if !(s.is_finite() && s > 0.0) {
                    return Err(Error::param(
                        "scale",
                        format!("must be finite and > 0, got {s}"),
                    ));
                }
                s
            }
            None => 1.0 / (dims.dqk as f32).sqrt(),
        };
        if let Some(c) = self.softcap
            && !(c.is_finite() && c > 0.0)
        {
            return Err(Error::param(
                "softcap",
                format!("must be finite and > 0, got {c}"),
            ));
        }
        if let Some(a) = self.alibi {
            if a.len() != dims.hq {
                return Err(Error::param(
                    "alibi",
                    format!(
                        "expected one slope per query head ({}), got {}",
                        dims.hq,
                        a.len()
                    ),
                ));
            }
            if let Some(i) = a.iter().position(|x| !x.is_finite()) {
                return Err(Error::param(
                    "alibi",
                    format!("slope {i} is {}, must be finite", a[i]),
                ));
            }
            // Scores are f32: slope·distance must stay well inside its range (a product
            // past f32::MAX would turn a visible key into a masked one).
            let reach = dims.sq as f64 + dims.skv as f64;
            if let Some(i) = a
                .iter()
                .position(|x| (*x as f64).abs() * reach > f32::MAX as f64 / 2.0)
            {
                return Err(Error::param(
                    "alibi",
                    format!(
                        "slope {i} is {}: |slope|·(seq_q + seq_kv) must be at most f32::MAX / 2",
                        a[i]
                    ),
                ));
            }
        }
        if let Some(s) = self.sinks {
            if s.len() != dims.hq {
                return Err(Error::param(
                    "sinks",
                    format!(
                        "expected one logit per query head ({}), got {}",
                        dims.hq,
                        s.len()
                    ),
                ));
            }
            if let Some(i) = s.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
                return Err(Error::param(
                    "sinks",
                    format!("sink {i} is {}, must be finite or -inf", s[i]),
                ));
            }
        }
        if let Some(b) = &self.bias {
            let [bb, bh, bsq, bskv] = b.shape;
            if !(bb == 1 || bb == dims.batch)
                || !(bh == 1 || bh == dims.hq)
                || bsq != dims.sq
                || bskv != dims.skv
            {
                return Err(Error::shape(
                    "bias",
                    format!(
                        "shape {:?} does not broadcast to [batch, heads_q, seq_q, seq_kv] = {:?} \
                         (batch and heads may be 1)",
                        b.shape,
                        [dims.batch, dims.hq, dims.sq, dims.skv]
                    ),
                ));
            }
            // An empty bias (seq_q or seq_kv = 0) has no entry to check.
            let empty = b.shape.contains(&0);
            for bi in 0..if empty { 0 } else { bb } {
                for hi in 0..bh {
                    for i in 0..bsq {
                        let row = b.row(bi, hi, i);
                        if let Some(j) = row.iter().position(|x| x.is_nan() || *x == f32::INFINITY)
                        {
                            return Err(Error::param(
                                "bias",
                                format!(
                                    "entry [{bi}, {hi}, {i}, {j}] is {}, must be finite or -inf",
                                    row[j]
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(Params {
            scale,
            causal: self.causal,
            window: self.window,
            softcap: self.softcap,
            alibi: self.alibi,
            bias: self.bias,
            sinks: self.sinks,
        })
    }
}

/// The longest K/V sequence a call accepts.
pub(crate) const MAX_SEQ_KV: usize = u32::MAX as usize;

/// Checks that q, k and v agree and returns the sizes.
pub(crate) fn check_inputs<Q, KV>(
    q: &Tensor<'_, Q>,
    k: &Tensor<'_, KV>,
    v: &Tensor<'_, KV>,
) -> Result<Dims> {
    let [b, sq, hq, dqk] = q.shape;
    let [kb, skv, hkv, kd] = k.shape;
    let [vb, vs, vh, dv] = v.shape;
    if dqk == 0 {
        return Err(Error::shape("q", "head dim d_qk must be at least 1"));
    }
    if kb != b {
        return Err(Error::shape(
            "k",
            format!("batch {kb} differs from q's batch {b}"),
        ));
    }
    if kd != dqk {
        return Err(Error::shape(
            "k",
            format!("head dim {kd} differs from q's head dim {dqk}"),
        ));
    }
    if hkv == 0 {
        return Err(Error::shape("k", "heads_kv must be at least 1"));
    }
    if hq % hkv != 0 {
        return Err(Error::shape(
            "k",
            format!("heads_q ({hq}) must be a multiple of heads_kv ({hkv})"),
        ));
    }
    if vb != b {
        return Err(Error::shape(
            "v",
            format!("batch {vb} differs from q's batch {b}"),
        ));
    }
    if skv > MAX_SEQ_KV {
        // Only a view with zero strides can be this long; positions, tile counts and
        // ALiBi distances are computed with room to spare below this bound.
        return Err(Error::shape(
            "k",
            format!("seq_kv {skv} exceeds the supported maximum of {MAX_SEQ_KV} (2^32 - 1)"),
        ));
    }
    if vs != skv {
        return Err(Error::shape(
            "v",
            format!("seq_kv {vs} differs from k's seq_kv {skv}"),
        ));
    }
    if vh != hkv {
        return Err(Error::shape(
            "v",
            format!("heads_kv {vh} differs from k's heads_kv {hkv}"),
        ));
    }
    if dv == 0 {
        return Err(Error::shape("v", "head dim d_v must be at least 1"));
    }
    Ok(Dims {
        batch: b,
        sq,
        skv,
        hq,
        hkv,
        dqk,
        dv,
    })
}
