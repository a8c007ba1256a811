"""Per-call times of small training-loop calls against PyTorch autograd (README table).

Run: ``python tools/training_step_timing.py`` (needs torch).  One thread for both
libraries; ``timeit`` best of 7 repeats of 200 calls; µs per call.
"""
import timeit

import numpy as np
import torch

import cnorm

CASES = [("layer_norm", (4, 16), False), ("layer_norm", (32, 64), False),
         ("layer_norm", (32, 64), True), ("layer_norm", (64, 768), True),
         ("batch_norm", (8, 16), True), ("batch_norm", (8, 16, 4, 4), True),
         ("batch_norm", (3, 5, 7, 9), True), ("batch_norm", (32, 64, 4, 4), True)]


def best(fn):
    fn()
    return min(timeit.repeat(fn, number=200, repeat=7)) / 200 * 1e6


def row(name, shape, affine, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    P = shape[-1] if name == "layer_norm" else shape[1]
    w = rng.standard_normal(P).astype(np.float32) if affine else None
    b = rng.standard_normal(P).astype(np.float32) if affine else None
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True) if affine else None
    tb = torch.tensor(b, requires_grad=True) if affine else None
    tdy = torch.tensor(dy)
    if name == "layer_norm":
        fwd = lambda: cnorm.layer_norm(x, weight=w, bias=b)
        fwd_s = lambda: cnorm.layer_norm(x, weight=w, bias=b, return_stats=True)
        bwd = lambda y, m, r: cnorm.layer_norm_backward(dy, x, m, r, w, b)
        tfn = lambda: torch.nn.functional.layer_norm(tx, (P,), tw, tb)
    else:
        fwd = lambda: cnorm.batch_norm(x, weight=w, bias=b)
        fwd_s = lambda: cnorm.batch_norm(x, weight=w, bias=b, return_stats=True)
        bwd = lambda y, m, r: cnorm.batch_norm_backward(dy, x, m, r, w, b)
        tfn = lambda: torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True)
    stats = fwd_s()

    def tstep():
        for t in (tx, tw, tb):
            if t is not None:
                t.grad = None
        tfn().backward(tdy)

    with torch.no_grad():
        t_fwd = best(tfn)
    c_s, c_b = best(fwd_s), best(lambda: bwd(*stats))
    return best(fwd), t_fwd, c_s, c_b, best(lambda: bwd(*fwd_s())), best(tstep)


def main():
    torch.set_num_threads(1)
    cnorm.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| call | cnorm forward | torch forward | cnorm forward (return_stats) + backward "
          "| cnorm step | torch forward + backward |")
    print("|---|---|---|---|---|---|")
    for name, shape, affine in CASES:
        f, tf, fs, fb, step, ts = row(name, shape, affine, rng)
        label = f"{name} {shape} float32" + (", affine" if affine else "")
        print(f"| {label} | {f:.1f} | {tf:.1f} | {fs:.1f} + {fb:.1f} | {step:.1f} | {ts:.1f} |")


if __name__ == "__main__":
    main()
