// The CPU harness, second translation unit: the tensor-core kernels (attention*.cu, deberta*.cu, lora.cu) compiled as
// plain C++ on the SIMT layer of simt.h. Apart from cpu_harness.cpp so the two compile in parallel (ninja)
// and a change to one group rebuilds half the harness's object code.
#include "attention.cu"
#include "attention_backward.cu"
#include "deberta.cu"
#include "deberta_backward.cu"
#include "lora.cu"
