"""Checks CUDA_ZQUAD's operand order (csrc/quant_decode.cu, Run::keys) by simulating mma.sync
m16n8k16 fragments in float64: the common score part c from quads of the key zero-points
as loaded (two dots, rows g and rows g + 8 kept) equals the shipped form's (quads
(kz, kz, kz', kz')), for int4/int2/int8 at head dim 128 and int4 at 64. CPU, any machine:

    python docs/kernels_runs/zquad_mma_sim.py
"""
import torch
torch.manual_seed(0)
def mma(a, b, c):
    # a: [32 lanes][4 regs][2], b: [32][2][2], c: [32][4] -> d [32][4]  (m16n8k16 row.col)
    A = torch.zeros(16, 16, dtype=torch.float64); B = torch.zeros(16, 8, dtype=torch.float64)
    for l in range(32):
        g, t = l >> 2, l & 3
        A[g, 2*t:2*t+2] = a[l][0]; A[g+8, 2*t:2*t+2] = a[l][1]; A[g, 2*t+8:2*t+10] = a[l][2]; A[g+8, 2*t+8:2*t+10] = a[l][3]
        B[2*t:2*t+2, g] = b[l][0]; B[2*t+8:2*t+10, g] = b[l][1]
    D = A @ B
    d = torch.zeros(32, 4, dtype=torch.float64)
    for l in range(32):
        g, t = l >> 2, l & 3
        d[l] = torch.stack([D[g, 2*t], D[g, 2*t+1], D[g+8, 2*t], D[g+8, 2*t+1]])
    return d + c
for NP, RB in ((2, 16), (4, 8), (2, 8), (1, 32)):
    NR = RB // 4 * NP * 2
    kz = torch.randn(4, NR, 2, dtype=torch.float64)          # per t: lane's zero-point pairs
    qn = torch.randn(8, 4, NR, 2, dtype=torch.float64)       # per (g, t): natural-order q pairs
    lanes = [(l >> 2, l & 3) for l in range(32)]
    # old
    c = torch.zeros(32, 4, dtype=torch.float64)
    for kt in range(NR // 2):
        a = [[kz[t][2*kt], kz[t][2*kt], kz[t][2*kt+1], kz[t][2*kt+1]] for g, t in lanes]
        b = [[qn[g][t][2*kt], qn[g][t][2*kt+1]] for g, t in lanes]
        c = mma(a, b, c)
    # ZQ
    if (RB // 4) % 2: print(NP, RB, "ZQ n/a"); continue
    qs = torch.zeros(8, 4, NR, 2, dtype=torch.float64)
    for i in range(NR):
        w, p, sp = i // (2 * NP), (i // 2) % NP, i % 2
        qs[:, :, 4 * (p * (RB // 8) + w // 2) + 2 * sp + (w & 1)] = qn[:, :, i]
    c1 = torch.zeros(32, 4, dtype=torch.float64); c2 = torch.zeros(32, 4, dtype=torch.float64)
    for p in range(NP):
        for w in range(0, RB // 4, 2):
            k0, k1, jb = w * NP + p, (w + 1) * NP + p, 4 * (p * (RB // 8) + w // 2)
            a = [[kz[t][2*k0], kz[t][2*k0+1], kz[t][2*k1], kz[t][2*k1+1]] for g, t in lanes]
            c1 = mma(a, [[qs[g][t][jb], qs[g][t][jb+1]] for g, t in lanes], c1)
            c2 = mma(a, [[qs[g][t][jb+2], qs[g][t][jb+3]] for g, t in lanes], c2)
    cz = torch.stack([c1[:, 0] + c2[:, 2], c1[:, 1] + c2[:, 3]], 1)
    print(NP, RB, "max diff rows g:", (cz - c[:, :2]).abs().max().item(), "rows g+8 same as g:", (c[:, 2:] - c[:, :2]).abs().max().item())
