"""fusedtie: tie a conv layer's weights to an elementwise function of another layer's weights.

``FusedTiedConv2d(conv_1, "square")`` is a layer whose weight is ``conv_1.weight ** 2`` as the very
same variable: it owns no parameters, and one operator (``torch.ops.fusedtie.tied_conv2d``) applies
the transform inside the convolution and the chain rule inside its backward.
"""

from . import user_transforms as user_transforms  # fusedtie.user_transforms.vectorized, without an import
from ._library import LIB as _LIB
from ._surgery import tie_
from ._version import __version__ as __version__
from .bake import bake
from .cache import cached
from .info import build_info, clear_cuda_autotune_cache, cpu_capability
from .nn import FusedTiedConv1d, FusedTiedConv2d, FusedTiedConv3d, FusedTiedConvTranspose2d, FusedTiedLinear
from .ops import (
    apply_transform,
    cpu_conv_algorithm_for,
    cpu_info,
    tied_conv1d,
    tied_conv2d,
    tied_conv3d,
    tied_conv_transpose2d,
    tied_linear,
    use_cpu_conv_algorithm,
    use_cuda_conv_algorithm,
)
from .transforms import Transform, available_transforms, transform_table

cuda_compiled: bool = bool(_LIB.cuda_compiled)
"""Whether the loaded extension has the CUDA kernels (a CUDA build of ``fusedtie._C``).

False for a CPU-only build. It does not say whether a GPU is present (``torch.cuda.is_available()``
does); ``build_info()`` gives the GPU architectures the build holds.

Examples:
    >>> fusedtie.cuda_compiled  # a CPU-only build
    False
"""

__all__ = [
    "FusedTiedConv1d",
    "FusedTiedConv2d",
    "FusedTiedConv3d",
    "FusedTiedConvTranspose2d",
    "FusedTiedLinear",
    "Transform",
    "apply_transform",
    "bake",
    "build_info",
    "cached",
    "clear_cuda_autotune_cache",
    "cpu_capability",
    "cpu_conv_algorithm_for",
    "cpu_info",
    "available_transforms",
    "cuda_compiled",
    "tied_conv1d",
    "tied_conv2d",
    "tied_conv3d",
    "tied_conv_transpose2d",
    "tie_",
    "tied_linear",
    "transform_table",
    "use_cpu_conv_algorithm",
    "use_cuda_conv_algorithm",
]
