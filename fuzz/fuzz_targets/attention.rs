//! Arbitrary attention calls on every available backend, checked against
//! `flashcpu::reference::attention` and against validity rules decided here, independently
//! of the crate:
//!
//! - invalid input (a view past its buffer, a head-dim stride other than 1, overlapping
//!   output strides, mismatched shapes, NaN/0/negative scale or softcap, bad ALiBi slopes,
//!   sinks or bias entries, a wrong LSE length, an unavailable backend) → `Err`, and
//!   nothing is written;
//! - valid input → `Ok`, with
//!   - no NaN in the output or the LSE, and nothing written outside the output view,
//!   - rows with no visible key (mask, `-inf` bias, no keys) exactly 0 with `lse = -inf`,
//!   - every output within the convex hull bound `|o| ≤ max|v|`,
//!   - agreement with the f64 reference: `|o - ref| ≤ 1e-4·(1 + max|v|)` plus the
//!     rounding the documented f32 compute implies (`8·2⁻²⁴·|logit|·max|v|`, which only
//!     matters for logits beyond ~100, and the rounding of an f16/bf16 output),
//!   - bit-identical results for two thread counts.
//!
//! Inputs are multiples of 1/8 (or small integers) so dot products are exact in f32 and
//! the tolerance measures the kernel, not the data; one data mode is arbitrary floats up
//! to 1e3, checked for everything except the tolerance. Unaddressed elements of every input
//! buffer hold NaN, so a kernel reading outside its view shows up as NaN.
#![no_main]

use arbitrary::{Result, Unstructured};
use flashcpu::{Attention, Backend, Bias, Element, Tensor, TensorMut, bf16, f16, reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(case) = Case::generate(&mut u) {
        match case.dtype {
            DType::F32 => case.run::<f32, f32, f32>(),
            DType::F16 => case.run::<f16, f16, f16>(),
            DType::KvF16 => case.run::<f32, f16, f32>(),
            DType::Bf16 => case.run::<bf16, bf16, bf16>(),
            DType::Mixed => case.run::<f32, bf16, f16>(),
        }
    }
});

#[derive(Debug, Clone, Copy)]
enum DType {
    F32,
    F16,
    KvF16,
    Bf16,
    Mixed,
}

/// Element strides and buffer length of one view; `fill` marks the addressed elements.
#[derive(Debug, Clone)]
struct Layout {
    shape: [usize; 4],
    strides: [usize; 4],
    len: usize,
    /// Build with `bshd`/`bhsd` (0/1) instead of `from_strides` (2).
    ctor: u8,
}

impl Layout {
    /// Highest addressed offset + 1, or 0 for an empty view (u128: no overflow here).
    fn extent(&self) -> u128 {
        extent(&self.shape, &self.strides)
    }
    /// Whether the view fits its buffer and has a unit head-dim stride.
    fn valid(&self) -> bool {
        self.strides[3] == 1 && self.extent() <= self.len as u128
    }
    fn offsets(&self) -> impl Iterator<Item = ([usize; 4], usize)> + '_ {
        let [n0, n1, n2, n3] = self.shape;
        let s = self.strides;
        (0..n0).flat_map(move |a| {
            (0..n1).flat_map(move |b| {
                (0..n2).flat_map(move |c| {
                    (0..n3).map(move |d| ([a, b, c, d], a * s[0] + b * s[1] + c * s[2] + d * s[3]))
                })
            })
        })
    }
}

fn extent(shape: &[usize; 4], strides: &[usize; 4]) -> u128 {
    if shape.contains(&0) {
        return 0;
    }
    // Each term is below 2^128; saturate the sum (anything that large fits no buffer).
    shape
        .iter()
        .zip(strides)
        .map(|(&n, &s)| (n as u128 - 1) * s as u128)
        .fold(1u128, u128::saturating_add)
}

/// Output overlap, decided by brute force: whether two indices share an offset.
fn truly_overlaps(l: &Layout) -> bool {
    if l.shape.contains(&0) {
        return false;
    }
    let mut seen = vec![false; l.extent() as usize];
    for (_, off) in l.offsets() {
        if std::mem::replace(&mut seen[off], true) {
            return true;
        }
    }
    false
}

