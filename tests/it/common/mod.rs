//! Shared helpers of the integration suites: the backend list, a deterministic RNG, test
//! cases with their data and layouts, a naive f32 implementation, and the comparison
//! against the f64 reference.
//!
//! Every suite takes its backends from [`backends`], so one environment variable
//! (`FLASHCPU_EXPECT_BACKEND`) makes the whole test run fail on a host that silently
//! lacks a backend CI expects.
#![allow(dead_code)]

use flashcpu::reference::{self, Reference};
use flashcpu::{Attention, Backend, Bias, Element, Tensor, TensorMut, bf16, f16};

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

/// The backends listed in `FLASHCPU_EXPECT_BACKEND` (comma-separated names, e.g.
/// `scalar,avx2,avx512` or `neon`), or `None` when the variable is unset or empty.
pub fn expected_backends() -> Option<Vec<Backend>> {
    let raw = std::env::var("FLASHCPU_EXPECT_BACKEND").ok()?;
    let list: Vec<Backend> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Backend>()
                .unwrap_or_else(|e| panic!("FLASHCPU_EXPECT_BACKEND={raw:?}: {e}"))
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

/// The expected backends this host lacks (empty when the variable is unset).
pub fn missing_expected_backends() -> Vec<Backend> {
    let avail = Backend::available();
    expected_backends()
        .unwrap_or_default()
        .into_iter()
        .filter(|b| !avail.contains(b))
        .collect()
}

/// Every backend this host can run, slowest first: the list every suite iterates over.
///
/// Panics if `FLASHCPU_EXPECT_BACKEND` names a backend the host lacks, so no suite can
/// pass while silently skipping a backend CI expects to test.
pub fn backends() -> Vec<Backend> {
    let missing = missing_expected_backends();
    assert!(
        missing.is_empty(),
        "FLASHCPU_EXPECT_BACKEND lists backends this host lacks: {missing:?} (available: {:?})",
        Backend::available()
    );
    Backend::available()
}

/// Whether `b` runs here; prints `skipping: host lacks <b>` when it does not.
pub fn runs_here(b: Backend) -> bool {
    let ok = backends().contains(&b);
    if !ok {
        eprintln!("skipping: host lacks {}", b.name());
    }
    ok
}

/// A backend this host (or build) cannot run, if there is one.
pub fn unavailable_backend() -> Option<Backend> {
    Backend::ALL.into_iter().find(|b| !b.is_available())
}

/// Proptest case count: `PROPTEST_CASES` if set, else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Whether case `c` runs in a file that samples its cases: all of them natively, a fixed
/// eighth (by a hash of the case) when `PROPTEST_CASES` is below 64 (the qemu steps of
/// scripts/test.sh), for files that take seconds natively and minutes under emulation.
pub fn sampled(c: &Case) -> bool {
    use std::hash::{Hash, Hasher};
    if proptest_cases(256) >= 64 {
        return true;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{c:?}").hash(&mut h);
    h.finish().is_multiple_of(8)
}

/// [`check_all`] on the cases [`sampled`] keeps.
pub fn check_sampled(c: &Case) {
    if sampled(c) {
        check_all(c);
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic RNG (SplitMix64): test data must not depend on a crate's RNG algorithm.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in `[-1, 1)`.
    pub fn sym(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    pub fn chance(&mut self, p: f32) -> bool {
        self.unit() < p
    }
}

// ---------------------------------------------------------------------------------------
// Storage types and layouts
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    /// `x` rounded to this type and back.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }
    /// Relative error of rounding one value to this type (half an ulp), plus the absolute
    /// error near zero (subnormals).
    pub fn rounding(self) -> (f64, f64) {
        match self {
            DType::F32 => (0.0, 0.0),
            DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
            DType::Bf16 => (2f64.powi(-8), 2f64.powi(-134)),
        }
    }
}

/// Memory layout of a `[batch, seq, heads, dim]` view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Contiguous `[b, s, h, d]`.
    Bshd,
    /// Contiguous `[b, h, s, d]`.
    Bhsd,
    /// The outer dims nested in `order` (a permutation of batch/seq/heads, outermost
    /// first, 0..6), with `row_pad` extra elements after each row, `mid_pad` after each
    /// block of the innermost outer dim, `outer_pad` after each block of the middle one.
    Strided {
        order: u8,
        row_pad: usize,
        mid_pad: usize,
        outer_pad: usize,
    },
}

const PERMS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

impl Layout {
    /// Strides `[sb, ss, sh, 1]` for `shape = [b, s, h, d]` and the buffer length needed.
    pub fn strides(self, shape: [usize; 4]) -> ([usize; 4], usize) {
        let (order, row_pad, mid_pad, outer_pad) = match self {
            Layout::Bshd => ([0, 1, 2], 0, 0, 0),
            Layout::Bhsd => ([0, 2, 1], 0, 0, 0),
            Layout::Strided {
                order,
                row_pad,
                mid_pad,
                outer_pad,
            } => (PERMS[order as usize % 6], row_pad, mid_pad, outer_pad),
        };
        let d = shape[3];
        let mut strides = [0, 0, 0, 1];
        let mut s = d + row_pad;
        let pads = [0, mid_pad, outer_pad];
        for (k, &dim) in order.iter().rev().enumerate() {
            s += pads[k];
            strides[dim] = s;
            s *= shape[dim].max(1);
        }
        let len = if shape.contains(&0) {
            0
        } else {
            1 + (0..4).map(|i| (shape[i] - 1) * strides[i]).sum::<usize>()
        };
        (strides, len)
    }
}

fn offset(strides: &[usize; 4], idx: [usize; 4]) -> usize {
    (0..4).map(|i| idx[i] * strides[i]).sum()
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// An additive bias: broadcast dims, the fraction of `-inf` entries, the fraction of rows
/// that are entirely `-inf`, its amplitude and a row padding (for strided biases).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasSpec {
    pub batch_1: bool,
    pub heads_1: bool,
    pub neg_inf: f32,
    pub neg_inf_rows: f32,
    pub amp: f32,
    pub row_pad: usize,
}

impl Default for BiasSpec {
    fn default() -> Self {
        BiasSpec {
            batch_1: false,
            heads_1: false,
            neg_inf: 0.0,
            neg_inf_rows: 0.0,
            amp: 1.0,
            row_pad: 0,
        }
    }
}

/// Sink logits, one per query head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sinks {
    /// Uniform in `[-amp, amp)`.
    Random(f32),
    /// Every head's sink is this value (may be `-inf` or huge).
    All(f32),
    /// A mix of random, `-inf`, large (`30`) and huge (`1e30`) sinks.
    Mixed,
}

/// One attention call: shapes, layouts, storage types, mask, modifiers and data seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub b: usize,
    pub sq: usize,
    pub skv: usize,
    pub hq: usize,
    pub hkv: usize,
    pub dqk: usize,
    pub dv: usize,
    pub lq: Layout,
    pub lk: Layout,
    pub lv: Layout,
    pub lo: Layout,
    /// V is the first `dv` columns of K's buffer (needs `dv <= dqk`; uses K's layout).
    pub v_alias_k: bool,
    pub tq: DType,
    pub tkv: DType,
    pub to: DType,
    pub causal: bool,
    pub window: Option<(usize, usize)>,
    pub scale: Option<f32>,
    pub softcap: Option<f32>,
    /// ALiBi with slopes `amp · 2^(-8(h+1)/hq)` (the ALiBi paper's geometric series).
    pub alibi: Option<f32>,
    pub bias: Option<BiasSpec>,
    pub sinks: Option<Sinks>,
    pub lse: bool,
    pub threads: usize,
    /// Amplitudes of Q, K and V entries (uniform in `[-amp, amp)`).
    pub amp: [f32; 3],
    pub seed: u64,
}

