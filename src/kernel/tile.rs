//! The register-blocked micro-kernel behind both products of a tile.
//!
//! Query rows live in SIMD lanes everywhere (`Qᵀ`, `S`, `P` and `Oᵀ` are stored
//! row-vector-major), so both matrix products have the same shape: an `M × NV`-vector
//! accumulator block, where each step of the reduction broadcasts `M` scalars of one
//! operand and loads `NV` vectors of the other.
//!
//! - `S = K̂·Qᵀ`: `M` keys, reduction over the head dim; broadcasts K, loads Qᵀ.
//! - `Oᵀ = α·Oᵀ + V̂ᵀ·P`: `M` output columns, reduction over the tile's keys; broadcasts V
//!   (read in place from the caller's tensor when it is f32), loads P. The rescale by the
//!   softmax's `α` (one factor per row, so per lane) is applied as the accumulators are
//!   loaded: no separate pass over O.
//!
//! This is the one module with raw-pointer loops: the driver asserts the extents before
//! calling (bounds checks in these loops cost 18–30 % in the tooling spike).

use pulp::Simd;

/// The loaded operand of a block: rows of vectors, one row per reduction step.
///
/// f32 rows are read as they are (`*const S::f32s`, offsets in vectors); rows of 16-bit
/// floats ([`HalfRows`], AVX-512 and AVX2) are converted as they are loaded (offsets in
/// values), so a decode over an f16 or bf16 KV cache reads K and V once, in place,
/// instead of converting each tile into scratch first.
pub(crate) trait Rows<S: Simd>: Copy {
    /// Vector `v` of the current row.
    ///
    /// # Safety
    /// The vector lies within the caller's extent, and the CPU has what the
    /// implementation uses beyond `S`'s features (F16C for f16 [`HalfRows`] on V3, which
    /// the AVX2 backend is compiled with).
    unsafe fn get(self, simd: S, v: usize) -> S::f32s;
    /// The position `n` units on (vectors for f32, values for halves); never read
    /// unless [`Rows::get`]'s contract holds there.
    fn add(self, n: usize) -> Self;
}

impl<S: Simd> Rows<S> for *const S::f32s {
    #[inline(always)]
    unsafe fn get(self, _: S, v: usize) -> S::f32s {
        // SAFETY: within the caller's extent (V̂ rows are vector-aligned only in scratch,
        // so read unaligned).
        unsafe { self.add(v).read_unaligned() }
    }
    #[inline(always)]
    fn add(self, n: usize) -> Self {
        self.wrapping_add(n)
    }
}

/// Rows of f16 (`BF` false) or bf16 (`BF` true) values, one vector's lanes at a time
/// (16 on AVX-512, 8 on AVX2), converted to f32
/// as they are loaded: one `vcvtph2ps`, or a zero-extension and a shift (a bf16 is the
/// high half of an f32), per vector. Both conversions are exact, so results are the
/// same bits as converting into scratch first.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct HalfRows<const BF: bool>(pub *const u16);

/// AVX2: 8 values per vector; f16 by F16C, which the AVX2 backend is compiled with
/// (`backend::dispatch`; pulp's V3 does not enable it).
#[cfg(target_arch = "x86_64")]
impl<const BF: bool> Rows<pulp::x86::V3> for HalfRows<BF> {
    #[inline(always)]
    unsafe fn get(self, simd: pulp::x86::V3, v: usize) -> pulp::f32x8 {
        use core::arch::x86_64::__m128i;
        // SAFETY: 8 values from `v·8` lie within the caller's extent.
        let h = unsafe { (self.0.add(8 * v) as *const __m128i).read_unaligned() };
        let x = if BF {
            let w = simd
                .avx2
                ._mm256_slli_epi32::<16>(simd.avx2._mm256_cvtepu16_epi32(h));
            simd.avx._mm256_castsi256_ps(w)
        } else {
            // SAFETY: the CPU has F16C (the caller's contract).
            unsafe { core::arch::x86_64::_mm256_cvtph_ps(h) }
        };
        bytemuck::cast(x)
    }
    #[inline(always)]
    fn add(self, n: usize) -> Self {
        HalfRows(self.0.wrapping_add(n))
    }
}

