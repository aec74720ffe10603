"""fusedtie: tie a conv layer's weights to an elementwise function of another layer's weights.

``FusedTiedConv2d(conv_1, "square")`` is a layer whose weight is ``conv_1.weight ** 2`` as the very
same variable: it owns no parameters, and one operator (``torch.ops.fusedtie.tied_conv2d``) applies
the transform inside the convolution and the chain rule inside its backward.
"""

from ._library import LIB as _LIB
from .bake import bake
from .cache import cached
from .nn import FusedTiedConv2d, FusedTiedConvTranspose2d
from .ops import (
    apply_transform,
    cpu_conv_algorithm_for,
    cpu_info,
    tied_conv2d,
    tied_conv_transpose2d,
    use_cpu_conv_algorithm,
    use_cuda_conv_algorithm,
)
from .transforms import Transform, available_transforms, transform_table

__version__ = "0.1.0"
cuda_compiled: bool = bool(_LIB.cuda_compiled)

__all__ = [
    "FusedTiedConv2d",
    "FusedTiedConvTranspose2d",
    "Transform",
    "apply_transform",
    "bake",
    "cached",
    "cpu_conv_algorithm_for",
    "cpu_info",
    "available_transforms",
    "cuda_compiled",
    "tied_conv2d",
    "tied_conv_transpose2d",
    "transform_table",
    "use_cpu_conv_algorithm",
    "use_cuda_conv_algorithm",
]
