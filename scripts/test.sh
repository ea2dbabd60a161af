#!/usr/bin/env bash
# flashcpu's whole test run: the one command for a fresh machine and for CI.
#
#   scripts/test.sh            # install what is missing, then run every step below
#   scripts/test.sh STEP...    # only the named steps (setup is still done), e.g.
#                              #   scripts/test.sh fmt clippy host
#
# Steps, in order (fail fast; a timing line after each, a summary at the end):
#   setup         apt packages (aarch64 cross gcc + libc, qemu-user), rustup target and
#                 components, nightly toolchain, cargo-fuzz -- each only if missing
#   fmt           cargo fmt --check
#   clippy        cargo clippy --all-targets -- -D warnings (host)
#   clippy-arm    the same for aarch64 (--lib --tests)
#   host          cargo test, all targets and doctests; FLASHCPU_EXPECT_BACKEND comes from
#                 /proc/cpuinfo so a backend the CPU has can never be skipped silently
#   emu512        the tests again (release) with the `emulate-avx512` feature: the scalar
#                 backend runs the AVX-512 instantiation of the kernels (16 lanes, its tile
#                 shapes) on pulp's portable emulation, so hosts without AVX-512 test it too
#   qemu-avx2     x86 test binaries under `qemu-x86_64 -cpu max` (AVX2, no AVX-512)
#   qemu-scalar   x86 test binaries under `qemu-x86_64 -cpu Nehalem` (no AVX: scalar)
#   arm           aarch64 test binaries under qemu-aarch64 (NEON)
#   fuzz          cargo +nightly fuzz build, then every target for FUZZ_SECONDS (60) each
#   bench         criterion smoke run (if benches/*.rs exist)
#   demo          cargo run --release --example demo (if examples/demo.rs exists)
#
# Knobs: FUZZ_SECONDS (default 60), QEMU_PROPTEST_CASES (default 16; qemu steps also run
# 4 instead of 24 cases of each test in tests/it/scratch_reuse.rs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
QEMU_PROPTEST_CASES=${QEMU_PROPTEST_CASES:-16}
ARM_TARGET=aarch64-unknown-linux-gnu
HOST_ARCH=$(uname -m)
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# The crate's suites print a skipped backend; these make the suites fail instead.
unset FLASHCPU_EXPECT_BACKEND FLASHCPU_EXPECT_DETECT

# ---------------------------------------------------------------- step bookkeeping
T_START=$SECONDS
CURRENT_STEP=""
STEP_T0=0
SKIPPED=""
SUMMARY=()

on_exit() {
    local rc=$?
    if [ -n "$CURRENT_STEP" ]; then
        SUMMARY+=("$(printf '%-12s FAILED (exit %d) after %4ds' "$CURRENT_STEP" "$rc" $((SECONDS - STEP_T0)))")
    fi
    echo
    echo "==================== summary ===================="
    local line
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    printf '%-12s %s in %ds\n' "total" "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)" $((SECONDS - T_START))
    exit "$rc"
}
trap on_exit EXIT

WANTED=("$@")
wanted() {
    [ ${#WANTED[@]} -eq 0 ] && return 0
    local w
    for w in "${WANTED[@]}"; do [ "$w" = "$1" ] && return 0; done
    return 1
}

# step NAME FUNCTION: runs FUNCTION (under set -e, so its first failing command ends the
# whole script) and prints how long it took.
step() {
    local name=$1 fn=$2
    if [ "$name" != setup ] && ! wanted "$name"; then return 0; fi
    CURRENT_STEP=$name
    SKIPPED=""
    STEP_T0=$SECONDS
    echo
    echo "==================== [$name] ===================="
    "$fn"
    if [ -z "$SKIPPED" ]; then
        local line
        line=$(printf '%-12s ok in %4ds' "$name" $((SECONDS - STEP_T0)))
        echo "==================== $line"
        SUMMARY+=("$line")
    fi
    CURRENT_STEP=""
}

skip() {
    local line
    line=$(printf '%-12s skipped: %s' "$CURRENT_STEP" "$1")
    echo "==================== $line"
    SUMMARY+=("$line")
    SKIPPED=1
}

run() {
    echo "+ $*"
    "$@"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ---------------------------------------------------------------- setup
setup() {
    command -v cargo >/dev/null || { echo "cargo/rustup not found: install rustup first" >&2; exit 1; }

    if [ "$HOST_ARCH" = x86_64 ]; then
        local missing=()
        command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
        [ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || missing+=(libc6-dev-arm64-cross)
        { command -v qemu-x86_64 >/dev/null && command -v qemu-aarch64 >/dev/null; } || missing+=(qemu-user)
        if [ ${#missing[@]} -gt 0 ]; then
            run as_root apt-get update -q
            run as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "${missing[@]}"
        else
            echo "apt packages present"
        fi

        local targets
        targets=$(rustup target list --installed)
        case $'\n'"$targets"$'\n' in
            *$'\n'"$ARM_TARGET"$'\n'*) echo "rust target $ARM_TARGET present" ;;
            *) run rustup target add "$ARM_TARGET" ;;
        esac
    fi

    local comps
    comps=$(rustup component list --installed)
    case $'\n'"$comps"$'\n' in *$'\n'clippy-*) ;; *) run rustup component add clippy ;; esac
    case $'\n'"$comps"$'\n' in *$'\n'rustfmt-*) ;; *) run rustup component add rustfmt ;; esac

    local toolchains
    toolchains=$(rustup toolchain list)
    case $'\n'"$toolchains" in
        *$'\n'nightly-*) echo "nightly toolchain present" ;;
        *) run rustup toolchain install nightly --profile minimal ;;
    esac

    if cargo fuzz --version >/dev/null 2>&1; then
        echo "cargo-fuzz present: $(cargo fuzz --version)"
    else
        run cargo install cargo-fuzz --locked
    fi

    run rustc --version
    run cargo +nightly --version
}

