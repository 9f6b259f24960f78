// The CPU harness: the kernels' own source (the .cu files) compiled as plain C++, where simt.h runs
// every block's threads phase by phase on the host (see simt.h and csrc/README.md). One translation
// unit, so the harness builds with one compiler call. tc_selftest.cu is the test-only kernel of the
// tensor-core primitives.
#include "norm.cu"
#include "rope.cu"
#include "swiglu.cu"
#include "tc_selftest.cu"