impl Case {
    /// Plain f32 BSHD attention with lse, no mask, no modifier, unit amplitudes.
    pub fn new(
        b: usize,
        sq: usize,
        skv: usize,
        hq: usize,
        hkv: usize,
        dqk: usize,
        dv: usize,
    ) -> Self {
        Case {
            b,
            sq,
            skv,
            hq,
            hkv,
            dqk,
            dv,
            lq: Layout::Bshd,
            lk: Layout::Bshd,
            lv: Layout::Bshd,
            lo: Layout::Bshd,
            v_alias_k: false,
            tq: DType::F32,
            tkv: DType::F32,
            to: DType::F32,
            causal: false,
            window: None,
            scale: None,
            softcap: None,
            alibi: None,
            bias: None,
            sinks: None,
            lse: true,
            threads: 0,
            amp: [1.0; 3],
            seed: 1,
        }
    }

    pub fn alias(&self) -> bool {
        self.v_alias_k && self.dv <= self.dqk
    }

    /// Generates the data of the case (deterministic in `seed`).
    pub fn data(&self) -> Data {
        let mut rng = Rng::new(self.seed);
        let c = self;
        let gen_view = |rng: &mut Rng, layout: Layout, shape: [usize; 4], amp: f32, t: DType| {
            let (strides, len) = layout.strides(shape);
            // Padding holds a marker so reads of it would show.
            let mut buf = vec![1e3f32; len + 3];
            let [n0, n1, n2, n3] = shape;
            for i0 in 0..n0 {
                for i1 in 0..n1 {
                    for i2 in 0..n2 {
                        for i3 in 0..n3 {
                            buf[offset(&strides, [i0, i1, i2, i3])] = t.round(amp * rng.sym());
                        }
                    }
                }
            }
            (buf, strides)
        };
        let (q, qs) = gen_view(&mut rng, c.lq, [c.b, c.sq, c.hq, c.dqk], c.amp[0], c.tq);
        let (k, ks, v, vs) = if c.alias() {
            // One buffer with rows of d_qk entries: the first d_v are V's, scaled to V's
            // amplitude, the rest K's.
            let (mut k, ks) = gen_view(&mut rng, c.lk, [c.b, c.skv, c.hkv, c.dqk], c.amp[1], c.tkv);
            if c.amp[2] != c.amp[1] {
                for x in k.iter_mut() {
                    *x = c.tkv.round(*x * (c.amp[2] / c.amp[1]));
                }
            }
            (k, ks, None, ks)
        } else {
            let (k, ks) = gen_view(&mut rng, c.lk, [c.b, c.skv, c.hkv, c.dqk], c.amp[1], c.tkv);
            let (v, vs) = gen_view(&mut rng, c.lv, [c.b, c.skv, c.hkv, c.dv], c.amp[2], c.tkv);
            (k, ks, Some(v), vs)
        };
        let (os, olen) = c.lo.strides([c.b, c.sq, c.hq, c.dv]);
        let bias = c.bias.map(|spec| {
            let shape = [
                if spec.batch_1 { 1 } else { c.b },
                if spec.heads_1 { 1 } else { c.hq },
                c.sq,
                c.skv,
            ];
            let s2 = c.skv + spec.row_pad;
            let strides = [shape[1] * c.sq * s2, c.sq * s2, s2, 1];
            let len = if shape.contains(&0) {
                0
            } else {
                1 + (0..4).map(|i| (shape[i] - 1) * strides[i]).sum::<usize>()
            };
            let mut buf = vec![f32::NAN; len];
            for b in 0..shape[0] {
                for h in 0..shape[1] {
                    for i in 0..shape[2] {
                        let row_masked = rng.chance(spec.neg_inf_rows);
                        for j in 0..shape[3] {
                            let x = if row_masked || rng.chance(spec.neg_inf) {
                                f32::NEG_INFINITY
                            } else {
                                spec.amp * rng.sym()
                            };
                            buf[offset(&strides, [b, h, i, j])] = x;
                        }
                    }
                }
            }
            (buf, shape, strides)
        });
        let slopes = c
            .alibi
            .map(|amp| {
                (0..c.hq)
                    .map(|h| amp * 2f32.powf(-8.0 * (h + 1) as f32 / c.hq as f32))
                    .collect()
            })
            .unwrap_or_default();
        let sinks = c
            .sinks
            .map(|s| {
                (0..c.hq)
                    .map(|h| match s {
                        Sinks::Random(amp) => amp * rng.sym(),
                        Sinks::All(x) => x,
                        Sinks::Mixed => [rng.sym() * 3.0, f32::NEG_INFINITY, 30.0, 1e30][h % 4],
                    })
                    .collect()
            })
            .unwrap_or_default();
        Data {
            q,
            qs,
            k,
            ks,
            v,
            vs,
            os,
            olen,
            bias,
            slopes,
            sinks,
        }
    }
}

