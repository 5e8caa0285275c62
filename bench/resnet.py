"""A ResNet-18-style image classifier in torch layers, for the benchmark's whole training step (what
fusedops.convert_batchnorm converts): a conv stem, 4 stages of 2 basic blocks, average pool, linear."""

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 10


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + identity): identity is x, or a strided 1x1 conv and a batch
    norm of it where the block changes the resolution or the channels."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """ResNet-18's layout: stem (7x7 conv stride 2, batch norm, relu, 3x3 max pool stride 2: a quarter of
    the image's side), then stages of width, 2, 4 and 8 x width channels, 2 basic blocks each (the first
    block of stages 2-4 halves the resolution), global average pool, linear. width=64 is ResNet-18's."""

    def __init__(self, width=64, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, in_channels = [], width
        for stage in range(4):
            channels = width * 2**stage
            blocks += [BasicBlock(in_channels, channels, 1 if stage == 0 else 2), BasicBlock(channels, channels, 1)]
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = F.adaptive_avg_pool2d(self.blocks(x), 1)
        return self.fc(torch.flatten(x, 1))
