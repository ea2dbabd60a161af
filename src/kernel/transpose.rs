//! Block transposes for packing: 16 rows at a time into 16-float runs (Qᵀ), or 8 rows
//! into 8-float runs (the K̂ blocks of 8 keys).

/// `dst[c * dst_stride + r] = src[r * src_stride + c]` for `r < rows`, `c < cols`.
///
/// With `avx512` (the caller runs the AVX-512 backend), blocks of 16 (or 8) rows × 16
/// columns use AVX-512 shuffles (64 shuffles per 256 floats, or 40 per 128, instead of
/// one scalar move per float); the rest is scalar. The result is the same bits either
/// way.
pub(crate) fn transpose(
    avx512: bool,
    src: &[f32],
    src_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * src_stride + cols <= src.len());
    assert!((cols - 1) * dst_stride + rows <= dst.len());
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = avx512;
        0
    };
    #[cfg(target_arch = "x86_64")]
    let done =
        if avx512 && (rows == 16 || rows == 8) && std::arch::is_x86_feature_detected!("avx512f") {
            cols / 16 * 16
        } else {
            0
        };
    #[cfg(target_arch = "x86_64")]
    {
        for c0 in (0..done).step_by(16) {
            // SAFETY: AVX-512F is available (checked); rows 0..rows of columns c0..c0+16
            // of `src` and columns c0..c0+16 (`rows` floats each) of `dst` are in bounds
            // (asserted above: c0 + 16 <= cols).
            unsafe {
                let (s, d) = (src.as_ptr().add(c0), dst.as_mut_ptr().add(c0 * dst_stride));
                if rows == 16 {
                    avx512::block16(s, src_stride, d, dst_stride)
                } else {
                    avx512::block8(s, src_stride, d, dst_stride)
                }
            };
        }
    }
    for c in done..cols {
        let run = &mut dst[c * dst_stride..][..rows];
        for (r, x) in run.iter_mut().enumerate() {
            *x = src[r * src_stride + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    /// The first two stages of both blocks: pairs of rows interleaved by float, then by
    /// pairs of floats. In each 128-bit lane k, `u[4i + j]` holds column 4k + j of rows
    /// 4i..4i + 4 (`N` is 8 or 16).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn quads<const N: usize>(r: [__m512; N]) -> [__m512; N] {
        let mut t = [_mm512_setzero_ps(); N];
        for i in 0..N / 2 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); N];
        for i in 0..N / 4 {
            let (a, b) = (_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2]));
            let (c, d) = (
                _mm512_castps_pd(t[4 * i + 1]),
                _mm512_castps_pd(t[4 * i + 3]),
            );
            u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
            u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
        }
        u
    }

    /// Transposes the 16 × 16 block at `src` (rows `ss` floats apart) into `dst`
    /// (columns `ds` floats apart, 16 floats each).
    ///
    /// # Safety
    /// AVX-512F is available; `src` is valid for reads of 16 floats at each of
    /// `r * ss` (`r < 16`), `dst` for writes of 16 floats at each of `c * ds` (`c < 16`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block16(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        // SAFETY: the caller's contract covers every load and store below.
        unsafe {
            let u = quads::<16>(core::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ss))));
            // Gather the 128-bit lanes: v[j] (j < 4) holds lanes 0 and 2 of rows 0..8
            // for column j (lane 0) and 8 + j (lane 2); v[4 + j] lanes 1 and 3.
            let mut v = [_mm512_setzero_ps(); 16];
            for j in 0..4 {
                v[j] = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
                v[4 + j] = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
                v[8 + j] = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
                v[12 + j] = _mm512_shuffle_f32x4::<0xdd>(u[8 + j], u[12 + j]);
            }
            for j in 0..8 {
                let lo = _mm512_shuffle_f32x4::<0x88>(v[j], v[8 + j]);
                let hi = _mm512_shuffle_f32x4::<0xdd>(v[j], v[8 + j]);
                let (cl, ch) = COLS[j];
                _mm512_storeu_ps(dst.add(cl * ds), lo);
                _mm512_storeu_ps(dst.add(ch * ds), hi);
            }
        }
    }

    /// Transposes the 8 × 16 block at `src` (rows `ss` floats apart) into `dst`
    /// (columns `ds` floats apart, 8 floats each).
    ///
    /// # Safety
    /// AVX-512F is available; `src` is valid for reads of 16 floats at each of
    /// `r * ss` (`r < 8`), `dst` for writes of 8 floats at each of `c * ds` (`c < 16`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        // SAFETY: the caller's contract covers every load and store below.
        unsafe {
            let u = quads::<8>(core::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ss))));
            // Column 4k + j is lane k of u[j] (rows 0..4) then lane k of u[4 + j] (rows
            // 4..8): pick lanes (0, 2) and (1, 3) of both, then order them so that each
            // 256-bit half holds one whole column.
            for j in 0..4 {
                let even = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
                let odd = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
                for (x, c) in [(even, j), (odd, 4 + j)] {
                    let x = _mm512_shuffle_f32x4::<0xd8>(x, x);
                    let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x));
                    _mm256_storeu_ps(dst.add(c * ds), _mm512_castps512_ps256(x));
                    _mm256_storeu_ps(dst.add((c + 8) * ds), _mm256_castpd_ps(hi));
                }
            }
        }
    }

    /// The columns that the final shuffles of `v[j]` and `v[8 + j]` hold.
    const COLS: [(usize, usize); 8] = [
        (0, 8),
        (1, 9),
        (2, 10),
        (3, 11),
        (4, 12),
        (5, 13),
        (6, 14),
        (7, 15),
    ];
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn matches_the_scalar_transpose() {
        for &(rows, cols, ss, ds) in &[
            (16usize, 16usize, 16usize, 16usize),
            (16, 128, 128, 192),
            (16, 40, 41, 20),
            (7, 33, 33, 9),
            (1, 5, 5, 1),
            (16, 15, 15, 16),
            (8, 128, 128, 8),
            (8, 40, 41, 9),
            (8, 16, 16, 8),
        ] {
            let src: Vec<f32> = (0..rows * ss).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut dst = vec![f32::NAN; cols * ds];
            for fast in [false, true] {
                dst.fill(f32::NAN);
                transpose(fast, &src, ss, rows, cols, &mut dst, ds);
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(dst[c * ds + r], src[r * ss + c], "{rows}x{cols} r{r} c{c}");
                    }
                }
            }
        }
    }
}
