"""Vector fields for neural ODEs and continuous normalizing flows."""

from ._concat_squash import ConcatSquashMLP as ConcatSquashMLP
from ._mlp_field import MLPField as MLPField
