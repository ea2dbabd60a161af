//! # flashcpu — Flash-Attention on the CPU, hand-tuned for AVX-512, AVX2 and NEON
//!
//! flashcpu computes `o = softmax(scale · q·kᵀ + modifiers, masked) · v` for many heads
//! at once (multi-head, grouped-query and multi-query attention) without ever
//! materialising the score matrix:
//!
//! ```text
//! for each work item (batch, kv head, tile of query rows):   // planned from the shape only
//!     Qᵀ = the tile's rows (query positions × query heads of the kv group), packed d-major
//!     m = -inf, l = 0, O = 0                                  // per row, f32
//!     for each K/V tile the mask does not rule out:           // mask → loop bounds
//!         K̂, V̂ = the tile's panels: packed once per (batch, kv head) and kept, when
//!                they fit, for the head's next Q tiles (decode: f32 rows read in place)
//!         S = K̂·Qᵀ                                            // register-blocked micro-kernel
//!         modifiers (softcap, bias, ALiBi) and the partial-tile mask, only where needed
//!         m' = max(m, colmax S); P = exp2((S - m')·c·log2 e); l = l·e^(m-m') + Σ P
//!         O = O·e^(m-m') + Pᵀ·V̂                               // the same micro-kernel
//!     o = O / (l + e^(sink-m)); lse = m + ln l
//! ```
//!
//! The optimisations, in order of their weight:
//! 1. Both products are register-blocked micro-kernels written once over
//!    `S: pulp::Simd` (a broadcast operand times a few vectors per step), with tile
//!    shapes picked per backend (`kernel/tile.rs`, table in `kernel/mod.rs`).
//! 2. Scores are kept transposed (keys × query rows), so the online softmax runs across
//!    rows in SIMD lanes with no horizontal reductions. On AVX-512 and AVX2, O is
//!    row-major and PV broadcasts P (on AVX-512 outside decode, written by the softmax
//!    interleaved by row vector) against rows of V̂; the softmax's rescale is folded
//!    into the PV micro-kernel.
//! 3. The query heads that share a kv head are rows of the same tile, so each K/V tile
//!    is read and converted once per GQA group, and packed once per kv head.
//! 4. The mask classifies tiles as empty (skipped), full (no per-element work) or partial.
//! 5. Logits of ±1e4 lose no accuracy (folding the scale into Q would round them
//!    first): with `c·log2 e ≤ 1` the exponent is one FMA, `x·c·log2 e − fl(m·c·log2 e)`,
//!    whose shift is common to the row and used as such by α, `l`, the LSE and the split
//!    merge; otherwise the running max is subtracted before the scale enters it.
//! 6. Decode sweeps every kv head's rows of a key range in one pass (one S and one
//!    online softmax for all of them), prefetching the next tile while computing this
//!    one, and splits long KV ranges across threads
//!    (merged in a fixed order, so results stay bit-identical for every thread count).
//!
//! ```
//! use flashcpu::{Attention, Backend, Tensor, TensorMut};
//! let (b, sq, skv, hq, hkv, d) = (1, 3, 5, 4, 2, 16);
//! let q = vec![0.5f32; b * sq * hq * d];
//! let k = vec![0.25f32; b * skv * hkv * d];
//! let v = vec![1.0f32; b * skv * hkv * d];
//! let mut o = vec![0.0f32; b * sq * hq * d];
//! let mut lse = vec![0.0f32; b * hq * sq];
//! Attention::new()
//!     .causal()
//!     .backend(Backend::Scalar)
//!     .forward_with_lse(
//!         Tensor::bshd(&q, [b, sq, hq, d])?,
//!         Tensor::bshd(&k, [b, skv, hkv, d])?,
//!         Tensor::bshd(&v, [b, skv, hkv, d])?,
//!         &mut TensorMut::bshd(&mut o, [b, sq, hq, d])?,
//!         &mut lse,
//!     )?;
//! assert!(o.iter().all(|x| (x - 1.0).abs() < 1e-6));
//! # Ok::<(), flashcpu::Error>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

mod attention;
mod backend;
mod element;
mod error;
mod kernel;
mod kv;
mod plan;
pub mod reference;
mod tensor;

pub use attention::Attention;
pub use backend::Backend;
pub use element::Element;
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use plan::{Plan, release_scratch};
pub use tensor::{Bias, Tensor, TensorMut};
