//! Helpers for `benches/peers.rs`: the shapes, and the three implementations compared on
//! them — flashcpu, candle's CPU flash attention (`candle_nn::attention::flash_attn`) and
//! the naive `softmax(q·kᵀ·scale + mask)·v` a candle user writes by hand.
//!
//! Every implementation gets its inputs in the layout it wants, prepared once outside
//! the timed region: flashcpu and `flash_attn` read BSHD, the naive path reads BHSD with
//! the K/V heads already repeated to the query heads (GQA).

use candle_core::{DType, Device, Tensor};
use candle_nn::attention::{AttnMask, flash_attn};
use flashcpu::{Attention, Backend, Tensor as FTensor, TensorMut};

pub use candle_core::Result as CandleResult;

/// One benchmark shape. Causal masks are bottom-right aligned (FlashAttention 2's
/// convention, flashcpu's): query `i` sees keys `j <= i + skv - sq`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub id: &'static str,
    pub b: usize,
    pub sq: usize,
    pub skv: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub causal: bool,
}

const fn shape(
    id: &'static str,
    (b, sq, skv): (usize, usize, usize),
    (hq, hkv, d): (usize, usize, usize),
    causal: bool,
) -> Shape {
    Shape {
        id,
        b,
        sq,
        skv,
        hq,
        hkv,
        d,
        causal,
    }
}

/// flashcpu's four anchor shapes (as in its own benches) and two short ones.
pub const SHAPES: [Shape; 6] = [
    shape("a_mha_h8_s1024_d128", (1, 1024, 1024), (8, 8, 128), false),
    shape(
        "b_gqa_causal_h32_kv8_s2048_d128",
        (1, 2048, 2048),
        (32, 8, 128),
        true,
    ),
    shape(
        "c_decode_h32_kv8_skv4096_d128",
        (1, 1, 4096),
        (32, 8, 128),
        true,
    ),
    shape("d_mha_h12_s512_d64", (1, 512, 512), (12, 12, 64), false),
    shape("s16_mha_h8_s16_d64", (1, 16, 16), (8, 8, 64), false),
    shape("s64_mha_h8_s64_d64", (1, 64, 64), (8, 8, 64), false),
];

impl Shape {
    /// FLOPs of the useful work: 4·b·hq·d per visible (query, key) pair, so
    /// 4·b·hq·sq·skv·d non-causal and 4·b·hq·d·S(S+1)/2 causal with sq = skv = S.
    /// (The naive path computes the masked-out half of the scores too; it is not counted.)
    pub fn flops(&self) -> u64 {
        let pairs: u64 = if self.causal {
            (0..self.sq)
                .map(|i| (i + self.skv + 1).saturating_sub(self.sq).min(self.skv) as u64)
                .sum()
        } else {
            (self.sq * self.skv) as u64
        };
        4 * (self.b * self.hq * self.d) as u64 * pairs
    }

    pub fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    pub fn q_len(&self) -> usize {
        self.b * self.sq * self.hq * self.d
    }

    pub fn kv_len(&self) -> usize {
        self.b * self.skv * self.hkv * self.d
    }
}

/// Makes every candle code path single-threaded: its rayon pool (`flash_attn`'s
/// non-causal kernels, softmax), gemm's `Parallelism` (read from `RAYON_NUM_THREADS`) and
/// its own barrier pool (causal kernels, element-wise ops; `CANDLE_NUM_THREADS`).
///
/// # Safety
/// Call first thing in `main`, before any other thread exists (it sets env variables).
pub unsafe fn force_single_thread() {
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    assert_eq!(rayon::current_num_threads(), 1, "rayon's global pool");
    assert_eq!(
        candle_core::utils::get_num_threads(),
        1,
        "candle's gemm threads"
    );
    assert_eq!(
        candle_core::utils::barrier_pool().n_workers(),
        0,
        "candle's barrier pool"
    );
}

/// The inputs of one shape, in every layout the three implementations read.
pub struct Inputs {
    pub shape: Shape,
    /// BSHD, row-major: flashcpu reads these.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// BSHD tensors for `flash_attn` (which handles GQA itself).
    pub q_bshd: Tensor,
    pub k_bshd: Tensor,
    pub v_bshd: Tensor,
    /// BHSD tensors, K/V heads repeated to `hq`, for the naive path.
    pub q_bhsd: Tensor,
    pub k_bhsd: Tensor,
    pub v_bhsd: Tensor,
    /// `[sq, skv]` additive mask (0 / -inf) for the naive causal path, `None` when nothing
    /// is masked (non-causal, or decode where the single query sees every key).
    pub mask: Option<Tensor>,
}

