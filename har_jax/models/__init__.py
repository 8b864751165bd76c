"""Multi-exit ResNets in Flax Linen, their heads, exit strings and per-exit FLOPs.

    model = models.resnet32(num_classes=10, exits="CBEBEBE", head="normed")
    variables = model.init(key, images, train=False)
    logits = model.apply(variables, images, train=False)  # [E, B, C] float32
"""

from har_jax.models.exits import parse_exits
from har_jax.models.flops import ExitFlops
from har_jax.models.flops import exit_flops
from har_jax.models.heads import HEADS
from har_jax.models.heads import ExitHead
from har_jax.models.heads import LogitAffine
from har_jax.models.heads import NormedLinear
from har_jax.models.resnet import MODEL_NAMES
from har_jax.models.resnet import BasicBlock
from har_jax.models.resnet import BottleneckBlock
from har_jax.models.resnet import ResNet
from har_jax.models.resnet import Stem
from har_jax.models.resnet import get_model
from har_jax.models.resnet import resnet8
from har_jax.models.resnet import resnet20
from har_jax.models.resnet import resnet32
from har_jax.models.resnet import resnet50
from har_jax.models.resnet import resnet50_mini
from har_jax.models.resnet import resnext50_32x4d
