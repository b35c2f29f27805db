"""Images/s of one training step of the vision models of `just bench-train` in PyTorch on the CPU:
the CNN (conv 3x3 32 - ReLU - maxpool 2 -> conv 3x3 64 - ReLU - maxpool 2 -> linear 128 - ReLU ->
linear 10) and the ResNet-8 (3x3 stem of 16, one basic block per stage of widths 16/32/64 with
batch norm, 1x1 projection shortcuts, global average pooling), on 28x28 single-channel images as
Fashion-MNIST, forward + backward + Adam, batch 128.

Usage: python3 pytorch_vision.py cnn|resnet [batch] [steps]   (needs torch; not a project
dependency)
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Cnn(nn.Module):
    def __init__(self, c1=32, c2=64, hidden=128, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, inp, out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = None
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, inp = [], widths[0]
        for s, w in enumerate(widths):
            blocks.append(BasicBlock(inp, w, 1 if s == 0 else 2))
            inp = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inp, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def main():
    which = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    torch.manual_seed(0)
    model = Cnn() if which == "cnn" else ResNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    rest = sorted(times[1:])
    print(f"pytorch {torch.__version__} threads={torch.get_num_threads()} batch={batch}: "
          f"{which} images/s (adam): {batch / rest[len(rest) // 2]:.0f}")


if __name__ == "__main__":
    main()
