// The tensor-core kernels and their launcher (csrc/cuda/fused_conv2d_mma.cu) compiled as C++ for the
// CPU emulation of the CUDA execution model, mma.sync and cp.async included
// (csrc/cuda/cuda_emulation.h). Test only.
#define FUSEDTIE_CUDA_EMULATION
#include "../../csrc/cuda/fused_conv2d_mma.cu"
