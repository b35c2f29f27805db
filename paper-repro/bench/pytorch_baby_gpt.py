"""Tokens/s of one training step of nanoGPT's baby GPT (6 layers, 6 heads, 384 wide, block 256,
char vocabulary 65, no bias, dropout 0) in PyTorch on the CPU, for comparison with
`just bench-train`. The model follows nanoGPT's architecture (pre-LayerNorm blocks, causal
self-attention with the fused scaled-dot-product kernel, GELU MLP, tied lm_head); the step is
forward + backward + AdamW, as nanoGPT's train.py with gradient accumulation 1.

Usage: python3 pytorch_baby_gpt.py [batch] [steps]   (needs torch; not a project dependency)
"""
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c, bias=False)
        self.c_attn = nn.Linear(c, 3 * c, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)
        self.ln_2 = nn.LayerNorm(c, bias=False)
        self.fc = nn.Linear(c, 4 * c, bias=False)
        self.proj = nn.Linear(4 * c, c, bias=False)
        self.nh = nh

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class Gpt(nn.Module):
    def __init__(self, vocab=65, block=256, layers=6, heads=6, width=384):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    torch.manual_seed(0)
    model = Gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    x = torch.randint(0, 65, (batch, 256))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    best = sorted(times[1:])[len(times[1:]) // 2]
    # The forward matrix products of one layer at batch 8 x 256, as `paper-repro bench` times them.
    shapes = [(2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384)]
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    rates = []
    for _ in range(21):
        t0 = time.perf_counter()
        for a, b in pairs:
            a @ b
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    print(f"matmul GFLOP/s (baby-gpt layer shapes): {sorted(rates[1:])[10]:.0f}")
    print(f"pytorch {torch.__version__} threads={torch.get_num_threads()} batch={batch}: "
          f"baby-gpt tokens/s (adamw): {batch * 256 / best:.0f}")


if __name__ == "__main__":
    main()