/// The simple sufficient condition for no overlap every dense or padded layout meets:
/// sorted by stride, each stride exceeds the span of the smaller ones. A crate may accept
/// more (any layout that does not truly overlap), never less.
fn nested(l: &Layout) -> bool {
    let mut dims: Vec<(usize, usize)> = (0..4)
        .filter(|&i| l.shape[i] > 1)
        .map(|i| (l.strides[i], l.shape[i]))
        .collect();
    dims.sort_unstable();
    let mut span = 0u128;
    for (s, n) in dims {
        if (s as u128) <= span {
            return false;
        }
        span += (n as u128 - 1) * s as u128;
    }
    true
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Data {
    /// Multiples of 1/8 in [-4, 4]: dot products exact in f32.
    Moderate,
    /// Integers in [-32, 32]: logits up to ~1e4, still exact.
    BigLogits,
    /// Multiples of 2^-13 in [-2^-9, 2^-9].
    Tiny,
    /// One value everywhere: ties in every row.
    Constant,
    /// Arbitrary floats up to 1e3: no tolerance check (f32 dot products round).
    Wild,
}

#[derive(Debug)]
struct Case {
    dtype: DType,
    dims: [usize; 7], // b, sq, skv, hq, hkv, dqk, dv
    q: Layout,
    k: Layout,
    v: Layout,
    /// V is the first `dv` columns of K's buffer, with K's strides (MLA).
    v_in_k: bool,
    o: Layout,
    qk_data: Data,
    v_data: Data,
    seed: u64,
    scale: Option<f32>,
    causal: bool,
    window: Option<(usize, usize)>,
    softcap: Option<f32>,
    alibi: Option<Vec<f32>>,
    bias: Option<(Layout, Vec<f32>)>,
    sinks: Option<Vec<f32>>,
    lse_len: Option<usize>,
    /// A consistency error planted in the shapes (the call must fail).
    shape_error: bool,
    threads: [usize; 2],
    unavailable_backend: bool,
}

fn size(u: &mut Unstructured, small: usize, max: usize) -> Result<usize> {
    if u.ratio(7u8, 8)? {
        u.int_in_range(0..=small)
    } else {
        u.int_in_range(0..=max)
    }
}

fn rare(u: &mut Unstructured) -> Result<bool> {
    u.ratio(1u8, 16)
}

/// A view of logical shape `shape` (b, s, h, d): dense BSHD/BHSD, padded, or arbitrary
/// strides, and sometimes a buffer that is too short or a head-dim stride other than 1.
fn layout(u: &mut Unstructured, shape: [usize; 4]) -> Result<Layout> {
    let [b, s, h, d] = shape;
    let kind: u8 = u.int_in_range(0..=5)?;
    let (strides, ctor) = match kind {
        0 | 1 => ([s * h * d, h * d, d, 1], 0),
        2 => ([h * s * d, d, s * d, 1], 1),
        3 | 4 => {
            // Padded, either order.
            let pd = d + u.int_in_range(0..=3)?;
            if u.arbitrary()? {
                let ph = h * pd + u.int_in_range(0..=3)?;
                let ps = s * ph + u.int_in_range(0..=5)?;
                ([ps, ph, pd, 1], 2)
            } else {
                let ps = s * pd + u.int_in_range(0..=3)?;
                let ph = h * ps + u.int_in_range(0..=5)?;
                ([ph, pd, ps, 1], 2)
            }
        }
        _ => {
            // Arbitrary small strides: may overlap (legal for inputs: broadcasting).
            let m = (b * s * h * d).clamp(1, 4096);
            let mut st = [0usize; 4];
            for x in st.iter_mut().take(3) {
                *x = u.int_in_range(0..=m)?;
            }
            st[3] = 1;
            (st, 2)
        }
    };
    let mut strides = strides;
    let mut ctor = ctor;
    if rare(u)? {
        strides[3] = u.int_in_range(0..=3)?;
        ctor = 2;
    }
    let ext = extent(&shape, &strides) as usize;
    let len = if rare(u)? {
        ext.saturating_sub(u.int_in_range(1..=3)?)
    } else {
        ext + u.int_in_range(0..=3)?
    };
    Ok(Layout {
        shape,
        strides,
        len,
        ctor,
    })
}

fn finite_or_bad(u: &mut Unstructured, good: f32) -> Result<f32> {
    Ok(if rare(u)? {
        *u.choose(&[
            f32::NAN,
            0.0,
            -0.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -good,
        ])?
    } else {
        good
    })
}

impl Case {
    fn generate(u: &mut Unstructured) -> Result<Case> {
        let dtype = match u.int_in_range(0..=11)? {
            0..=6 => DType::F32,
            7 => DType::F16,
            8 => DType::KvF16,
            9 => DType::Bf16,
            _ => DType::Mixed,
        };
        let b = u.int_in_range(0..=2)?.max(usize::from(u.ratio(15u8, 16)?));
        let sq = size(u, 9, 80)?;
        let skv = size(u, 9, 80)?;
        let hkv = u.int_in_range(1..=4)?;
        let group = u.int_in_range(1..=8 / hkv)?;
        let hq = hkv * group;
        let dqk = size(u, 20, 80)?.max(1);
        let dv = size(u, 20, 80)?.max(1);
        let mut dims = [b, sq, skv, hq, hkv, dqk, dv];

        // Planted shape errors: the call must fail.
        let mut shape_error = false;
        let mut q_shape = [b, sq, hq, dqk];
        let mut k_shape = [b, skv, hkv, dqk];
        let mut v_shape = [b, skv, hkv, dv];
        let mut o_shape = [b, sq, hq, dv];
        if rare(u)? {
            shape_error = true;
            match u.int_in_range(0..=8)? {
                0 => k_shape[0] += 1,
                1 => v_shape[1] += 1,
                2 => v_shape[2] += 1,
                3 => k_shape[3] += 1,
                4 => o_shape[3] += 1,
                5 => o_shape[1] += 1,
                6 => q_shape[3] = 0,
                7 => v_shape[3] = 0,
                _ => {
                    if hq + 1 <= 9 && (hq + 1) % hkv != 0 {
                        q_shape[2] = hq + 1;
                        o_shape[2] = hq + 1;
                        dims[3] = hq + 1;
                    } else {
                        k_shape[2] = 0;
                        v_shape[2] = 0;
                    }
                }
            }
        }

        let q = layout(u, q_shape)?;
        let k = layout(u, k_shape)?;
        let v_in_k = v_shape[3] <= k_shape[3] && u.ratio(1u8, 6)?;
        let v = if v_in_k {
            Layout {
                shape: v_shape,
                ctor: 2,
                ..k.clone()
            }
        } else {
            layout(u, v_shape)?
        };
        let o = layout(u, o_shape)?;
        let hq = dims[3];

        let pick_data = |u: &mut Unstructured| -> Result<Data> {
            Ok(match u.int_in_range(0..=15)? {
                0..=9 => Data::Moderate,
                10 | 11 => Data::BigLogits,
                12 => Data::Tiny,
                13 => Data::Constant,
                _ => Data::Wild,
            })
        };
        let qk_data = pick_data(u)?;
        let v_data = pick_data(u)?;
        let seed = u.arbitrary()?;

        let scale = if u.arbitrary()? {
            let good = *u.choose(&[0.125f32, 0.5, 1.0, 2.0, 4.0, 1e-3, 1e-30, 1e-45])?;
            Some(finite_or_bad(u, good)?)
        } else {
            None
        };
        let causal = u.arbitrary()?;
        let window = if u.ratio(1u8, 3)? {
            let side = |u: &mut Unstructured| -> Result<usize> {
                Ok(match u.int_in_range(0..=7)? {
                    0 => usize::MAX,
                    1 => usize::MAX - u.int_in_range(0..=100)?,
                    2 => 1 << 62,
                    _ => u.int_in_range(0..=90)?,
                })
            };
            Some((side(u)?, side(u)?))
        } else {
            None
        };
        let softcap = if u.ratio(1u8, 4)? {
            let good = *u.choose(&[0.5f32, 1.0, 5.0, 30.0, 50.0, 1e-3])?;
            Some(finite_or_bad(u, good)?)
        } else {
            None
        };
        let alibi = if u.ratio(1u8, 4)? {
            let n = if rare(u)? { hq + 1 } else { hq };
            let mut a = Vec::with_capacity(n);
            for _ in 0..n {
                let x = u.int_in_range(-16i32..=64)? as f32 / 16.0;
                a.push(finite_or_bad(u, x).map(|y| if y == 0.0 || y == -1.0 { x } else { y })?);
            }
            Some(a)
        } else {
            None
        };
        let bias = if u.ratio(1u8, 4)? {
            let bb = if u.arbitrary()? { 1 } else { b };
            let bh = if u.arbitrary()? { 1 } else { hq };
            let mut shape = [bb, bh, sq, skv];
            if rare(u)? {
                let i = u.int_in_range(0..=3)?;
                shape[i] += 1;
            }
            let layout = layout(u, shape)?;
            let p_inf = *u.choose(&[0.0f64, 0.0, 0.1, 0.5, 1.0])?;
            let bad = if rare(u)? {
                Some(*u.choose(&[f32::NAN, f32::INFINITY])?)
            } else {
                None
            };
            let mut rng = Rng(seed ^ 0xb1a5);
            let n = shape.iter().product::<usize>();
            let mut vals: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.unit() < p_inf {
                        f32::NEG_INFINITY
                    } else {
                        rng.int(-64, 64) as f32 / 8.0
                    }
                })
                .collect();
            if let (Some(x), true) = (bad, n > 0) {
                let i = rng.int(0, n as i64 - 1) as usize;
                vals[i] = x;
            }
            Some((layout, vals))
        } else {
            None
        };
        let sinks = if u.ratio(1u8, 4)? {
            let n = if rare(u)? { hq.saturating_sub(1) } else { hq };
            let mut s = Vec::with_capacity(n);
            for _ in 0..n {
                s.push(match u.int_in_range(0..=20)? {
                    0 => f32::NEG_INFINITY,
                    1 if rare(u)? => f32::NAN,
                    2 if rare(u)? => f32::INFINITY,
                    x => (x as f32 - 10.0) / 2.0,
                });
            }
            Some(s)
        } else {
            None
        };
        let lse_len = if u.arbitrary()? {
            let want = b * sq * dims[3];
            Some(if rare(u)? { want + 1 } else { want })
        } else {
            None
        };
        let threads = [*u.choose(&[0, 1, 2, 3])?, *u.choose(&[0, 1, 2, 3])?];
        let unavailable_backend = rare(u)?;
        Ok(Case {
            dtype,
            dims,
            q,
            k,
            v,
            v_in_k,
            o,
            qk_data,
            v_data,
            seed,
            scale,
            causal,
            window,
            softcap,
            alibi,
            bias,
            sinks,
            lse_len,
            shape_error,
            threads,
            unavailable_backend,
        })
    }

    /// Whether the parameters (not the views) are valid, decided from the documentation.
    fn params_valid(&self) -> bool {
        let [b, sq, skv, hq, ..] = self.dims;
        let pos_finite = |x: f32| x.is_finite() && x > 0.0;
        self.scale.is_none_or(pos_finite)
            && self.softcap.is_none_or(pos_finite)
            && self.alibi.as_ref().is_none_or(|a| {
                // Finite, and |slope|·(seq_q + seq_kv) ≤ f32::MAX / 2 (README).
                let reach = sq as f64 + skv as f64;
                a.len() == hq
                    && a.iter().all(|x| {
                        x.is_finite() && (*x as f64).abs() * reach <= f32::MAX as f64 / 2.0
                    })
            })
            && self.sinks.as_ref().is_none_or(|s| {
                s.len() == hq && s.iter().all(|&x| !x.is_nan() && x != f32::INFINITY)
            })
            && self.bias.as_ref().is_none_or(|(l, _)| {
                let [bb, bh, bsq, bskv] = l.shape;
                (bb == 1 || bb == b) && (bh == 1 || bh == hq) && bsq == sq && bskv == skv
            })
            && self.lse_len.is_none_or(|n| n == b * sq * hq)
    }

    fn attention<'a>(
        &self,
        alibi: &'a [f32],
        sinks: &'a [f32],
        bias: Option<Bias<'a>>,
    ) -> Attention<'a> {
        let mut a = Attention::new();
        if let Some(s) = self.scale {
            a = a.scale(s);
        }
        if self.causal {
            a = a.causal();
        }
        if let Some((l, r)) = self.window {
            a = a.window(l, r);
        }
        if let Some(c) = self.softcap {
            a = a.softcap(c);
        }
        if self.alibi.is_some() {
            a = a.alibi(alibi);
        }
        if self.sinks.is_some() {
            a = a.sinks(sinks);
        }
        if let Some(b) = bias {
            a = a.bias(b);
        }
        a
    }

    /// Whether key `j` is visible from query `i`, from the documented conventions.
    fn visible(&self, i: usize, j: usize) -> bool {
        let [_, sq, skv, ..] = self.dims;
        let p = i as i128 + skv as i128 - sq as i128;
        let j = j as i128;
        if self.causal && j > p {
            return false;
        }
        if let Some((l, r)) = self.window {
            if j < p - l as i128 || j > p + r as i128 {
                return false;
            }
        }
        true
    }

    fn run<Q: Element, KV: Element, O: Element>(&self) {
        let [b, sq, skv, hq, _hkv, _dqk, dv] = self.dims;
        let mut rng = Rng(self.seed);

        let q_buf: Vec<Q> = fill(&self.q, self.qk_data, &mut rng);
        let k_buf: Vec<KV> = fill(&self.k, self.qk_data, &mut rng);
        let v_buf: Option<Vec<KV>> = (!self.v_in_k).then(|| fill(&self.v, self.v_data, &mut rng));
        let v_layout = &self.v;
        let v_src: &[KV] = v_buf.as_deref().unwrap_or(&k_buf);

        let qt = view(&q_buf, &self.q);
        let kt = view(&k_buf, &self.k);
        let vt = view(v_src, v_layout);
        check_view("q", &qt, self.q.valid());
        check_view("k", &kt, self.k.valid());
        check_view("v", &vt, v_layout.valid());

        let alibi = self.alibi.clone().unwrap_or_default();
        let sinks = self.sinks.clone().unwrap_or_default();
        let bias_buf: Option<Vec<f32>> = self.bias.as_ref().map(|(l, vals)| {
            let mut buf = vec![f32::NAN; l.len];
            for (n, (_, off)) in l.offsets().enumerate() {
                if off < l.len {
                    buf[off] = vals[n];
                }
            }
            buf
        });
        let bias = match (&self.bias, &bias_buf) {
            (Some((l, _)), Some(buf)) => {
                let r = Bias::from_strides(buf, l.shape, l.strides);
                check_view("bias", &r, l.valid());
                match r {
                    Ok(b) => Some(b),
                    Err(_) => return,
                }
            }
            _ => None,
        };
        let (Ok(qt), Ok(kt), Ok(vt)) = (qt, kt, vt) else {
            return;
        };
        // With stride-0 aliasing, the value an element holds is its last write: the
        // effective bias entries are what the view reads, so use those for the oracle.
        let bias_at = |bi: usize, h: usize, i: usize, j: usize| -> f32 {
            let (l, _) = self.bias.as_ref().unwrap();
            let buf = bias_buf.as_ref().unwrap();
            let bi = if l.shape[0] == 1 { 0 } else { bi };
            let h = if l.shape[1] == 1 { 0 } else { h };
            buf[bi * l.strides[0] + h * l.strides[1] + i * l.strides[2] + j]
        };

        let attn = self.attention(&alibi, &sinks, bias);
        let mut valid = !self.shape_error && self.params_valid() && self.o.valid();
        if valid && self.bias.is_some() {
            // The entries validation sees are the ones the view reads.
            let (l, _) = self.bias.as_ref().unwrap();
            for bi in 0..l.shape[0] {
                for h in 0..l.shape[1] {
                    for i in 0..sq {
                        for j in 0..skv {
                            let x = bias_at(bi, h, i, j);
                            valid &= !x.is_nan() && x != f32::INFINITY;
                        }
                    }
                }
            }
        }
        // Output overlap: must be refused when real, must be accepted for nested layouts.
        let overlap = self.o.valid() && truly_overlaps(&self.o);
        let o_must_accept = self.o.valid() && nested(&self.o);

        let reference = reference::attention(&attn, qt, kt, vt);

        let available = Backend::available();
        let mut backends: Vec<(Backend, bool)> = available.iter().map(|&b| (b, true)).collect();
        if self.unavailable_backend {
            for b in Backend::ALL {
                if !b.is_available() {
                    backends.push((b, false));
                }
            }
        }

        for (n, &(backend, avail)) in backends.iter().enumerate() {
            let threads = self.threads[n % 2];
            let mut o_buf = vec![O::from_f32(f32::NAN); self.o.len];
            let mut lse = vec![f32::NAN; self.lse_len.unwrap_or(0)];
            let a = attn.backend(backend).threads(threads);
            let ot = match self.o.ctor {
                0 => TensorMut::bshd(&mut o_buf, self.o.shape),
                1 => TensorMut::bhsd(
                    &mut o_buf,
                    [
                        self.o.shape[0],
                        self.o.shape[2],
                        self.o.shape[1],
                        self.o.shape[3],
                    ],
                ),
                _ => TensorMut::from_strides(&mut o_buf, self.o.shape, self.o.strides),
            };
            let mut ot = match ot {
                Ok(t) => {
                    assert!(self.o.valid(), "o accepted: {:?}", self.o);
                    assert!(
                        !overlap,
                        "overlapping output strides accepted: {:?}",
                        self.o
                    );
                    t
                }
                Err(e) => {
                    assert!(
                        !self.o.valid() || (overlap || !o_must_accept),
                        "valid output view refused: {e} ({:?})",
                        self.o
                    );
                    return;
                }
            };
            let res = if self.lse_len.is_some() {
                a.forward_with_lse(qt, kt, vt, &mut ot, &mut lse)
            } else {
                a.forward(qt, kt, vt, &mut ot)
            };
            drop(ot);
            let must_ok = valid && avail;
            match res {
                Err(e) => {
                    assert!(!must_ok, "{backend}: valid input refused: {e}\n{self:#?}");
                    assert!(
                        o_buf.iter().all(|x| x.to_f32().is_nan()) && lse.iter().all(|x| x.is_nan()),
                        "{backend}: output written despite Err({e})"
                    );
                    if !avail && valid {
                        assert!(matches!(e, flashcpu::Error::Backend { .. }), "{e:?}");
                    }
                    continue;
                }
                Ok(()) => {
                    assert!(must_ok, "{backend}: invalid input accepted\n{self:#?}");
                }
            }
            let r = reference
                .as_ref()
                .unwrap_or_else(|e| panic!("reference refused valid input: {e}"));

            // Bit-identical for two thread counts.
            let bits: Vec<u32> = self
                .o
                .offsets()
                .map(|(_, off)| o_buf[off].to_f32().to_bits())
                .chain(lse.iter().map(|x| x.to_bits()))
                .collect();
            // Same backend, other thread count.
            let mut o2 = vec![O::from_f32(f32::NAN); self.o.len];
            let mut lse2 = vec![f32::NAN; lse.len()];
            let other = self.threads[(n + 1) % 2];
            {
                let mut ot2 =
                    TensorMut::from_strides(&mut o2, self.o.shape, self.o.strides).unwrap();
                let a2 = attn.backend(backend).threads(other);
                if self.lse_len.is_some() {
                    a2.forward_with_lse(qt, kt, vt, &mut ot2, &mut lse2)
                        .unwrap();
                } else {
                    a2.forward(qt, kt, vt, &mut ot2).unwrap();
                }
            }
            let bits2: Vec<u32> = self
                .o
                .offsets()
                .map(|(_, off)| o2[off].to_f32().to_bits())
                .chain(lse2.iter().map(|x| x.to_bits()))
                .collect();
            assert!(
                bits == bits2,
                "{backend}: threads({threads}) and threads({other}) differ"
            );

            // Nothing outside the view was written.
            let mut in_view = vec![false; self.o.len];
            for (_, off) in self.o.offsets() {
                in_view[off] = true;
            }
            for (i, x) in o_buf.iter().enumerate() {
                if !in_view[i] {
                    assert!(
                        x.to_f32().is_nan(),
                        "{backend}: wrote o[{i}] outside the view"
                    );
                }
            }

            let vmax = v_layout
                .offsets()
                .map(|(_, off)| v_src[off].to_f32().abs() as f64)
                .fold(0.0f64, f64::max);
            let out_round = match O::NAME {
                "f16" => 2f64.powi(-11),
                "bf16" => 2f64.powi(-8),
                _ => 0.0,
            };
            let check_tol = self.qk_data != Data::Wild && self.v_data != Data::Wild;
            for bi in 0..b {
                for h in 0..hq {
                    for i in 0..sq {
                        let masked = (0..skv).all(|j| {
                            !self.visible(i, j)
                                || (self.bias.is_some()
                                    && bias_at(bi, h, i, j) == f32::NEG_INFINITY)
                        });
                        let rl = r.lse_at(bi, h, i);
                        assert_eq!(
                            masked,
                            rl == f64::NEG_INFINITY,
                            "reference lse {rl} at (b {bi}, h {h}, i {i}) vs mask oracle"
                        );
                        let lse_idx = (bi * hq + h) * sq + i;
                        if self.lse_len.is_some() {
                            let x = lse[lse_idx];
                            if masked {
                                assert_eq!(x, f32::NEG_INFINITY, "{backend}: masked row lse {x}");
                            } else {
                                assert!(
                                    x.is_finite(),
                                    "{backend}: lse {x} at (b {bi}, h {h}, i {i})"
                                );
                                let tol = 1e-4 * (1.0 + rl.abs())
                                    + 8.0 * 2f64.powi(-24) * (rl.abs() + (1.0 + skv as f64).ln());
                                if check_tol {
                                    assert!(
                                        (x as f64 - rl).abs() <= tol,
                                        "{backend}: lse {x} vs reference {rl} at (b {bi}, h {h}, i {i})"
                                    );
                                }
                            }
                        }
                        // Logit magnitude near the row max, for the f32 rounding term.
                        let logit = if masked {
                            0.0
                        } else {
                            rl.abs() + (1.0 + skv as f64).ln()
                        };
                        for c in 0..dv {
                            let off = bi * self.o.strides[0]
                                + i * self.o.strides[1]
                                + h * self.o.strides[2]
                                + c;
                            let x = o_buf[off].to_f32();
                            let y = r.out_at(bi, i, h, c);
                            assert!(
                                !x.is_nan(),
                                "{backend}: NaN at (b {bi}, i {i}, h {h}, c {c})"
                            );
                            if masked {
                                assert!(x == 0.0, "{backend}: masked row has o = {x}");
                                continue;
                            }
                            let tol = 1e-4 * (1.0 + vmax)
                                + 8.0 * 2f64.powi(-24) * logit * vmax
                                + out_round * y.abs()
                                + 1e-7;
                            assert!(
                                (x.abs() as f64) <= vmax * (1.0 + out_round) + tol,
                                "{backend}: |o| = {x} exceeds max|v| = {vmax}"
                            );
                            if check_tol {
                                assert!(
                                    (x as f64 - y).abs() <= tol,
                                    "{backend}: o = {x}, reference {y}, |err| {} > tol {tol} at \
                                     (b {bi}, i {i}, h {h}, c {c})\n{self:#?}",
                                    (x as f64 - y).abs()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn check_view<T>(name: &str, r: &flashcpu::Result<T>, valid: bool) {
    match r {
        Ok(_) => assert!(valid, "{name}: invalid view accepted"),
        Err(e) => assert!(!valid, "{name}: valid view refused: {e}"),
    }
}

fn view<'a, T>(buf: &'a [T], l: &Layout) -> flashcpu::Result<Tensor<'a, T>> {
    match l.ctor {
        0 => Tensor::bshd(buf, l.shape),
        1 => Tensor::bhsd(buf, [l.shape[0], l.shape[2], l.shape[1], l.shape[3]]),
        _ => Tensor::from_strides(buf, l.shape, l.strides),
    }
}

/// A buffer for `l`: NaN everywhere the view does not address.
fn fill<T: Element>(l: &Layout, mode: Data, rng: &mut Rng) -> Vec<T> {
    let mut buf = vec![T::from_f32(f32::NAN); l.len];
    let constant = rng.int(-32, 32) as f32 / 8.0;
    for (_, off) in l.offsets() {
        if off < l.len {
            let x = match mode {
                Data::Moderate => rng.int(-32, 32) as f32 / 8.0,
                Data::BigLogits => rng.int(-32, 32) as f32,
                Data::Tiny => rng.int(-16, 16) as f32 * 2f32.powi(-13),
                Data::Constant => constant,
                Data::Wild => {
                    ((rng.unit() * 2.0 - 1.0) * 10f64.powf(rng.unit() * 6.0 - 3.0)) as f32
                }
            };
            buf[off] = T::from_f32(x);
        }
    }
    buf
}

/// splitmix64: the bulk data comes from a seed, the structure from the fuzzer's bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}