/// The generated data of a [`Case`], in storage layout (f32 values already rounded to the
/// storage types, so the f64 reference sees exactly what the kernels see).
#[derive(Clone, Debug)]
pub struct Data {
    pub q: Vec<f32>,
    pub qs: [usize; 4],
    pub k: Vec<f32>,
    pub ks: [usize; 4],
    /// `None` when V aliases K.
    pub v: Option<Vec<f32>>,
    pub vs: [usize; 4],
    pub os: [usize; 4],
    pub olen: usize,
    pub bias: Option<(Vec<f32>, [usize; 4], [usize; 4])>,
    pub slopes: Vec<f32>,
    pub sinks: Vec<f32>,
}

impl Data {
    pub fn v_buf(&self) -> &[f32] {
        self.v.as_deref().unwrap_or(&self.k)
    }

    /// The attention configuration of `case` over this data (no backend forced).
    pub fn attention<'a>(&'a self, c: &Case) -> Attention<'a> {
        let mut a = Attention::new().threads(c.threads);
        if let Some(s) = c.scale {
            a = a.scale(s);
        }
        if c.causal {
            a = a.causal();
        }
        if let Some((l, r)) = c.window {
            a = a.window(l, r);
        }
        if let Some(cap) = c.softcap {
            a = a.softcap(cap);
        }
        if c.alibi.is_some() {
            a = a.alibi(&self.slopes);
        }
        if let Some((buf, shape, strides)) = &self.bias {
            a = a.bias(Bias::from_strides(buf, *shape, *strides).expect("bias view"));
        }
        if c.sinks.is_some() {
            a = a.sinks(&self.sinks);
        }
        a
    }

    /// The f64 reference (on f32 copies of the rounded inputs: the same values).
    pub fn reference(&self, c: &Case) -> Reference {
        let q = Tensor::from_strides(&self.q, [c.b, c.sq, c.hq, c.dqk], self.qs).unwrap();
        let k = Tensor::from_strides(&self.k, [c.b, c.skv, c.hkv, c.dqk], self.ks).unwrap();
        let v = Tensor::from_strides(self.v_buf(), [c.b, c.skv, c.hkv, c.dv], self.vs).unwrap();
        reference::attention(&self.attention(c), q, k, v).expect("reference refused the case")
    }

    /// Logical (dense BSHD) f32 copies of Q, K and V, for the naive implementation.
    pub fn dense(&self, c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let gather = |buf: &[f32], strides: &[usize; 4], shape: [usize; 4]| {
            let mut out = Vec::with_capacity(shape.iter().product());
            for i0 in 0..shape[0] {
                for i1 in 0..shape[1] {
                    for i2 in 0..shape[2] {
                        for i3 in 0..shape[3] {
                            out.push(buf[offset(strides, [i0, i1, i2, i3])]);
                        }
                    }
                }
            }
            out
        };
        (
            gather(&self.q, &self.qs, [c.b, c.sq, c.hq, c.dqk]),
            gather(&self.k, &self.ks, [c.b, c.skv, c.hkv, c.dqk]),
            gather(self.v_buf(), &self.vs, [c.b, c.skv, c.hkv, c.dv]),
        )
    }

    /// Bias entry `(b, h, i, j)` after broadcasting, or 0 without a bias.
    pub fn bias_at(&self, b: usize, h: usize, i: usize, j: usize) -> f32 {
        match &self.bias {
            None => 0.0,
            Some((buf, shape, strides)) => {
                let b = if shape[0] == 1 { 0 } else { b };
                let h = if shape[1] == 1 { 0 } else { h };
                buf[offset(strides, [b, h, i, j])]
            }
        }
    }
}

