"""The PyTorch eager LDAM-DRW training step that har_jax's step is timed against.

An independent transcription of LDAM-DRW (Cao et al., 2019, github.com/kaidic/
LDAM-DRW): its CIFAR ResNet-32 (option-A shortcuts, kaiming-normal init, the
cosine ``NormedLinear`` classifier), ``LDAMLoss`` (s = 30, max margin 0.5) with
the DRW class-balanced weights, SGD with momentum 0.9 and weight decay 2e-4,
float32. The step also does what har_jax's step does inside itself and the
reference does in its data loader: pad-4 random crop, random flip, normalise.

Needs ``pip install torch==2.13.0`` (har_jax's ``torch`` extra).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def _kaiming_init(module: nn.Module) -> None:
  if isinstance(module, (nn.Linear, nn.Conv2d)):
    nn.init.kaiming_normal_(module.weight)


class OptionAShortcut(nn.Module):
  """Subsample by 2 and zero-pad the new channels (no parameters)."""

  def __init__(self, planes: int):
    super().__init__()
    self.pad = planes // 4

  def forward(self, x):
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = (OptionAShortcut(planes) if stride != 1 or in_planes != planes
                     else nn.Identity())

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class NormedLinear(nn.Module):
  """Cosine classifier: ``normalize(x, 1) @ normalize(W, 0)``."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(in_features, out_features))
    self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

  def forward(self, x):
    return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class CifarResNet32(nn.Module):
  """LDAM-DRW's ``resnet32(num_classes, use_norm=True)``."""

  def __init__(self, num_classes: int, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    blocks, in_planes = [], 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
      for index in range(5):
        blocks.append(BasicBlock(in_planes, planes, stride if index == 0 else 1))
        in_planes = planes
    self.blocks = nn.Sequential(*blocks)
    self.linear = NormedLinear(64, num_classes)
    self.apply(_kaiming_init)

  def forward(self, x):
    out = self.blocks(F.relu(self.bn1(self.conv1(x))))
    return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class LDAMLoss(nn.Module):
  """LDAM-DRW's loss: ``CE(s * (z - m_y onehot(y)), y, weight)``."""

  def __init__(self, class_counts: Sequence[int], max_margin: float = 0.5,
               scale: float = 30.0, weight: torch.Tensor | None = None):
    super().__init__()
    margins = 1.0 / np.sqrt(np.sqrt(np.asarray(class_counts, np.float64)))
    self.margins = torch.tensor(margins * (max_margin / margins.max()),
                                dtype=torch.float32)
    self.scale = scale
    self.weight = weight

  def forward(self, logits, labels):
    onehot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    shifted = logits - self.margins[labels][:, None] * onehot
    return F.cross_entropy(self.scale * shifted, labels, weight=self.weight)


def drw_weights(class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
  """Class-balanced weights ``(1 - beta) / (1 - beta^n)``, summing to C."""
  counts = np.asarray(class_counts, np.float64)
  weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
  weights = weights / weights.sum() * len(counts)
  return torch.tensor(weights, dtype=torch.float32)


def augment(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
  """Per-example pad-and-crop and horizontal flip of float ``[B, C, H, W]`` images."""
  batch, _, height, width = images.shape
  padded = F.pad(images, (pad, pad, pad, pad))
  offsets = torch.randint(0, 2 * pad + 1, (batch, 2))
  rows = offsets[:, 0, None] + torch.arange(height)  # [B, H]
  cols = offsets[:, 1, None] + torch.arange(width)   # [B, W]
  flip = torch.rand(batch) < 0.5
  cols = torch.where(flip[:, None], cols.flip(1), cols)
  index = torch.arange(batch)[:, None, None]
  cropped = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
  return cropped.permute(0, 3, 1, 2)


class TrainStep:
  """One LDAM-DRW SGD step on a fixed uint8 batch: ``step()`` runs it."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, class_counts: Sequence[int],
               *, learning_rate: float = 0.1, momentum: float = 0.9,
               weight_decay: float = 2e-4, seed: int = 0,
               channels_last: bool = False):
    """``images`` uint8 ``[B, H, W, C]`` (har_jax's layout), ``labels`` int ``[B]``."""
    torch.manual_seed(seed)
    num_classes = len(class_counts)
    self.memory_format = (torch.channels_last if channels_last
                          else torch.contiguous_format)
    self.model = CifarResNet32(num_classes, images.shape[-1]).to(
        memory_format=self.memory_format)
    self.model.train()
    self.loss = LDAMLoss(class_counts, weight=drw_weights(class_counts))
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=learning_rate,
                                     momentum=momentum, weight_decay=weight_decay)
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(labels.astype(np.int64))
    channels = images.shape[-1]
    self.mean = torch.full((1, channels, 1, 1), 0.5)
    self.std = torch.full((1, channels, 1, 1), 0.25)

  def step(self) -> float:
    images = augment(self.images.float()) / 255.0
    images = ((images - self.mean) / self.std).contiguous(
        memory_format=self.memory_format)
    loss = self.loss(self.model(images), self.labels)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss.item()