# ---------------------------------------------------------------- expectations
# Backends the host CPU must run, from the same features the crate's detection checks.
cpu_backends() {
    local list=scalar
    if [ "$HOST_ARCH" = x86_64 ]; then
        local flags
        flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
        has() { local f; for f in "$@"; do [[ $flags == *" $f "* ]] || return 1; done; }
        if has avx2 fma; then list+=,avx2; fi
        if has avx2 fma avx512f avx512bw avx512cd avx512dq avx512vl; then list+=,avx512; fi
    elif [ "$HOST_ARCH" = aarch64 ]; then
        list+=,neon # ASIMD is mandatory on aarch64
    fi
    echo "$list"
}

fastest() {
    case ",$1," in
        *,avx512,*) echo avx512 ;;
        *,avx2,*) echo avx2 ;;
        *,neon,*) echo neon ;;
        *) echo scalar ;;
    esac
}

# ---------------------------------------------------------------- steps
fmt_step() {
    run cargo fmt --all --check
    run cargo fmt --check --manifest-path fuzz/Cargo.toml # its own workspace
}

clippy_step() { run cargo clippy --all-targets -- -D warnings; }

clippy_arm_step() {
    [ "$HOST_ARCH" = x86_64 ] || { skip "host is not x86_64 (the host clippy covers it)"; return 0; }
    run cargo clippy --target "$ARM_TARGET" --lib --tests -- -D warnings
}

host_step() {
    local expect
    expect=$(cpu_backends)
    echo "host CPU backends: $expect (detect should pick $(fastest "$expect"))"
    FLASHCPU_EXPECT_BACKEND=$expect FLASHCPU_EXPECT_DETECT=$(fastest "$expect") \
        run cargo test --all-targets --no-fail-fast
    FLASHCPU_EXPECT_BACKEND=$expect FLASHCPU_EXPECT_DETECT=$(fastest "$expect") \
        run cargo test --doc --no-fail-fast
}

emu512_step() {
    local expect
    expect=$(cpu_backends)
    FLASHCPU_EXPECT_BACKEND=$expect FLASHCPU_EXPECT_DETECT=$(fastest "$expect") \
        run cargo test --release --features emulate-avx512 --tests --no-fail-fast
}

# qemu-x86_64 CPU model, the backends it has and the one detection must pick.
qemu_x86() {
    local cpu=$1 expect=$2 detect=$3
    [ "$HOST_ARCH" = x86_64 ] || { skip "host is not x86_64"; return 0; }
    # Changing the runner does not rebuild: the binaries of the host step are reused.
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="qemu-x86_64 -cpu $cpu" \
        FLASHCPU_EXPECT_BACKEND=$expect FLASHCPU_EXPECT_DETECT=$detect \
        PROPTEST_CASES=$QEMU_PROPTEST_CASES FLASHCPU_REUSE_CASES=4 \
        run cargo test --tests --no-fail-fast
}
qemu_avx2_step() { qemu_x86 max scalar,avx2 avx2; }
qemu_scalar_step() { qemu_x86 Nehalem scalar scalar; }

arm_step() {
    [ "$HOST_ARCH" = x86_64 ] || { skip "host is not x86_64 (the host step ran NEON)"; return 0; }
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
        FLASHCPU_EXPECT_BACKEND=scalar,neon FLASHCPU_EXPECT_DETECT=neon \
        PROPTEST_CASES=$QEMU_PROPTEST_CASES FLASHCPU_REUSE_CASES=4 \
        run cargo test --tests --no-fail-fast --target "$ARM_TARGET"
}

fuzz_step() {
    [ -f fuzz/Cargo.toml ] || { skip "no fuzz/"; return 0; }
    # The same flags for build and run, or the run rebuilds everything.
    run cargo +nightly fuzz build
    local targets target
    targets=$(cargo +nightly fuzz list)
    [ -n "$targets" ] || { echo "no fuzz targets" >&2; exit 1; }
    for target in $targets; do
        # The seed corpus is random and generated here, never committed.
        run bash fuzz/seed.sh "fuzz/corpus/$target"
        run cargo +nightly fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" </dev/null
    done
}

bench_step() {
    local benches
    benches=$(ls benches/*.rs 2>/dev/null || true)
    [ -n "$benches" ] || { skip "no benches/*.rs"; return 0; }
    run cargo bench --benches -- --quick --noplot
}

demo_step() {
    [ -f examples/demo.rs ] || { skip "no examples/demo.rs"; return 0; }
    run cargo run --release --example demo
}

# ---------------------------------------------------------------- main
step setup setup
step fmt fmt_step
step clippy clippy_step
step clippy-arm clippy_arm_step
step host host_step
step emu512 emu512_step
step qemu-avx2 qemu_avx2_step
step qemu-scalar qemu_scalar_step
step arm arm_step
step fuzz fuzz_step
step bench bench_step
step demo demo_step