/// What a forward call produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `[b, sq, hq, dv]` dense, converted to f64 from the output type.
    pub out: Vec<f64>,
    /// `[b, hq, sq]` when the case asked for it.
    pub lse: Option<Vec<f32>>,
    /// Raw bits of the whole output buffer (for bit-exactness checks).
    pub bits: Vec<u32>,
    /// Number of output-buffer elements outside the view that were modified.
    pub padding_touched: usize,
}

fn bits_of<T: Element>(x: T) -> u32 {
    // Only used for f32/f16/bf16: compare through f32 bits (exact for all three).
    x.to_f32().to_bits()
}

/// Runs `case` on `backend` with storage types `Q`, `KV`, `O`.
pub fn run_typed<Q: Element, KV: Element, O: Element>(
    c: &Case,
    data: &Data,
    backend: Backend,
) -> flashcpu::Result<Outcome> {
    let conv_q: Vec<Q> = data.q.iter().map(|&x| Q::from_f32(x)).collect();
    let conv_k: Vec<KV> = data.k.iter().map(|&x| KV::from_f32(x)).collect();
    let conv_v: Option<Vec<KV>> = data
        .v
        .as_ref()
        .map(|v| v.iter().map(|&x| KV::from_f32(x)).collect());
    let q = Tensor::from_strides(&conv_q, [c.b, c.sq, c.hq, c.dqk], data.qs)?;
    let k = Tensor::from_strides(&conv_k, [c.b, c.skv, c.hkv, c.dqk], data.ks)?;
    let v = Tensor::from_strides(
        conv_v.as_deref().unwrap_or(&conv_k),
        [c.b, c.skv, c.hkv, c.dv],
        data.vs,
    )?;
    let sentinel = O::from_f32(-12345.0);
    let mut obuf = vec![sentinel; data.olen + 5];
    let mut lse = vec![f32::NAN; c.b * c.hq * c.sq];
    {
        let mut o = TensorMut::from_strides(&mut obuf, [c.b, c.sq, c.hq, c.dv], data.os)?;
        let attn = data.attention(c).backend(backend);
        if c.lse {
            attn.forward_with_lse(q, k, v, &mut o, &mut lse)?;
        } else {
            attn.forward(q, k, v, &mut o)?;
        }
    }
    let mut out = Vec::with_capacity(c.b * c.sq * c.hq * c.dv);
    let mut inside = vec![false; obuf.len()];
    for b in 0..c.b {
        for i in 0..c.sq {
            for h in 0..c.hq {
                for e in 0..c.dv {
                    let off = offset(&data.os, [b, i, h, e]);
                    inside[off] = true;
                    out.push(obuf[off].to_f32() as f64);
                }
            }
        }
    }
    let padding_touched = obuf
        .iter()
        .zip(&inside)
        .filter(|(x, ins)| !**ins && bits_of(**x) != bits_of(sentinel))
        .count();
    Ok(Outcome {
        out,
        lse: c.lse.then_some(lse),
        bits: obuf.iter().map(|&x| bits_of(x)).collect(),
        padding_touched,
    })
}

