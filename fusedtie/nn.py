"""Layers tied to a source layer: FusedTiedConv2d, FusedTiedConv1d and FusedTiedConv3d (weight
f(source.weight), owning no parameters; sources nn.Conv2d, nn.Conv1d and nn.Conv3d),
FusedTiedConvTranspose2d (the decoder of a tied autoencoder: conv_transpose2d with f(source.weight)
of an nn.Conv2d, owning only its bias) and FusedTiedLinear (an nn.Linear source; with
transpose=True the tied decoder, owning only its bias).

Each layer is defined in a module of its own (fusedtie/_conv2d_layer.py, fusedtie/_conv1d_layer.py,
fusedtie/_conv3d_layer.py, fusedtie/_conv_transpose2d_layer.py, fusedtie/_linear_layer.py) on the
tie they share (fusedtie/_tied_layer.py); this module is their public name, the ``__module__`` they
carry, so that pickles of whole models name ``fusedtie.nn.FusedTiedConv2d`` as they always have.
"""

from ._conv1d_layer import FusedTiedConv1d as FusedTiedConv1d
from ._conv2d_layer import FusedTiedConv2d as FusedTiedConv2d
from ._conv3d_layer import FusedTiedConv3d as FusedTiedConv3d
from ._conv_transpose2d_layer import FusedTiedConvTranspose2d as FusedTiedConvTranspose2d
from ._linear_layer import FusedTiedLinear as FusedTiedLinear
from ._tied_layer import _TiedLayer as _TiedLayer

__all__ = ["FusedTiedConv1d", "FusedTiedConv2d", "FusedTiedConv3d", "FusedTiedConvTranspose2d", "FusedTiedLinear"]
