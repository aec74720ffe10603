// The fused kernels' host code (csrc/cuda/fused_conv2d.cu) compiled as C++ for the CPU emulation of
// the CUDA execution model (csrc/cuda/cuda_emulation.h). Test only.
#define FUSEDTIE_CUDA_EMULATION
#include "../../csrc/cuda/fused_conv2d.cu"
