//! Every integration test, as modules of one test binary. Each binary instantiates the
//! whole kernel again (every backend × tile shape × storage type it calls): with a binary
//! per file, compiling them took most of the CI time (see README, "How each backend is
//! tested").

mod common;

mod accuracy;
mod backends;
mod bad_input;
mod detect;
mod determinism;
mod edge_cases;
mod mixed_types;
mod partial_tiles;
mod plan_api;
mod reference_proptest;
mod rounded_shift;
mod scratch_reuse;
