//! Results are bit-identical across repeated calls and across thread counts.

use crate::common;

use common::{BiasSpec, Case, DType, Sinks, run};

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // Many work items: prefill with GQA.
    let mut c = Case::new(2, 100, 200, 8, 2, 64, 48);
    c.causal = true;
    v.push(c);
    // Decode with few (batch × kv head) items and a long KV range (split-KV territory).
    let mut c = Case::new(1, 1, 2500, 8, 1, 128, 128);
    c.sinks = Some(Sinks::Random(1.0));
    v.push(c);
    // MQA decode with every modifier and f16 storage.
    let mut c = Case::new(2, 3, 700, 16, 1, 96, 64);
    c.causal = true;
    c.window = Some((300, 0));
    c.softcap = Some(20.0);
    c.alibi = Some(0.1);
    c.bias = Some(BiasSpec {
        heads_1: true,
        neg_inf: 0.1,
        ..BiasSpec::default()
    });
    c.tq = DType::F16;
    c.tkv = DType::F16;
    c.to = DType::F16;
    v.push(c);
    v
}

fn lse_bits(o: &common::Outcome) -> Vec<u32> {
    o.lse
        .as_ref()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn repeated_calls_are_bit_identical() {
    for c in cases() {
        let data = c.data();
        for be in common::backends() {
            let first = run(&c, &data, be).unwrap();
            for _ in 0..2 {
                let again = run(&c, &data, be).unwrap();
                assert!(
                    first.bits == again.bits,
                    "{be}: output differs between calls\n{c:?}"
                );
                assert!(
                    lse_bits(&first) == lse_bits(&again),
                    "{be}: lse differs between calls"
                );
            }
        }
    }
}

/// `c` with `threads` worker threads.
fn with_threads(c: &Case, threads: usize) -> Case {
    let mut c = c.clone();
    c.threads = threads;
    c
}

#[test]
fn thread_counts_are_bit_identical() {
    for c in cases() {
        let data = c.data();
        for be in common::backends() {
            let one = run(&with_threads(&c, 1), &data, be).unwrap();
            for threads in [0usize, 3] {
                let many = run(&with_threads(&c, threads), &data, be).unwrap();
                assert!(
                    one.bits == many.bits,
                    "{be}: output with threads({threads}) differs from threads(1)\n{c:?}"
                );
                assert!(
                    lse_bits(&one) == lse_bits(&many),
                    "{be}: lse with threads({threads}) differs"
                );
            }
        }
    }
}

/// Calls made inside a rayon pool of three threads (from the installing thread, and from
/// several of the pool's tasks at once, so that the call's own workers nest in theirs)
/// agree bit for bit with one thread.
#[cfg(feature = "rayon")]
#[test]
fn calls_inside_a_rayon_pool_are_bit_identical() {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for c in cases().into_iter().take(2) {
        let data = c.data();
        for be in common::backends() {
            let one = run(&with_threads(&c, 1), &data, be).unwrap();
            for threads in [0usize, 2] {
                let cn = with_threads(&c, threads);
                let installed = pool.install(|| run(&cn, &data, be).unwrap());
                assert!(
                    installed.bits == one.bits,
                    "{be}: threads({threads}) inside a pool differs from threads(1)\n{c:?}"
                );
                let nested: Vec<_> = pool.install(|| {
                    (0..4)
                        .into_par_iter()
                        .map(|_| run(&cn, &data, be).unwrap())
                        .collect()
                });
                for o in nested {
                    assert!(
                        o.bits == one.bits,
                        "{be}: threads({threads}) from a pool task differs from threads(1)"
                    );
                }
            }
        }
    }
}

/// Calls from several threads at once (each with its own output) agree bit for bit.
#[test]
fn concurrent_calls_are_bit_identical() {
    let c = cases().remove(0);
    let data = c.data();
    for be in common::backends() {
        let want = run(&c, &data, be).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| run(&c, &data, be).unwrap()))
                .collect();
            for h in hs {
                assert!(
                    h.join().unwrap().bits == want.bits,
                    "{be}: concurrent call differs"
                );
            }
        });
    }
}
