// Headers every .cu file starts with. Under FASTTANGENT_HOST_SIMULATION
// (tests/cuda_sim/) the kernels run on CPU threads to test their index logic, so the
// CUDA headers and the launchers' declarations are replaced by the simulation's shim.
#pragma once

#ifdef FASTTANGENT_HOST_SIMULATION
#include FASTTANGENT_HOST_SIMULATION
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "element_type.h"
#ifndef FASTTANGENT_HOST_SIMULATION
#include "launchers.h"
#endif