/// Runs `case` on `backend`, dispatching its storage types.
pub fn run(c: &Case, data: &Data, backend: Backend) -> flashcpu::Result<Outcome> {
    use DType::*;
    match (c.tq, c.tkv, c.to) {
        (F32, F32, F32) => run_typed::<f32, f32, f32>(c, data, backend),
        (F16, F16, F16) => run_typed::<f16, f16, f16>(c, data, backend),
        (Bf16, Bf16, Bf16) => run_typed::<bf16, bf16, bf16>(c, data, backend),
        (F16, F16, F32) => run_typed::<f16, f16, f32>(c, data, backend),
        (Bf16, Bf16, F32) => run_typed::<bf16, bf16, f32>(c, data, backend),
        (F32, F16, F32) => run_typed::<f32, f16, f32>(c, data, backend),
        (F32, Bf16, F32) => run_typed::<f32, bf16, f32>(c, data, backend),
        (F32, F32, Bf16) => run_typed::<f32, f32, bf16>(c, data, backend),
        other => panic!("common::run: storage types {other:?} not instantiated here"),
    }
}

/// The storage-type triples [`run`] supports.
pub const DTYPES: [(DType, DType, DType); 8] = [
    (DType::F32, DType::F32, DType::F32),
    (DType::F16, DType::F16, DType::F16),
    (DType::Bf16, DType::Bf16, DType::Bf16),
    (DType::F16, DType::F16, DType::F32),
    (DType::Bf16, DType::Bf16, DType::F32),
    (DType::F32, DType::F16, DType::F32),
    (DType::F32, DType::Bf16, DType::F32),
    (DType::F32, DType::F32, DType::Bf16),
];

