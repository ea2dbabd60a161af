//! SIMD backends: detection, forcing and dispatch.
//!
//! This is the only file that knows about `target_arch`; everything else is written once,
//! generic over `S: pulp::Simd`, and entered through [`dispatch`].

use crate::error::Error;
use core::fmt;
use core::str::FromStr;
use pulp::WithSimd;

/// An instruction-set level a kernel can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// Portable scalar code: correct everywhere, the fallback.
    Scalar,
    /// x86-64 AVX2 + FMA (pulp's `V3`) with F16C, 8 f32 lanes. (Every AVX2 CPU we know
    /// of has F16C, which converts f16 KV caches as the kernels load them.)
    Avx2,
    /// x86-64 AVX-512 F/BW/CD/DQ/VL (pulp's `V4`), 16 f32 lanes.
    Avx512,
    /// aarch64 NEON (ASIMD), 4 f32 lanes.
    Neon,
}

impl Backend {
    /// All backends, slowest first.
    pub const ALL: [Backend; 4] = [
        Backend::Scalar,
        Backend::Avx2,
        Backend::Avx512,
        Backend::Neon,
    ];

    /// The fastest backend this CPU supports (detection runs once and is cached by pulp
    /// and std).
    pub fn detect() -> Backend {
        Self::available()
            .into_iter()
            .max_by_key(|b| b.rank())
            .unwrap_or(Backend::Scalar)
    }

    /// Every backend this CPU and build can run, slowest first. Always contains `Scalar`.
    pub fn available() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_available()).collect()
    }

    /// Whether this CPU and build can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => v3_f16c().is_some(),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => pulp::x86::V4::try_new().is_some(),
            #[cfg(target_arch = "aarch64")]
            Backend::Neon => pulp::aarch64::Neon::try_new().is_some(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The lower-case name used in messages, benchmarks and environment variables.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
            Backend::Neon => "neon",
        }
    }

    /// f32 lanes per vector register.
    pub fn lanes(self) -> usize {
        match self {
            Backend::Scalar => 1,
            Backend::Avx2 => 8,
            Backend::Avx512 => 16,
            Backend::Neon => 4,
        }
    }

    fn rank(self) -> u8 {
        match self {
            Backend::Scalar => 0,
            Backend::Neon | Backend::Avx2 => 1,
            Backend::Avx512 => 2,
        }
    }

    /// `Ok(self)` if available, else an error naming what is.
    pub fn require(self) -> Result<Backend, Error> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(unavailable(self))
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(Backend::Scalar),
            "avx2" | "v3" => Ok(Backend::Avx2),
            "avx512" | "avx-512" | "v4" => Ok(Backend::Avx512),
            "neon" => Ok(Backend::Neon),
            other => Err(Error::param(
                "backend",
                format!("unknown backend {other:?} (expected scalar, avx2, avx512 or neon)"),
            )),
        }
    }
}

/// Runs `op` on `backend`'s SIMD token, or fails if the CPU lacks it.
#[inline]
pub(crate) fn dispatch<Op: WithSimd>(backend: Backend, op: Op) -> Result<Op::Output, Error> {
    use pulp::Simd;
    match backend {
        #[cfg(not(feature = "emulate-avx512"))]
        Backend::Scalar => Ok(Simd::vectorize(pulp::Scalar::new(), op)),
        // (Testing only: see the feature in Cargo.toml.)
        #[cfg(feature = "emulate-avx512")]
        Backend::Scalar => Ok(Simd::vectorize(pulp::Scalar512b, op)),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => match v3_f16c() {
            // SAFETY: the CPU has V3's features and F16C (checked by `v3_f16c`).
            Some(tok) => Ok(unsafe { with_v3_f16c(tok, op) }),
            None => Err(unavailable(backend)),
        },
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => match pulp::x86::V4::try_new() {
            Some(tok) => Ok(Simd::vectorize(tok, op)),
            None => Err(unavailable(backend)),
        },
        #[cfg(target_arch = "aarch64")]
        Backend::Neon => match pulp::aarch64::Neon::try_new() {
            Some(tok) => Ok(Simd::vectorize(tok, op)),
            None => Err(unavailable(backend)),
        },
        #[allow(unreachable_patterns)]
        _ => Err(unavailable(backend)),
    }
}

/// pulp's V3 token, if the CPU also has F16C.
#[cfg(target_arch = "x86_64")]
fn v3_f16c() -> Option<pulp::x86::V3> {
    pulp::x86::V3::try_new().filter(|_| std::arch::is_x86_feature_detected!("f16c"))
}

/// `op` on the AVX2 backend, compiled with V3's features and F16C: pulp's V3 leaves F16C
/// out, and the f16 conversions of the decode kernels (`tile::HalfRows`) were then
/// wrapped in calls to functions compiled with it, one per score pass and PV block.
///
/// # Safety
/// The CPU has V3's features and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,bmi1,bmi2,fma,lzcnt,f16c")]
unsafe fn with_v3_f16c<Op: WithSimd>(tok: pulp::x86::V3, op: Op) -> Op::Output {
    op.with_simd(tok)
}

fn unavailable(backend: Backend) -> Error {
    let avail: Vec<&str> = Backend::available().iter().map(|b| b.name()).collect();
    Error::Backend {
        requested: backend.name(),
        msg: format!("this CPU/build supports {}", avail.join(", ")),
    }
}
