"""The `g2face` command. Thin: parses arguments and calls the package."""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "fixtures", "official", "official-seed0")


def _parity(args) -> int:
  from g2face_jax import parity
  folder = args.fixtures
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: fixture folder not found")
  names = args.only.split(",") if args.only else None
  unknown = sorted(set(names or ()) - set(parity.CHECKS))
  if unknown:
    raise ValueError(f"unknown check(s) {unknown}; known: {sorted(parity.CHECKS)}")
  print(f"official parity on {folder} (tolerance {parity.TOLERANCE:.0e})")
  results = parity.run(folder, names)
  worst = max(err for r in results.values() for err in r.values())
  print(f"worst relative error {worst:.2e}: {'PASS' if worst <= parity.TOLERANCE else 'FAIL'}")
  return 0 if worst <= parity.TOLERANCE else 1


def _convert(args) -> int:
  from g2face_jax import config as config_lib
  from g2face_jax.convert import build
  files = dict(g2face=args.g2face, arcface=args.arcface, d3dfr=args.d3dfr, bfm=args.bfm,
               lpips_vgg16=args.lpips_vgg16, lpips_heads=args.lpips_heads, stylegan=args.stylegan)
  if not any(files.values()):
    raise ValueError("give at least one file to convert (--g2face, --arcface, --d3dfr, --bfm, "
                     "--lpips-vgg16/--lpips-heads, --stylegan)")
  build.build_bundle(args.out, config_lib.load(args.config), **files,
                     stylegan_discriminator=args.stylegan_discriminator)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="g2face", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("parity", help="convert the official fixtures' recipe weights and print "
                     "the relative error of every network against the official outputs")
  p.add_argument("--fixtures", default=os.environ.get("G2FACE_PARITY_FIXTURES", DEFAULT_FIXTURES),
                 help="fixture folder (official-seedN layout); default: the bundled seed 0")
  p.add_argument("--only", help="comma-separated checks to run (default: all)")
  p.set_defaults(run=_parity)

  p = sub.add_parser("convert", help="convert official PyTorch checkpoints into one model bundle "
                     "(any subset of the files; read with torch.load(weights_only=True))")
  p.add_argument("--g2face", help="G2Face.pth: decoder, style mapper, map_2_id, extractor, discriminator")
  p.add_argument("--arcface", help="ms1mv3_arcface_r50.pth (insightface iresnet; iresnet100 with "
                 "--config paper,model.arcface_layers=...)")
  p.add_argument("--d3dfr", help="Deep3DFaceRecon epoch_20.pth (ResNet-50 coefficient regressor)")
  p.add_argument("--bfm", help="BFM_model_front.mat (Basel Face Model, Deep3DFaceRecon front crop)")
  p.add_argument("--lpips-vgg16", help="torchvision vgg16 state dict (LPIPS trunk)")
  p.add_argument("--lpips-heads", help="lpips weights/v0.1/vgg.pth (LPIPS linear heads)")
  p.add_argument("--stylegan", help="rosinality StyleGAN2 550000.pt: pretrained decoder layers "
                 "for a training start (not with --g2face)")
  p.add_argument("--stylegan-discriminator", action="store_true",
                 help="also load the StyleGAN2 discriminator `d` (the official recipe does not)")
  p.add_argument("--config", default="paper", help="model config (default: paper, the official 256)")
  p.add_argument("--out", required=True, help="bundle folder to write (new or empty)")
  p.set_defaults(run=_convert)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except (OSError, ValueError, KeyError, ImportError) as e:
    print(f"g2face {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