// ---------------------------------------------------------------------------------------
// Tolerances and comparison
// ---------------------------------------------------------------------------------------

/// A bound on the magnitude of the case's logits: `scale·max‖q‖·max‖k‖` (Cauchy–Schwarz
/// bound of `Σ|q_d k_d|`, so it is cheap) plus the softcap and the largest finite bias and
/// ALiBi terms. Rounding errors of f32 scores scale with it.
pub fn logit_bound(c: &Case, data: &Data) -> f64 {
    let (q, k, _) = data.dense(c);
    let scale = c.scale.unwrap_or(1.0 / (c.dqk as f32).sqrt()) as f64;
    let max_norm = |x: &[f32]| {
        x.chunks(c.dqk.max(1))
            .map(|r| r.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt())
            .fold(0.0f64, f64::max)
    };
    let dot = max_norm(&q) * max_norm(&k);
    // Softcap: tanh' <= 1, so errors of the raw score do not grow; the capped score
    // itself is rounded relative to `cap`.
    let cap = c.softcap.map_or(0.0, |x| x as f64);
    let bias = data
        .bias
        .as_ref()
        .map(|(buf, ..)| {
            buf.iter()
                .filter(|x| x.is_finite())
                .fold(0.0f64, |m, x| m.max(x.abs() as f64))
        })
        .unwrap_or(0.0);
    let alibi = data
        .slopes
        .iter()
        .fold(0.0f64, |m, s| m.max(s.abs() as f64))
        * (c.sq + c.skv) as f64;
    scale * dot + cap + bias + alibi
}

/// Per-case error tolerances: `out` is absolute (plus the output type's rounding,
/// relative to each element), `lse` absolute plus relative to `|lse|`.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub out_abs: f64,
    pub out_rel: f64,
    pub lse_abs: f64,
    pub lse_rel: f64,
}

/// Tolerance for comparing the kernels with the reference: a floor of `1e-5·max|v|`
/// plus `8·eps_f32` times the logit bound (the rounding of f32 scores), plus the output
/// type's rounding.
pub fn tolerance(c: &Case, data: &Data) -> Tol {
    const EPS: f64 = f32::EPSILON as f64;
    let (_, _, v) = data.dense(c);
    let vmax = v.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    let l = logit_bound(c, data);
    let (rel, abs) = c.to.rounding();
    Tol {
        out_abs: vmax * (1e-5 + 8.0 * EPS * l) + abs,
        out_rel: rel,
        lse_abs: 1e-5 + 8.0 * EPS * l,
        lse_rel: 2e-6,
    }
}