impl Inputs {
    pub fn new(shape: Shape, q: Vec<f32>, k: Vec<f32>, v: Vec<f32>) -> CandleResult<Self> {
        let Shape {
            b,
            sq,
            skv,
            hq,
            hkv,
            d,
            causal,
            ..
        } = shape;
        let dev = &Device::Cpu;
        let q_bshd = Tensor::from_slice(&q, (b, sq, hq, d), dev)?;
        let k_bshd = Tensor::from_slice(&k, (b, skv, hkv, d), dev)?;
        let v_bshd = Tensor::from_slice(&v, (b, skv, hkv, d), dev)?;
        let group = hq / hkv;
        let repeat = |t: &Tensor| -> CandleResult<Tensor> {
            // [b, s, hkv, d] -> [b, s, hkv, group, d] -> [b, s, hq, d] -> [b, hq, s, d]
            t.unsqueeze(3)?
                .broadcast_as((b, skv, hkv, group, d))?
                .reshape((b, skv, hq, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q_bhsd = q_bshd.transpose(1, 2)?.contiguous()?;
        let k_bhsd = repeat(&k_bshd)?;
        let v_bhsd = repeat(&v_bshd)?;
        let mask = if causal && sq > 1 {
            let m: Vec<f32> = (0..sq)
                .flat_map(|i| {
                    (0..skv).map(move |j| {
                        if j + sq > i + skv {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(m, (sq, skv), dev)?)
        } else {
            None
        };
        Ok(Self {
            shape,
            q,
            k,
            v,
            q_bshd,
            k_bshd,
            v_bshd,
            q_bhsd,
            k_bhsd,
            v_bhsd,
            mask,
        })
    }

    /// flashcpu with the given backend on the calling thread, into `o` (BSHD).
    pub fn flashcpu(&self, backend: Backend, o: &mut [f32]) {
        let Shape {
            b,
            sq,
            skv,
            hq,
            hkv,
            d,
            causal,
            ..
        } = self.shape;
        let mut attn = Attention::new().backend(backend).threads(1);
        if causal {
            attn = attn.causal();
        }
        attn.forward(
            FTensor::bshd(&self.q, [b, sq, hq, d]).unwrap(),
            FTensor::bshd(&self.k, [b, skv, hkv, d]).unwrap(),
            FTensor::bshd(&self.v, [b, skv, hkv, d]).unwrap(),
            &mut TensorMut::bshd(o, [b, sq, hq, d]).unwrap(),
        )
        .expect("flashcpu forward");
    }

    /// candle's CPU flash attention. Returns BHSD (as `flash_attn` does).
    pub fn candle_flash(&self) -> CandleResult<Tensor> {
        let Shape {
            sq, skv, causal, ..
        } = self.shape;
        let mask = if causal {
            // kv_offset = skv - sq makes candle's causal mask bottom-right aligned.
            AttnMask::causal_with_offset(skv - sq)
        } else {
            AttnMask::None
        };
        flash_attn::<f32>(
            &self.q_bshd,
            &self.k_bshd,
            &self.v_bshd,
            self.shape.scale(),
            mask,
            None,
            None,
        )
    }

    /// `softmax(q·kᵀ·scale + mask)·v` in candle ops. Returns BHSD.
    pub fn candle_naive(&self) -> CandleResult<Tensor> {
        let scores = (self.q_bhsd.matmul(&self.k_bhsd.t()?)? * self.shape.scale() as f64)?;
        let scores = match &self.mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&self.v_bhsd)
    }
}

/// A BHSD candle tensor as a row-major BSHD `Vec<f32>`.
pub fn bhsd_to_bshd(t: &Tensor) -> CandleResult<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .transpose(1, 2)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "output lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// This process's CPU time (user + system, all threads) in seconds, from
/// `/proc/self/stat`; `None` off Linux.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0) // USER_HZ is 100 on Linux
}

/// Runs `f` for at least `min_wall` seconds (at least once) and returns
/// (process CPU seconds / wall seconds, calls). About 1.0 means one busy thread.
pub fn cpu_per_wall(min_wall: f64, mut f: impl FnMut()) -> Option<(f64, usize)> {
    let cpu0 = process_cpu_seconds()?;
    let t0 = std::time::Instant::now();
    let mut calls = 0;
    while calls == 0 || t0.elapsed().as_secs_f64() < min_wall {
        f();
        calls += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds()? - cpu0;
    Some((cpu / wall, calls))
}
