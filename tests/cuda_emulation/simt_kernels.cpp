// The CUDA-core kernels and their launchers (csrc/cuda/fused_conv2d_simt.cu) compiled as C++ for the
// CPU emulation of the CUDA execution model (csrc/cuda/cuda_emulation.h). Test only.
#define FUSEDTIE_CUDA_EMULATION
#include "../../csrc/cuda/fused_conv2d_simt.cu"
