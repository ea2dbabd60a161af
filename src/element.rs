//! Storage element types.
//!
//! Compute is always f32 with f32 accumulation; an [`Element`] only says how rows are
//! converted to f32 when a tile is packed and back when the output is written. Adding a
//! storage type touches this file alone, never the kernel.

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A storage type for Q, K, V and O: `f32`, [`half::f16`] or [`half::bf16`].
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    /// A short name for messages and benchmarks (`"f32"`, `"f16"`, `"bf16"`).
    const NAME: &'static str;
    /// Converts a row to f32; `src` and `dst` have the same length.
    fn load_row(src: &[Self], dst: &mut [f32]);
    /// Converts `n` rows of `len` values, `src_stride` and `dst_stride` elements apart
    /// (a tile of K or V rows in one call).
    #[inline(always)]
    fn load_rows(
        src: &[Self],
        src_stride: usize,
        dst: &mut [f32],
        dst_stride: usize,
        n: usize,
        len: usize,
    ) {
        for r in 0..n {
            Self::load_row(
                &src[r * src_stride..][..len],
                &mut dst[r * dst_stride..][..len],
            );
        }
    }
    /// Converts a row from f32, rounding to nearest even; `src` and `dst` have the same length.
    fn store_row(src: &[f32], dst: &mut [Self]);
    /// `Some` when the storage already is f32, so kernels may read it in place.
    #[inline(always)]
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
    /// `Some` when the storage already is f32, so kernels may write it in place.
    #[inline(always)]
    fn as_f32_mut(_dst: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// The raw 16-bit words of f16 (`Some((words, false))`) or bf16 (`Some((words,
    /// true))`) storage, for kernels that convert as they load.
    #[doc(hidden)]
    #[inline(always)]
    fn as_half_bits(_src: &[Self]) -> Option<(&[u16], bool)> {
        None
    }
    /// Converts one value to f32 (used by the reference, not by the kernels).
    fn to_f32(self) -> f32;
    /// Converts one f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline(always)]
    fn as_f32_mut(dst: &mut [f32]) -> Option<&mut [f32]> {
        Some(dst)
    }
    #[inline(always)]
    fn load_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn store_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn as_half_bits(src: &[f16]) -> Option<(&[u16], bool)> {
        Some((bytemuck::cast_slice(src), false))
    }
    /// With F16C, 8 values per `vcvtph2ps`: `half`'s slice conversion detects F16C
    /// too, but calls a function per 8 values through a copy, and decode over an f16 KV
    /// cache spent 44 % of its time there.
    #[inline(always)]
    fn load_row(src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        Self::load_rows(src, 0, dst, 0, 1, src.len());
    }
    /// One call for all the rows (F16C's instructions cannot be inlined into code that
    /// is generic over the backend: the scalar backend is compiled without it).
    #[inline(always)]
    fn load_rows(
        src: &[f16],
        src_stride: usize,
        dst: &mut [f32],
        dst_stride: usize,
        n: usize,
        len: usize,
    ) {
        if n == 0 {
            return;
        }
        assert!((n - 1) * src_stride + len <= src.len());
        assert!((n - 1) * dst_stride + len <= dst.len());
        #[cfg(target_arch = "x86_64")]
        // (Rust reports F16C from its CPUID bit alone, not whether the OS saves the
        // AVX registers: AVX is checked too.)
        if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has F16C and AVX, enabled by the OS; every row lies within
            // both slices (asserted).
            unsafe { f16c_rows(src, src_stride, dst, dst_stride, n, len) };
            return;
        }
        for r in 0..n {
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                &src[r * src_stride..][..len],
                &mut dst[r * dst_stride..][..len],
            );
        }
    }
    #[inline(always)]
    fn store_row(src: &[f32], dst: &mut [f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// `n` rows of `len` values to f32 by F16C. The caller checks that the CPU has F16C and
/// that every row lies within `src` and `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16c_rows(
    src: &[f16],
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    n: usize,
    len: usize,
) {
    use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    for r in 0..n {
        let (s, d) = (r * src_stride, r * dst_stride);
        let mut i = 0;
        while i + 8 <= len {
            // SAFETY: values i..i + 8 ≤ len of row r of both slices (by the caller).
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(s + i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(d + i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for (y, x) in dst[d + i..d + len].iter_mut().zip(&src[s + i..s + len]) {
            *y = x.to_f32();
        }
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn as_half_bits(src: &[bf16]) -> Option<(&[u16], bool)> {
        Some((bytemuck::cast_slice(src), true))
    }
    /// A bf16 is the high half of an f32: one shift per value, which the compiler
    /// vectorises. (`half`'s slice conversion quiets signalling NaNs on the way, a
    /// per-value branch that made it several times slower; a NaN stays a NaN here too.)
    #[inline(always)]
    fn load_row(src: &[bf16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
    #[inline(always)]
    fn store_row(src: &[f32], dst: &mut [bf16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
