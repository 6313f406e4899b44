"""Time single convolutions in the lowering forms of `g2face_jax.nn.lowering`.

    python benchmarks/conv_forms.py --kernel 3 --size 128 --channels 256,256 \
        --forms winograd_f2_3,winograd_f4_3,lax [--stride 1] [--padding 1] [--batch 1]
        [--rounds 15] [--norm-act]
    python benchmarks/conv_forms.py --kernel-energy 3,3,512,512

Each form is jitted alone, called once to compile, then `--rounds` times; the
best time is printed in ms and GFLOP/s (of the direct convolution's
multiply-adds, 2 B H' W' k^2 Cin Cout) with the form's relative difference from
`lax.conv_general_dilated` (max|form - lax| / max|lax|). The weights are an
argument of the jitted function, so kernel transforms are paid on every call,
as inside the model's programs. `--norm-act` adds instance norm and a leaky
ReLU after the convolution (the pyramid encoder's block). `--kernel-energy`
times `ops.kernel_energy` against `jnp.sum(w ** 2, axis=(0, 1))` instead.
docs/cpu_convolutions.md lists the shapes behind the CPU rules.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

FORMS = ("lax", "winograd_f2_3", "winograd_f4_3", "winograd_stride2", "stride2_taps",
         "conv1x1", "matmul_bf16", "tap_matmul_bf16", "winograd_f2_3_bf16",
         "winograd_stride2_bf16")


def _ints(text: str, count: int | None = None) -> list[int]:
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1 or (count and len(values) != count):
    n = f"{count} " if count else ""
    raise argparse.ArgumentTypeError(f"'{text}': expected {n}comma-separated positive integers")
  return values


def _forms(text: str) -> list[str]:
  forms = [f for f in text.split(",") if f]
  unknown = [f for f in forms if f not in FORMS]
  if not forms or unknown:
    raise argparse.ArgumentTypeError(f"'{text}': forms are {', '.join(FORMS)}")
  return forms


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="conv_forms.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--kernel", type=int, default=3, help="square kernel size (default 3)")
  p.add_argument("--stride", type=int, default=1, choices=(1, 2))
  p.add_argument("--padding", type=int, help="padding on every side (default: kernel // 2 "
                 "for stride 1, 1 for stride 2)")
  p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
  p.add_argument("--channels", type=lambda t: _ints(t, 2), default=[256, 256],
                 metavar="CIN,COUT")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--forms", type=_forms, default=["lax", "winograd_f2_3"],
                 help=f"comma-separated, from: {', '.join(FORMS)}")
  p.add_argument("--rounds", type=int, default=15, help="timed calls after the compiling one")
  p.add_argument("--norm-act", action="store_true",
                 help="instance norm and leaky ReLU after the convolution")
  p.add_argument("--kernel-energy", type=lambda t: _ints(t, 4), metavar="KH,KW,CIN,COUT",
                 help="time ops.kernel_energy on a kernel of this shape instead")
  args = p.parse_args(argv)
  if args.padding is None:
    args.padding = args.kernel // 2 if args.stride == 1 else 1
  return args


def form_function(name: str, stride: int, padding: int) -> Callable:
  """The form `name` as f(x, w) on NHWC x and HWIO w."""
  import jax
  import jax.numpy as jnp
  from g2face_jax.nn import lowering

  pads = ((padding, padding), (padding, padding))
  bf16 = jnp.bfloat16
  forms = {
      "lax": lambda x, w: jax.lax.conv_general_dilated(
          x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")),
      "winograd_f2_3": lambda x, w: lowering.conv3x3_winograd(x, w, None, lowering.WINOGRAD_F2_3),
      "winograd_f4_3": lambda x, w: lowering.conv3x3_winograd(x, w, None, lowering.WINOGRAD_F4_3),
      "winograd_f2_3_bf16": lambda x, w: lowering.conv3x3_winograd(
          x, w, None, lowering.WINOGRAD_F2_3, bf16),
      "winograd_stride2": lambda x, w: lowering.conv4x4_stride2_winograd(x, w, pads),
      "winograd_stride2_bf16": lambda x, w: lowering.conv4x4_stride2_winograd(x, w, pads,
                                                                               None, bf16),
      "stride2_taps": lambda x, w: lowering.conv2d_stride2_taps(x, w, pads),
      "conv1x1": lambda x, w: lowering.conv1x1(x, w, stride),
      "matmul_bf16": lambda x, w: lowering.conv2d_matmul(x, w, stride, pads, bf16),
      "tap_matmul_bf16": lambda x, w: lowering.conv2d_tap_matmul(x, w, stride, pads, bf16),
  }
  return forms[name]


def best_ms(fn: Callable, args: tuple, rounds: int) -> tuple[float, object]:
  import jax
  out = jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3, out


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from g2face_jax.nn import ops
  from g2face_jax.tools import bench

  rng = np.random.default_rng(0)
  if args.kernel_energy:
    w = jnp.asarray(rng.standard_normal(args.kernel_energy).astype(np.float32))
    unrolled, _ = best_ms(jax.jit(ops.kernel_energy), (w,), args.rounds)
    reduced, _ = best_ms(jax.jit(lambda w: jnp.sum(jnp.square(w), axis=(0, 1))), (w,),
                         args.rounds)
    print(f"kernel {tuple(args.kernel_energy)}: ops.kernel_energy {unrolled:.2f} ms, "
          f"jnp.sum over (0, 1) {reduced:.2f} ms; {bench.device_name()}")
    return 0
  cin, cout = args.channels
  x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, cin)).astype(np.float32))
  w = jnp.asarray((rng.standard_normal((args.kernel, args.kernel, cin, cout))
                   / np.sqrt(cin * args.kernel ** 2)).astype(np.float32))
  print(f"{args.kernel}x{args.kernel} stride {args.stride} padding {args.padding}, "
        f"{cin}->{cout} at {args.batch}x{args.size}x{args.size}, best of {args.rounds}; "
        f"{bench.device_name()}")
  out_side = (args.size + 2 * args.padding - args.kernel) // args.stride + 1
  gflop = 2 * args.batch * out_side ** 2 * args.kernel ** 2 * cin * cout / 1e9
  reference = None
  for name in ["lax"] + [f for f in args.forms if f != "lax"]:
    conv = form_function(name, args.stride, args.padding)
    if args.norm_act:
      fn = jax.jit(lambda x, w, conv=conv: jax.nn.leaky_relu(ops.instance_norm(conv(x, w)), 0.2))
    else:
      fn = jax.jit(conv)
    try:
      ms, out = best_ms(fn, (x, w), args.rounds)
    except ValueError as e:
      print(f"  {name:22s} not for this shape: {e}")
      continue
    out = np.asarray(out, np.float64)
    if reference is None:
      reference = out
    diff = float(np.max(np.abs(out - reference)) / max(np.max(np.abs(reference)), 1e-30))
    if name == "lax" and "lax" not in args.forms:
      print(f"  {'lax (reference)':22s} {ms:9.2f} ms {gflop / ms * 1e3:7.1f} GFLOP/s")
    else:
      print(f"  {name:22s} {ms:9.2f} ms {gflop / ms * 1e3:7.1f} GFLOP/s"
            f"   diff from lax {diff:.1e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