/// Largest errors seen by [`compare`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Errors {
    pub out: f64,
    pub lse: f64,
}

/// Compares an outcome with the reference: no NaN anywhere, rows with no visible key are
/// exactly 0 with `lse = -inf`, everything else within `tol`, and no write outside the
/// output view.
pub fn compare(c: &Case, got: &Outcome, want: &Reference, tol: Tol) -> Result<Errors, String> {
    let mut errs = Errors::default();
    if got.padding_touched != 0 {
        return Err(format!(
            "{} output elements outside the view were written",
            got.padding_touched
        ));
    }
    for b in 0..c.b {
        for h in 0..c.hq {
            for i in 0..c.sq {
                let rl = want.lse_at(b, h, i);
                let masked = rl == f64::NEG_INFINITY;
                for e in 0..c.dv {
                    let g = got.out[((b * c.sq + i) * c.hq + h) * c.dv + e];
                    let w = want.out_at(b, i, h, e);
                    let at = format!("o[b={b}, i={i}, h={h}, c={e}]");
                    if g.is_nan() {
                        return Err(format!("{at} is NaN (reference {w})"));
                    }
                    if masked {
                        if g != 0.0 {
                            return Err(format!(
                                "{at} = {g} but the row sees no key and must be exactly 0"
                            ));
                        }
                        continue;
                    }
                    let err = (g - w).abs();
                    errs.out = errs.out.max(err);
                    if err > tol.out_abs + tol.out_rel * w.abs() {
                        return Err(format!(
                            "{at} = {g}, reference {w}: error {err:e} > tolerance {:e}",
                            tol.out_abs + tol.out_rel * w.abs()
                        ));
                    }
                }
                if let Some(lse) = &got.lse {
                    let g = lse[(b * c.hq + h) * c.sq + i] as f64;
                    let at = format!("lse[b={b}, h={h}, i={i}]");
                    if masked {
                        if g != f64::NEG_INFINITY {
                            return Err(format!("{at} = {g} but the row sees no key: want -inf"));
                        }
                        continue;
                    }
                    if !g.is_finite() {
                        return Err(format!("{at} = {g}, reference {rl}"));
                    }
                    let err = (g - rl).abs();
                    errs.lse = errs.lse.max(err);
                    if err > tol.lse_abs + tol.lse_rel * rl.abs() {
                        return Err(format!(
                            "{at} = {g}, reference {rl}: error {err:e} > tolerance {:e}",
                            tol.lse_abs + tol.lse_rel * rl.abs()
                        ));
                    }
                }
            }
        }
    }
    Ok(errs)
}

/// Runs `c` on `backend` and compares it with the reference (computed once by the caller).
pub fn check_on(
    c: &Case,
    data: &Data,
    want: &Reference,
    backend: Backend,
) -> Result<Errors, String> {
    check_with(c, data, want, tolerance(c, data), backend)
}

/// [`check_on`] with a precomputed tolerance.
pub fn check_with(
    c: &Case,
    data: &Data,
    want: &Reference,
    tol: Tol,
    backend: Backend,
) -> Result<Errors, String> {
    let got = run(c, data, backend).map_err(|e| format!("forward failed: {e}"))?;
    compare(c, &got, want, tol)
}

/// What [`check_all`] saw.
#[derive(Clone, Debug)]
pub struct Checked {
    pub errors: Vec<(Backend, Errors)>,
    /// Rows the reference sees no key for (`lse = -inf`).
    pub masked_rows: usize,
}

/// Runs `c` on every backend, panicking with the backend and the case on any mismatch.
pub fn check_all(c: &Case) -> Checked {
    let data = c.data();
    let want = data.reference(c);
    let tol = tolerance(c, &data);
    let errors = backends()
        .into_iter()
        .map(|be| match check_with(c, &data, &want, tol, be) {
            Ok(e) => (be, e),
            Err(msg) => panic!("backend {}: {msg}\ncase: {c:#?}", be.name()),
        })
        .collect();
    Checked {
        errors,
        masked_rows: want.lse.iter().filter(|x| **x == f64::NEG_INFINITY).count(),
    }
}

