#!/usr/bin/env bash
# Builds the HasteConv library with AddressSanitizer and UndefinedBehaviorSanitizer and runs the
# operator's tests against it (tests/test_custom_op.py: hundreds of random shapes, the exact
# cases, concurrent runs, every invalid input), once built with every kernel (the tests run the
# one this CPU picks, and the narrower ones in processes of their own) and once with the portable
# one alone. Any finding aborts the run with a report.
# Needs the package installed (the tests use its numpy reference) and pytest on PATH.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT

# Python itself is not instrumented, so the ASan runtime must be loaded first, and libstdc++
# with it so that ASan can intercept C++ throws. Leak detection is off: the interpreter
# deliberately leaves memory to the OS at exit.
cxx=${CXX:-c++}
preload="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libstdc++.so)"

# Each build is one translation unit that takes minutes to compile instrumented: the two are
# built side by side, one core each, at -O1 (the sanitizers' own advice: fast enough to run, and
# about two thirds of the compile time of -O2).
pids=()
for portable in OFF ON; do
  cmake -S "$repo/custom_ops" -B "$build/$portable" -DHASTE_SANITIZE=ON \
    -DHASTE_PORTABLE=$portable -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g -DNDEBUG" >/dev/null
  cmake --build "$build/$portable" >/dev/null &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

for portable in OFF ON; do
  echo "== sanitizer run, HASTE_PORTABLE=$portable"
  # --capture=sys: a sanitizer report goes to file descriptor 2 and must not be swallowed.
  (cd "$repo" &&
    LD_PRELOAD=$preload ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
      UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      HASTE_ONNX_TEST_LIBRARY="$build/$portable/libhaste_onnx_ops.so" \
      HASTE_ONNX_TEST_PORTABLE_BUILD=$([ "$portable" = ON ] && echo 1) \
      pytest -p no:cacheprovider -q --capture=sys tests/test_custom_op.py)
done