#[cfg(target_arch = "x86_64")]
impl<const BF: bool> Rows<pulp::x86::V4> for HalfRows<BF> {
    #[inline(always)]
    unsafe fn get(self, simd: pulp::x86::V4, v: usize) -> pulp::f32x16 {
        use core::arch::x86_64::__m256i;
        let f = simd.avx512f;
        // SAFETY: 16 values from `v·16` lie within the caller's extent.
        let h = unsafe { (self.0.add(16 * v) as *const __m256i).read_unaligned() };
        let x = if BF {
            f._mm512_castsi512_ps(f._mm512_slli_epi32::<16>(f._mm512_cvtepu16_epi32(h)))
        } else {
            f._mm512_cvtph_ps(h)
        };
        bytemuck::cast(x)
    }
    #[inline(always)]
    fn add(self, n: usize) -> Self {
        HalfRows(self.0.wrapping_add(n))
    }
}

/// No accumulation: `c` is overwritten.
pub(crate) const SET: u8 = 0;
/// `c` is accumulated after scaling by one factor per lane: `alpha[lane of v]`.
pub(crate) const ACC_LANES: u8 = 1;
/// `c` is accumulated after scaling by one factor per accumulator row: `alpha[i]`.
pub(crate) const ACC_ROWS: u8 = 2;

/// The operands of a block: `c[i][v] = α·c[i][v] + Σ_t a[i·a_row + t·a_red] · b[t·b_stride + v]`
/// for `i < M`, `v < NV`, `t < red` ([`bcast_block`]). `C` is the backend's vector type
/// (`S::f32s`); `b` is a [`Rows`], or the raw pointer a caller wraps into one.
#[derive(Clone, Copy)]
pub(crate) struct Block<B, C> {
    /// The broadcast operand (K̂ for S, P for row-major O, V̂ for Oᵀ).
    pub a: *const f32,
    /// Floats between the broadcast scalars of two accumulator rows.
    pub a_row: usize,
    /// Floats between two reduction steps of `a`.
    pub a_red: usize,
    /// The loaded operand: `NV` vectors per reduction step.
    pub b: B,
    /// Units of `b` ([`Rows::add`]) between two reduction steps.
    pub b_stride: usize,
    /// Reduction steps.
    pub red: usize,
    /// The accumulators' home: `M` rows of `NV` vectors, `c_stride` vectors apart.
    pub c: *mut C,
    /// Vectors between two rows of `c`.
    pub c_stride: usize,
    /// The rescale factors of `c` (unused by `SET`).
    pub alpha: *const f32,
}

impl<B, C> Block<B, C> {
    /// The same block with another loaded operand.
    #[inline(always)]
    pub fn with_b<B2>(self, b: B2, b_stride: usize) -> Block<B2, C> {
        Block {
            a: self.a,
            a_row: self.a_row,
            a_red: self.a_red,
            b,
            b_stride,
            red: self.red,
            c: self.c,
            c_stride: self.c_stride,
            alpha: self.alpha,
        }
    }

    /// The same block, with `c` as vectors of type `C2` (another backend's name for the
    /// same vector type).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub fn cast<C2>(self) -> Block<B, C2> {
        Block {
            a: self.a,
            a_row: self.a_row,
            a_red: self.a_red,
            b: self.b,
            b_stride: self.b_stride,
            red: self.red,
            c: self.c as *mut C2,
            c_stride: self.c_stride,
            alpha: self.alpha,
        }
    }
}