// ---------------------------------------------------------------------------------------
// The naive f32 implementation (the accuracy yardstick)
// ---------------------------------------------------------------------------------------

/// Textbook attention in f32: materialise each score row in f32 (scale, softcap, bias,
/// ALiBi, mask), f32 max, `exp`, sum, then multiply by V in f32. Returns `out`
/// `[b, sq, hq, dv]` and `lse` `[b, hq, sq]`.
pub fn naive_f32(c: &Case, data: &Data) -> (Vec<f32>, Vec<f32>) {
    let (q, k, v) = data.dense(c);
    let scale = c.scale.unwrap_or(1.0 / (c.dqk as f32).sqrt());
    let group = c.hq / c.hkv;
    let mut out = vec![0.0f32; c.b * c.sq * c.hq * c.dv];
    let mut lse = vec![f32::NEG_INFINITY; c.b * c.hq * c.sq];
    let mut s = vec![0.0f32; c.skv];
    for b in 0..c.b {
        for h in 0..c.hq {
            let g = h / group;
            for i in 0..c.sq {
                let pos = i as i64 + c.skv as i64 - c.sq as i64;
                let qr = &q[((b * c.sq + i) * c.hq + h) * c.dqk..][..c.dqk];
                let mut m = f32::NEG_INFINITY;
                for (j, sj) in s.iter_mut().enumerate() {
                    let kr = &k[((b * c.skv + j) * c.hkv + g) * c.dqk..][..c.dqk];
                    let mut dot = 0.0f32;
                    for (a, bb) in qr.iter().zip(kr) {
                        dot += a * bb;
                    }
                    let mut x = scale * dot;
                    if let Some(cap) = c.softcap {
                        x = cap * (x / cap).tanh();
                    }
                    x += data.bias_at(b, h, i, j);
                    if c.alibi.is_some() {
                        x -= data.slopes[h] * (pos - j as i64).abs() as f32;
                    }
                    let jj = j as i64;
                    let mut vis = !(c.causal && jj > pos);
                    if let Some((l, r)) = c.window {
                        let l = i64::try_from(l).unwrap_or(i64::MAX);
                        let r = i64::try_from(r).unwrap_or(i64::MAX);
                        vis &= jj >= pos.saturating_sub(l) && jj <= pos.saturating_add(r);
                    }
                    if !vis {
                        x = f32::NEG_INFINITY;
                    }
                    *sj = x;
                    m = m.max(x);
                }
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let o = &mut out[((b * c.sq + i) * c.hq + h) * c.dv..][..c.dv];
                let mut l = 0.0f32;
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj = (*sj - m).exp();
                    l += *sj;
                    let vr = &v[((b * c.skv + j) * c.hkv + g) * c.dv..][..c.dv];
                    for (oc, vc) in o.iter_mut().zip(vr) {
                        *oc += *sj * vc;
                    }
                }
                let mut denom = l;
                if c.sinks.is_some() {
                    denom += (data.sinks[h] - m).exp();
                }
                for oc in o.iter_mut() {
                    *oc /= denom;
                }
                lse[(b * c.hq + h) * c.sq + i] = m + l.ln();
            }
        }
    }
    (out, lse)
}

/// Max abs difference over the rows the reference sees as non-empty (`out` dense
/// `[b, sq, hq, dv]`).
pub fn max_err(c: &Case, got: &[f64], want: &Reference) -> f64 {
    let mut worst = 0.0f64;
    for b in 0..c.b {
        for i in 0..c.sq {
            for h in 0..c.hq {
                for e in 0..c.dv {
                    let g = got[((b * c.sq + i) * c.hq + h) * c.dv + e];
                    let w = want.out_at(b, i, h, e);
                    let d = (g - w).abs();
                    worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
                }
            }
        }
    }
    worst
}
