//! Which backends this run covers, and the `FLASHCPU_EXPECT_BACKEND` guard.

use crate::common;

use flashcpu::Backend;

/// Prints the backends that run and those that are skipped; with
/// `FLASHCPU_EXPECT_BACKEND=scalar,avx2,...` set, fails if any listed one is missing.
#[test]
fn backend_coverage() {
    let avail = Backend::available();
    for b in Backend::ALL {
        if avail.contains(&b) {
            eprintln!("running: {}", b.name());
        } else {
            eprintln!("skipping: host lacks {}", b.name());
        }
    }
    match common::expected_backends() {
        None => eprintln!("FLASHCPU_EXPECT_BACKEND not set: no backend is required"),
        Some(want) => {
            let missing = common::missing_expected_backends();
            assert!(
                missing.is_empty(),
                "FLASHCPU_EXPECT_BACKEND expects {want:?} but this host lacks {missing:?} \
                 (available: {avail:?})"
            );
            eprintln!("FLASHCPU_EXPECT_BACKEND satisfied: {want:?}");
        }
    }
    assert_eq!(common::backends(), avail);
}

#[test]
fn backend_list_is_consistent() {
    let avail = Backend::available();
    assert!(
        avail.contains(&Backend::Scalar),
        "Scalar must always be available"
    );
    assert!(
        avail.contains(&Backend::detect()),
        "detect() must be available"
    );
    let mut sorted = avail.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted, avail,
        "available() is sorted slowest first, no duplicates"
    );
    for b in Backend::ALL {
        assert_eq!(b.is_available(), avail.contains(&b), "{b}");
        assert_eq!(b.require().is_ok(), b.is_available(), "{b}");
        // Names round-trip through FromStr, case-insensitively and with spaces.
        assert_eq!(b.name().parse::<Backend>().unwrap(), b);
        assert_eq!(
            format!(" {} ", b.name().to_uppercase())
                .parse::<Backend>()
                .unwrap(),
            b
        );
        assert_eq!(b.to_string(), b.name());
    }
    let e = "sse2".parse::<Backend>().unwrap_err();
    assert_eq!(e.arg(), "backend");
    assert!(e.to_string().contains("unknown backend"), "{e}");
    #[cfg(target_arch = "x86_64")]
    assert!(!Backend::Neon.is_available());
    #[cfg(target_arch = "aarch64")]
    {
        assert!(!Backend::Avx2.is_available());
        assert!(!Backend::Avx512.is_available());
    }
}