/// The block `op` describes, where `α` is 0 (`SET`), the vector `alpha[v]` (`ACC_LANES`)
/// or the scalar `alpha[i]` (`ACC_ROWS`).
///
/// # Safety
/// - `a` is valid for reads at every `i·a_row + t·a_red` (`i < M`, `t < red`);
/// - `b` is valid for reads of vectors `v < NV` at `t·b_stride` ([`Rows::add`]) for
///   `t < red`;
/// - `c` is valid for writes (and reads unless `SET`) of `(M - 1) * c_stride + NV` vectors;
/// - `alpha` is valid for reads of `NV` vectors (`ACC_LANES`) or `M` floats (`ACC_ROWS`).
#[inline(always)]
pub(crate) unsafe fn bcast_block<
    S: Simd,
    const M: usize,
    const NV: usize,
    const MODE: u8,
    B: Rows<S>,
>(
    simd: S,
    op: Block<B, S::f32s>,
) {
    let Block {
        a,
        a_row,
        a_red,
        b,
        b_stride,
        red,
        c,
        c_stride,
        alpha,
    } = op;
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NV]; M];
    if MODE != SET {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, r) in row.iter_mut().enumerate() {
                // SAFETY: v < NV and i < M, within the caller's `alpha` extent.
                let al = unsafe {
                    if MODE == ACC_LANES {
                        (alpha as *const S::f32s).add(v).read_unaligned()
                    } else {
                        simd.splat_f32s(*alpha.add(i))
                    }
                };
                // SAFETY: i < M and v < NV, within the caller's `c` extent.
                *r = simd.mul_f32s(unsafe { c.add(i * c_stride + v).read() }, al);
            }
        }
    }
    // One base pointer per broadcast row and one running offset: each step then costs
    // a single index update, not M address computations.
    let rows: [*const f32; M] = core::array::from_fn(|i| a.wrapping_add(i * a_row));
    let mut off = 0usize;
    let mut bt = b;
    // One reduction step (a macro, not a closure: a closure over `acc` kept the
    // accumulators in memory and ran 10× slower).
    macro_rules! step {
        () => {
            let mut x = [zero; NV];
            for (v, xv) in x.iter_mut().enumerate() {
                // SAFETY: v < NV at a reduction step t < red: within the caller's `b`
                // extent.
                *xv = unsafe { bt.get(simd, v) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: i < M at a reduction step t < red: within the caller's `a` extent.
                let s = simd.splat_f32s(unsafe { *rows[i].add(off) });
                for (r, xv) in row.iter_mut().zip(&x) {
                    *r = simd.mul_add_e_f32s(s, *xv, *r);
                }
            }
            off += a_red;
            bt = bt.add(b_stride);
        };
    }
    // Two steps per iteration: 2–5 % faster on a and d than one (interleaved runs).
    if red % 2 == 1 {
        step!();
    }
    for _ in 0..red / 2 {
        step!();
        step!();
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, r) in row.iter().enumerate() {
            // SAFETY: i < M and v < NV, within the caller's `c` extent.
            unsafe { c.add(i * c_stride + v).write(*r) };
        }
    }
}

/// [`bcast_block`] for `w ≤ NV ≤ 4` vectors known only at run time: full blocks use `NV`,
/// the tail of a row (or column) range one of the narrower instantiations.
///
/// # Safety
/// As [`bcast_block`] with `w` in place of `NV`.
#[inline(always)]
pub(crate) unsafe fn bcast_block_w<
    S: Simd,
    const M: usize,
    const NV: usize,
    const MODE: u8,
    B: Rows<S>,
>(
    simd: S,
    w: usize,
    op: Block<B, S::f32s>,
) {
    debug_assert!((1..=NV).contains(&w) && NV <= 4);
    // SAFETY: the caller's contract, for the `w` vectors each instantiation touches.
    unsafe {
        match w {
            _ if w == NV => bcast_block::<S, M, NV, MODE, B>(simd, op),
            1 => bcast_block::<S, M, 1, MODE, B>(simd, op),
            2 => bcast_block::<S, M, 2, MODE, B>(simd, op),
            _ => bcast_block::<S, M, 3, MODE, B>(simd, op),
        }
    }
}
