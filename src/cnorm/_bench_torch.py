"""PyTorch peers of the speed table (see :mod:`cnorm._bench_cases`).

``torch.nn.functional`` for the forward layers, ``torch.var_mean`` for
moments and the aten backward kernels (autograd for RMSNorm, which has no
fused CPU backward) for the backward passes; ``torch.set_num_threads`` is set
to the case's thread count and every call allocates its output.
"""
from __future__ import annotations

from ._bench_cases import EPS, GROUPS, Unavailable


def torch_runner(op, d, threads: int, warm_up):
    """The torch implementation of ``op`` on the arrays ``d``, warmed up by ``warm_up``."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise Unavailable("torch is not installed") from None
    torch.set_num_threads(threads)
    x = d["x"]
    xt = torch.from_numpy(x)
    if op.kind == "nhwc":
        xt = xt.permute(0, 3, 1, 2)          # NCHW view, channels_last memory
    wt = torch.from_numpy(d["weight"])
    bt = torch.from_numpy(d["bias"])
    name = op.name
    if name == "moments":
        dims = {"rows": -1, "cols": 0, "nchw": (0, 2, 3)}[op.kind]
        fn = lambda: torch.var_mean(xt, dim=dims, correction=0)  # noqa: E731
    elif name == "layer_norm":
        fn = lambda: F.layer_norm(xt, (x.shape[-1],), wt, bt, EPS)  # noqa: E731
    elif name == "rms_norm":
        fn = lambda: F.rms_norm(xt, (x.shape[-1],), wt)  # noqa: E731
    elif name == "batch_norm":
        fn = lambda: F.batch_norm(xt, None, None, wt, bt, True, 0.1, EPS)  # noqa: E731
    elif name == "group_norm":
        fn = lambda: F.group_norm(xt, GROUPS, wt, bt, EPS)  # noqa: E731
    elif name == "instance_norm":
        fn = lambda: F.instance_norm(xt, None, None, wt, bt, True, 0.1, EPS)  # noqa: E731
    else:
        fn = _torch_backward(op, d, xt, wt, bt, torch)
    def run():
        with torch.inference_mode():
            return fn()
    try:
        warm_up(run)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise Unavailable(f"torch: {str(e).splitlines()[0][:80]}") from None
    return run


def _torch_backward(op, d, xt, wt, bt, torch):
    aten = torch.ops.aten
    dyt = torch.from_numpy(d["dy"])
    x = d["x"]
    name = op.name
    if name == "layer_norm_backward":
        ns = [x.shape[-1]]
        _, mean, rstd = aten.native_layer_norm(xt, ns, wt, bt, EPS)
        return lambda: aten.native_layer_norm_backward(dyt, xt, ns, mean, rstd, wt, bt,
                                                       [True, True, True])
    if name == "rms_norm_backward":
        # no fused CPU kernel: time the autograd backward of F.rms_norm's graph
        xr = xt.detach().clone().requires_grad_()
        wr = wt.detach().clone().requires_grad_()
        with torch.inference_mode(False), torch.enable_grad():
            y = torch.nn.functional.rms_norm(xr, (x.shape[-1],), wr)

        def run():
            with torch.inference_mode(False), torch.enable_grad():
                return torch.autograd.grad(y, (xr, wr), dyt, retain_graph=True)
        return run
    if name == "batch_norm_backward":
        _, mean, rstd = aten.native_batch_norm(xt, wt, bt, None, None, True, 0.1, EPS)[:3]
        return lambda: aten.native_batch_norm_backward(dyt, xt, wt, None, None, mean, rstd,
                                                       True, EPS, [True, True, True])
    n, c, h, w = x.shape
    if name == "group_norm_backward":
        _, mean, rstd = aten.native_group_norm(xt, wt, bt, n, c, h * w, GROUPS, EPS)
        return lambda: aten.native_group_norm_backward(dyt, xt, mean, rstd, wt, n, c, h * w,
                                                       GROUPS, [True, True, True])
    if name == "instance_norm_backward":
        # torch runs instance norm as batch norm on a (1, N*C, H, W) view
        x2, dy2 = xt.reshape(1, n * c, h, w), dyt.reshape(1, n * c, h, w)
        w2 = wt.repeat(n)
        _, mean, rstd = aten.native_batch_norm(x2, w2, None, None, None, True, 0.1, EPS)[:3]

        def run():
            dx, dw2, db2 = aten.native_batch_norm_backward(dy2, x2, w2, None, None, mean, rstd,
                                                           True, EPS, [True, True, True])
            return dx, dw2.reshape(n, c).sum(0), db2.reshape(n, c).sum(0)
        return run
    raise ValueError(name)
