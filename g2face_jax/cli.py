"""The `g2face` command. Thin: parses arguments and calls the package."""
from __future__ import annotations

import argparse
import os
import sys

from g2face_jax import platforms

DEFAULT_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "fixtures", "official", "official-seed0")


def _parity(args) -> int:
  from g2face_jax.tools import parity, train_parity
  folder = args.fixtures
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: fixture folder not found")
  # the training iteration runs only when named: minutes and about 15 GB on a CPU
  checks = {**parity.CHECKS, "train_step": train_parity.check}
  names = args.only.split(",") if args.only else None
  unknown = sorted(set(names or ()) - set(checks))
  if unknown:
    raise ValueError(f"unknown check(s) {unknown}; known: {sorted(checks)}")
  print(f"official parity on {folder} (relative error; tolerance {parity.TOLERANCE:.0e} "
        "unless stated)")
  results = parity.run(folder, names, checks=checks, on_request=("train_step",))
  failed = parity.failures(results)
  total = sum(len(r) for r in results.values())
  print(f"{total - len(failed)} of {total} within tolerance: {'FAIL' if failed else 'PASS'}")
  return 1 if failed else 0


def _convert(args) -> int:
  from g2face_jax import config as config_lib
  from g2face_jax.convert import build
  files = dict(g2face=args.g2face, arcface=args.arcface, d3dfr=args.d3dfr, bfm=args.bfm,
               lpips_vgg16=args.lpips_vgg16, lpips_heads=args.lpips_heads, stylegan=args.stylegan,
               inception=args.inception)
  if not any(files.values()):
    raise ValueError("give at least one file to convert (--g2face, --arcface, --d3dfr, --bfm, "
                     "--lpips-vgg16/--lpips-heads, --stylegan, --inception)")
  build.build_bundle(args.out, config_lib.load(args.config), **files,
                     stylegan_discriminator=args.stylegan_discriminator)
  return 0


def _keygen(args) -> int:
  from g2face_jax.privacy import keys
  passphrase = keys.ask_new_passphrase() if args.passphrase else None
  keys.write_key_file(args.out, passphrase=passphrase)
  kind = "passphrase (scrypt)" if passphrase else "random 256-bit"
  print(f"wrote a {kind} key file {args.out} (mode 0600); keep it secret, it cannot be recreated"
        + ("" if passphrase else " from anything else"))
  return 0


def _layout(args) -> str:
  """--layout, else the bundle's calibrated layout (`g2face calibrate`), else 'float'."""
  from g2face_jax import bundle, calibration
  if getattr(args, "layout", None):
    return args.layout
  return calibration.layout_of(bundle.read_manifest(args.bundle)) or "float"


def _photo_tool(args, operation: str):
  from g2face_jax import photo
  from g2face_jax.privacy import keys
  _use_compile_cache(args)
  tool = photo.Anonymizer(args.bundle, keys.load(args.key),
                          identity=getattr(args, "identity", "consistent"),
                          codec=args.codec, layout=_layout(args),
                          min_face=(photo.faces.MIN_FACE if getattr(args, "min_face", None) is None
                                    else args.min_face),
                          small_faces=getattr(args, "small_faces", photo.DEFAULT_SMALL_FACES),
                          threshold=getattr(args, "detect_threshold", photo.detection.THRESHOLD))
  tool.require(operation)
  return tool


def _video_options(args, tool):
  """anonymize / recover: the settings that apply to video inputs (and --keep / --only,
  which apply to photos too)."""
  from tqdm import tqdm

  from g2face_jax import video
  keep, only = getattr(args, "keep", None) or (), getattr(args, "only", None) or ()
  if (keep or only) and args.aligned:
    raise ValueError("--keep / --only need detected faces, not --aligned crops")
  return video.Options(
      crf=getattr(args, "crf", None), keep_audio=args.keep_audio,
      detect_every=getattr(args, "detect_every", 1), batch=args.batch,
      measure=True if getattr(args, "measure_payload", False) else None,
      keep=tool.reference_identities(keep), only=tool.reference_identities(only),
      match_threshold=getattr(args, "match_threshold", video.MATCH_THRESHOLD),
      progress=lambda desc, total: tqdm(total=total, desc=desc, unit="frame", file=sys.stderr,
                                        disable=None, leave=False))


def _file_line(r) -> str:
  if not r.ok:
    return f"FAILED  {r.error}"
  if r.video is None:
    return f"ok  {r.input} -> {r.output} ({r.faces} face(s))" + (f": {r.note}" if r.note else "")
  notes = "; ".join([r.video.get("note", "")] + r.video.get("warnings", []))
  return (f"ok  {r.input} -> {r.output} ({r.video['frames']} frames, {r.faces} track(s), "
          f"{r.video['frames_per_second']:.2f} frames/s)" + (f": {notes.strip('; ')}"
                                                             if notes.strip("; ") else ""))


def _photo_files(args, operation: str) -> int:
  """anonymize / recover: every input file (folders recursively), one line per file."""
  import json

  from tqdm import tqdm

  from g2face_jax import files
  out = sys.stderr if args.json else sys.stdout
  tool = _photo_tool(args, operation)
  step = getattr(files, f"{operation}_file")
  video_options = _video_options(args, tool)
  results = files.run_files(
      lambda src, dst: step(tool, src, dst, aligned=args.aligned, video_options=video_options),
      args.inputs, args.out,
      progress=lambda items: tqdm(items, desc=operation, unit="file", file=sys.stderr,
                                  disable=None, leave=False),
      debug=args.debug, report=lambda r: tqdm.write(_file_line(r), file=out))
  if args.json:
    print(json.dumps(files.summary(results), indent=1))
  failed = sum(not r.ok for r in results)
  print(f"{len(results) - failed} ok, {failed} failed", file=out)
  return 1 if failed or not results else 0


def _anonymize(args) -> int:
  return _photo_files(args, "anonymize")


def _recover(args) -> int:
  return _photo_files(args, "recover")


def _verify_threshold(given: float | None, manifest: dict) -> tuple[float, str]:
  """(verify's cosine threshold, 'given' / 'calibrated' / 'default'): --threshold, else the
  bundle's calibrated one (`g2face calibrate`), else photo.VERIFY_THRESHOLD."""
  from g2face_jax import calibration, photo
  if given is not None:
    return given, "given"
  calibrated = calibration.threshold_of(manifest)
  return (calibrated, "calibrated") if calibrated is not None else (photo.VERIFY_THRESHOLD,
                                                                     "default")


def _verify(args) -> int:
  import json

  from g2face_jax import files, photo
  try:
    tool = _photo_tool(args, "verify")
    threshold, source = _verify_threshold(args.threshold, tool.bundle.manifest)
    result = files.verify_file(tool, args.anon, args.reference, threshold,
                               aligned=args.aligned)
  except photo.FileError as e:  # the file read, but holds no readable face or payload
    print(f"g2face verify: error: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(files.summary([result]) | {"threshold": threshold,
                                                "threshold_source": source}, indent=1))
  else:
    for i, (c, same) in enumerate(zip(result.cosines, result.match)):
      print(f"{args.anon} face {i}: cosine {c:.4f} -> "
            f"{'same person' if same else 'not the same person'} (threshold {threshold}"
            + (", calibrated)" if source == "calibrated" else ")"))
  return 0


def _calibrate(args) -> int:
  import json

  from g2face_jax import bundle, calibration, images, photo
  if not 0 < args.target < 1:
    raise ValueError(f"--target is a probability between 0 and 1, got {args.target}")
  _use_compile_cache(args)
  loaded = bundle.load(args.bundle)
  loaded.require(*sorted(set(photo.NEEDS["anonymize"] + photo.NEEDS["verify"])),
                 purpose="calibrate")
  # a public key: the channel does not depend on it, no user key is needed, runs repeat
  tool = photo.Anonymizer(loaded, calibration.KEY, codec="secure", layout="uniform")
  faces, what = calibration.sample_faces(args.data, tool.size, args.limit)
  scene = images.read(args.photo) if args.photo else None
  try:
    result = calibration.calibrate(tool, faces, what, jpeg=args.jpeg, scene=scene,
                                   target=args.target)
  except photo.FileError as e:  # the --photo has no face to paste over
    raise ValueError(f"{args.photo}: {e}") from None
  calibration.store(args.bundle, result)
  print(json.dumps(result, indent=1) if args.json else calibration.table(result))
  print(f"stored in {os.path.join(loaded.path, bundle.MANIFEST)}; anonymize now uses layout "
        f"{result['fit']['layout']}, verify threshold {result['verify']['threshold']}",
        file=sys.stderr if args.json else sys.stdout)
  return 0


def _eval(args) -> int:
  from tqdm import tqdm

  from g2face_jax.eval import report
  tool = _photo_tool(args, "anonymize")
  tool.require("recover")
  summary = report.run(tool, args.data, args.out, limit=args.limit, fid_bundle=args.fid_bundle,
                       progress=lambda items: tqdm(items, desc="eval", unit="image",
                                                   file=sys.stderr, disable=None))
  with open(os.path.join(args.out, "report.md")) as f:
    print(f.read())
  for failure in summary["failures"]:
    print(f"FAILED  {failure}", file=sys.stderr)
  return 1 if summary["failures"] or not summary["images"] else 0


def _bench(args) -> int:
  import json

  from g2face_jax.tools import bench, cpu_devices, host_memory
  if args.cpu_devices is not None and args.devices:
    raise ValueError("--cpu-devices splits this process's CPU; --devices compares fresh "
                     "processes of simulated devices: give one of them")
  cpu_devices.split(args.cpu_devices or 1)
  if args.reuse_freed_memory and not host_memory.reuse_freed_memory():
    raise ValueError("--reuse-freed-memory needs glibc's allocator (Linux)")
  if args.train and args.dtype != "float32":
    raise ValueError("--dtype times anonymize and recover; for --train set "
                     "train.compute_dtype in the config")
  if args.train and args.matmul_precision != "float32":
    raise ValueError("--matmul-precision times anonymize and recover; training computes at "
                     "JAX's default precision")
  if args.train and args.micro_batch is not None:
    raise ValueError("--micro-batch times anonymize and recover, not --train")
  if args.train:
    if args.devices:
      results = bench.scaling(args.config, bench.parse_batches(args.devices, "--devices"),
                              args.rounds)
    else:
      results = [bench.run_train(args.config, args.rounds)]
    for result in results:
      print(json.dumps(result) if args.json else bench.format_train_result(result), flush=True)
    return 0
  for batch in bench.parse_batches(args.batch):
    result = bench.run(args.config, batch, args.rounds, dtype=args.dtype,
                       micro_batch=args.micro_batch, matmul_precision=args.matmul_precision)
    print(json.dumps(result) if args.json else bench.format_result(result), flush=True)
  return 0


def _compile_cache_argument(p) -> None:
  p.add_argument("--compile-cache", default=os.environ.get(
      "G2FACE_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "g2face_jax", "xla")),
                 help="persistent XLA compilation cache, where later runs find what earlier "
                 "ones compiled ('' to disable; default: $G2FACE_COMPILE_CACHE or "
                 "~/.cache/g2face_jax/xla)")


def _use_compile_cache(args) -> None:
  if args.compile_cache:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compile_cache))


def _train(args) -> int:
  from g2face_jax import config as config_lib
  from g2face_jax.train import export, loop
  config = config_lib.load(args.config)
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in explicit) and None in explicit:
    raise ValueError("--coordinator, --num-processes and --process-id go together")
  if args.distributed or explicit[0] is not None:
    from g2face_jax.train import runtime
    runtime.initialize_distributed(*explicit)
  _use_compile_cache(args)
  export.check_config_spec(args.workdir, args.config)  # a changed model: refused, nothing written
  summary = loop.train(config, args.workdir,
                       started=lambda: export.save_config_spec(args.workdir, args.config))
  return 0 if summary["end_step"] >= config.train.num_steps or summary["stopped_by_signal"] else 1


def _export(args) -> int:
  from g2face_jax.train import export
  export.export(args.workdir, args.out)
  return 0


def _prepare_data(args) -> int:
  from g2face_jax.datasets import prepare
  paths = prepare.prepare(args.folder, args.out, size=args.size, images_per_shard=args.per_shard)
  print(f"{len(paths)} shard(s); train with data.source=arrayrecord:"
        f"{os.path.join(os.path.abspath(args.out), 'images-*.array_record')}")
  return 0


def _compile(args) -> int:
  import json

  import jax
  if "JAX_PLATFORMS" not in os.environ:  # compile only: never claim a local accelerator
    jax.config.update("jax_platforms", "cpu")
  from g2face_jax.tools import aot
  from g2face_jax import config as config_lib
  report = aot.compile_train_step(config_lib.load(args.config), args.topology,
                                  global_batch=args.global_batch, mesh=args.mesh or "",
                                  remat=args.remat, num_slices=args.slices)
  print(json.dumps(report) if args.json else aot.format_report(report), flush=True)
  if not report["fits"]:
    print(f"g2face compile: error: {report['hint']}", file=sys.stderr)
  return 0 if report["fits"] else 1


def _matmul_precision_argument(p) -> None:
  p.add_argument("--matmul-precision", choices=("float32", "tensorfloat32"), default="float32",
                 help="float32 matmuls and convolutions (default: the official outputs) or "
                 "tensorfloat32: TF32 tensor cores on GPUs that have them, faster and "
                 "slightly off the official outputs (docs/benchmarks.md); CPUs compute "
                 "float32 either way")


def _photo_arguments(p, inputs: bool = True) -> None:
  if inputs:
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders (recursive)")
    p.add_argument("--out", required=True, help="output folder (PNG files, no input metadata)")
  p.add_argument("--bundle", required=True, help="model bundle folder (`g2face convert`)")
  p.add_argument("--key", help="key file (`g2face keygen`); default: the G2FACE_KEY variable "
                 "(64 hex digits). Keys are never read from the command line")
  p.add_argument("--aligned", action="store_true",
                 help="inputs are ready square face crops (FFHQ-aligned), not photos")
  p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
  _matmul_precision_argument(p)
  _compile_cache_argument(p)


MIN_FACE_HELP = 64  # faces.MIN_FACE, spelled out so that --help needs no OpenCV
THRESHOLD_HELP = 0.3  # detection.THRESHOLD, spelled out so that --help needs no JAX


def _detection_argument(p) -> None:
  p.add_argument("--threshold", dest="detect_threshold", type=float, default=THRESHOLD_HELP,
                 metavar="T", help="face detection score (CenterFace, 0 to 1) from which a face "
                 f"counts (default {THRESHOLD_HELP}, chosen for recall: a missed face is left "
                 "in the clear); higher finds fewer false faces, and misses more real ones")


def _small_face_arguments(p) -> None:
  from g2face_jax import obscure
  g = p.add_argument_group("small faces", "a face whose alignment square (the FFHQ crop, "
                           "about four eye distances wide) is under --min-face pixels, or a "
                           "photo's face turned about 45 degrees or more (nose beyond an eye), "
                           "is not for the generator: it is obscured instead, in photos and "
                           "video tracks alike, and the file is still written")
  g.add_argument("--min-face", type=float, metavar="PX",
                 help="smallest alignment square side, in photo pixels, given to G2Face "
                 f"(default {MIN_FACE_HELP})")
  g.add_argument("--small-faces", choices=obscure.METHODS + ("g2face",), default=obscure.DEFAULT,
                 help=f"what a smaller face gets (default {obscure.DEFAULT}). 'pixelate': the "
                 f"face's square, enlarged by {obscure.GROW * 100:.0f}%%, becomes "
                 f"{obscure.PIXELATE_BLOCKS}x{obscure.PIXELATE_BLOCKS} blocks of one colour "
                 "each, about two blocks across the eyes, nose and mouth, so the face is not "
                 "recognisable (the default, for privacy: a mild blur or a fine mosaic can be "
                 "recognised by machines) while the scene stays readable; 'fill': the square "
                 "in one colour (its mean), the strongest; 'blur': a Gaussian blur of sigma "
                 f"{obscure.BLUR_SIGMA} times the square's side (weaker: keeps colours and "
                 "coarse shapes); 'g2face': G2Face anyway on the upsampled crop (low quality, "
                 "recoverable). Obscured faces hide no identity: `recover` leaves them as they "
                 "are. The --json summary lists every face's method and detection score")


def _video_arguments(p, anonymize: bool) -> None:
  g = p.add_argument_group("videos", "inputs FFmpeg reads as video (by content) give Matroska "
                           "(.mkv) outputs: same size, frame count, frame rate and timestamps; "
                           "input metadata is not copied")
  g.add_argument("--keep-audio", action="store_true",
                 help="copy the first audio track (default: dropped, since a voice identifies "
                 "people too)")
  g.add_argument("--batch", type=int, default=8, help="frames per batch (default 8)")
  if not anonymize:
    return
  g.add_argument("--crf", type=int, metavar="N",
                 help="lossy H.264 output at constant rate factor N (0-51; 18 looks lossless) "
                 "instead of the default lossless FFV1: smaller, but RECOVERY MAY FAIL; the "
                 "JSON summary gives the bit error rate measured on the written file")
  g.add_argument("--measure-payload", action="store_true",
                 help="measure the payload bit error rate on a lossless output too")
  g.add_argument("--detect-every", type=int, default=1, metavar="K",
                 help="run the face detector on every K-th frame only; tracks fill in between "
                 "(default 1)")
  g = p.add_argument_group("people", "in photos and video tracks alike: a face whose ArcFace "
                           "identity matches a reference photo's largest face is left "
                           "byte-identical (method 'kept' in the --json summary and the stamp; "
                           "recover skips it)")
  people = g.add_mutually_exclusive_group()
  people.add_argument("--keep", nargs="+", metavar="PHOTO",
                      help="leave the people of these photos (largest face each) as they are, "
                      "e.g. a consenting interviewer (ArcFace cosine >= --match-threshold)")
  people.add_argument("--only", nargs="+", metavar="PHOTO",
                      help="anonymize only the people of these photos; every other face is "
                      "left as it is")
  g.add_argument("--match-threshold", type=float, default=0.3,
                 help="ArcFace cosine from which a face is the reference person (default 0.3, "
                 "a conventional ArcFace value: calibrate it)")


def _command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
  """A subcommand's parser, with the options every subcommand has (--debug)."""
  p = sub.add_parser(name, **kwargs)
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of an error instead of its one-line message")
  return p


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="g2face", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = _command(sub, "parity", help="convert the official fixtures' recipe weights and print "
                     "the relative error of every network against the official outputs")
  p.add_argument("--fixtures", default=os.environ.get("G2FACE_PARITY_FIXTURES", DEFAULT_FIXTURES),
                 help="fixture folder (official-seedN layout); default: the bundled seed 0")
  p.add_argument("--only", help="comma-separated checks to run (default: all but train_step, "
                 "one official training iteration, which takes minutes and about 15 GB: "
                 "`--only train_step`)")
  p.set_defaults(run=_parity)

  p = _command(sub, "convert", help="convert official PyTorch checkpoints into one model bundle "
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
  p.add_argument("--inception", metavar="FILE", help="pytorch-fid's FID InceptionV3 weights "
                 "(pt_inception-2015-12-05-6726825d.pth), for `g2face eval --fid-bundle`")
  p.add_argument("--config", default="paper", help="model config (default: paper, the official 256)")
  p.add_argument("--out", required=True, help="bundle folder to write (new or empty)")
  p.set_defaults(run=_convert)

  p = _command(sub, "keygen", help="write a new 256-bit key file (mode 0600)")
  p.add_argument("--out", required=True, help="key file to create (never overwritten)")
  p.add_argument("--passphrase", action="store_true",
                 help="derive the key from a passphrase (scrypt, memory-hard) typed at a prompt "
                 "or taken from G2FACE_PASSPHRASE; the file then holds only the salt")
  p.set_defaults(run=_keygen)

  codec_help = ("hidden identity code: 'secure' (default) encrypts and authenticates it with the "
                "key and adds error correction; 'official' hides the raw float32 ArcFace bits "
                "exactly as the official G2Face: anyone with the model can recover the face")
  p = _command(sub, "anonymize", help="replace every face of photos with a key-driven virtual "
                     "identity, hiding the original identity for `recover`")
  _photo_arguments(p)
  p.add_argument("--identity", choices=("consistent", "random"), default="consistent",
                 help="virtual identity: 'consistent' (same person + same key -> same virtual "
                 "person) or 'random' (per face, reproducible from key and photo)")
  p.add_argument("--codec", choices=("secure", "official"), default="secure", help=codec_help)
  p.add_argument("--layout", help="secure payload layout (default: the bundle's calibrated "
                 "layout, `g2face calibrate`, else 'float'): 'float' keeps the exponent "
                 "positions as the official training bits had them (for the official "
                 "weights); 'uniform' uses all bits; fit-MASK-vGROUPS-nN-qQ a fitted one")
  _detection_argument(p)
  _small_face_arguments(p)
  _video_arguments(p, anonymize=True)
  p.set_defaults(run=_anonymize)

  p = _command(sub, "recover", help="restore the original faces of anonymized photos with the key")
  _photo_arguments(p)
  p.add_argument("--codec", choices=("secure", "official"), default="secure",
                 help="code to read when a file has no g2face stamp (default secure)")
  _detection_argument(p)
  _video_arguments(p, anonymize=False)
  p.set_defaults(run=_recover)

  p = _command(sub, "verify", help="decide whether the person hidden in an anonymized photo is "
                     "the person in a reference photo, without recovering the face")
  p.add_argument("anon", metavar="ANON", help="anonymized image")
  p.add_argument("--reference", required=True, help="photo of the claimed person (largest face)")
  p.add_argument("--threshold", type=float,
                 help="cosine threshold (default: the bundle's calibrated threshold, "
                 "`g2face calibrate`, else 0.3, a conventional ArcFace value)")
  p.add_argument("--codec", choices=("secure", "official"), default="secure",
                 help="code to read when the file has no g2face stamp (default secure)")
  _photo_arguments(p, inputs=False)
  p.set_defaults(run=_verify)

  p = _command(sub, "calibrate", help="measure a bundle's payload channel on sample faces "
                     "(bit error rate per bit position), fit the secure payload's layout to "
                     "it and calibrate verify's threshold; stored in the bundle's manifest")
  p.add_argument("--bundle", required=True, help="model bundle folder (its manifest is updated)")
  p.add_argument("--data", default="demo", help="folder of aligned face images, or 'demo' "
                 "(default: scikit-image's LFW crops, the training demo set)")
  p.add_argument("--limit", type=int, default=32, help="faces to use (default 32)")
  p.add_argument("--jpeg", type=int, metavar="Q", help="also measure after JPEG at quality Q")
  p.add_argument("--photo", metavar="PHOTO", help="also measure after pasting each face into "
                 "this photo (over its first detected face) and re-aligning it")
  p.add_argument("--target", type=float, default=1e-6, help="face decoding failure "
                 "probability the fitted code must stay under (default 1e-6)")
  p.add_argument("--json", action="store_true", help="print the calibration as JSON")
  _matmul_precision_argument(p)
  _compile_cache_argument(p)
  p.set_defaults(run=_calibrate)

  p = _command(sub, "eval", help="the paper's metrics on a folder of aligned face images: "
                     "metrics.json, report.md and grid.png in --out")
  p.add_argument("--data", nargs="+", required=True, help="image files or folders (each image one "
                 "aligned face crop)")
  p.add_argument("--out", required=True, help="report folder")
  p.add_argument("--limit", type=int, help="evaluate at most N images")
  p.add_argument("--fid-bundle", metavar="BUNDLE", help="bundle holding pytorch-fid's "
                 "InceptionV3 (`g2face convert --inception FILE`): adds FID of the anonymized "
                 "and of the recovered faces against the originals")
  _photo_arguments(p, inputs=False)
  p.add_argument("--codec", choices=("secure", "official"), default="secure",
                 help="payload code (default: secure)")
  p.add_argument("--identity", choices=("consistent", "random"), default="consistent",
                 help="virtual identity mode (default: consistent)")
  p.set_defaults(run=_eval)

  p = _command(sub, "bench", help="time anonymize and recover per image on random weights "
                     "(compile apart, XLA FLOPs, GFLOP/s, peak memory, device)")
  p.add_argument("--config", default="paper", help="config spec (default: paper)")
  p.add_argument("--batch", default="1", help="batch size(s), comma-separated (default: 1)")
  p.add_argument("--rounds", type=int, default=3, help="timed runs after the compiling one; "
                 "the best counts (default: 3)")
  p.add_argument("--json", action="store_true", help="one JSON object per batch size on stdout")
  p.add_argument("--dtype", default="float32", help="compute dtype of anonymize and recover: "
                 "float32 (official, default) or bfloat16 (decoder and extractor convolutions "
                 "as bfloat16 matmuls with float32 accumulation)")
  _matmul_precision_argument(p)
  p.add_argument("--micro-batch", type=int, help="faces per step of the loop over each batch "
                 "(default: on CPU 1, and up to 4 for ArcFace and the 3DMM net; the whole batch on "
                 "accelerators)")
  p.add_argument("--cpu-devices", type=int, metavar="N", help="run on the CPU as N devices of "
                 "one thread each, every batch split over them (faster on batches, slower one "
                 "face at a time; default: one device using every core)")
  p.add_argument("--reuse-freed-memory", action="store_true", help="keep freed host memory in "
                 "the process (glibc mallopt) instead of mapping every run's buffers afresh: "
                 "fewer page faults, resident memory that does not shrink (host_memory)")
  p.add_argument("--train", action="store_true", help="time one training iteration instead "
                 "(the config's global batch and mesh; e.g. --config smoke)")
  p.add_argument("--devices", help="with --train on CPU: simulated device counts to compare, "
                 "one fresh process each, e.g. 1,2,4,8 (the global batch must split over them)")
  p.set_defaults(run=_bench)

  p = _command(sub, "train", help="train G2Face (the official recipe) with checkpoints, metrics "
                     "and sample grids in --workdir; resumes from its newest checkpoint")
  p.add_argument("--config", default="smoke",
                 help="config: paper, smoke or tiny[,key=value...], or FILE.py:VARIANT[,...] "
                 "(default: smoke, the CPU smoke run); pretrained.bundle=FOLDER takes the frozen networks, the BFM and the start "
                 "from a `g2face convert` bundle")
  p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics and samples")
  _compile_cache_argument(p)
  p.add_argument("--distributed", action="store_true",
                 help="multi-host run: join the other processes (jax.distributed, cluster "
                 "detected on Cloud TPU VMs, SLURM and Open MPI); run the same command on "
                 "every host, each reads its own slice of every global batch")
  p.add_argument("--coordinator", help="HOST:PORT of process 0, for clusters JAX does not "
                 "detect (with --num-processes and --process-id)")
  p.add_argument("--num-processes", type=int, help="processes in the run (with --coordinator)")
  p.add_argument("--process-id", type=int, help="this process, 0 .. N-1 (with --coordinator)")
  p.set_defaults(run=_train)

  p = _command(sub, "export", help="write the newest checkpoint of a training workdir as a "
                     "model bundle for anonymize/recover")
  p.add_argument("--workdir", required=True, help="training workdir")
  p.add_argument("--out", required=True, help="bundle folder to write (new or empty)")
  p.set_defaults(run=_export)

  p = _command(sub, "prepare-data", help="pack an image folder (recursive) into ArrayRecord "
                     "shards for training")
  p.add_argument("folder", metavar="FOLDER", help="folder of jpg/png images")
  p.add_argument("--out", required=True, help="folder for the shards")
  p.add_argument("--size", type=int, help="resize to SIZE x SIZE first (default: keep the files)")
  p.add_argument("--per-shard", type=int, default=10_000, help="images per shard")
  p.set_defaults(run=_prepare_data)

  p = _command(sub, "compile", help="compile the training step ahead of time for a TPU slice "
                     "(libtpu, no TPU needed): memory per chip, FLOPs, estimates from the peak")
  p.add_argument("--config", default="paper",
                 help="config: paper, smoke or tiny[,key=value...], or FILE.py:VARIANT[,...] "
                 "(default: paper)")
  p.add_argument("--topology", required=True,
                 help="Cloud TPU slice: v5e-16 ... v5e-256, v4-8 (v4/v5p names count cores), "
                 "v5p-128, v6e-64, or GENERATION:SHAPE such as v5e:4x4")
  p.add_argument("--global-batch", type=int, help="global batch (default: the config's)")
  p.add_argument("--mesh", help="data=D,fsdp=F (default: the config's mesh; data=-1 takes the rest)")
  p.add_argument("--remat", help="rematerialise each network in the backward pass: none, "
                 "full, dots_saveable, dots_with_no_batch_dims_saveable (default: the "
                 "config's train.remat, as training runs)")
  p.add_argument("--slices", type=int, default=1,
                 help="number of slices joined over the data-center network (data axis)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(run=_compile)
  return parser


def _run(args) -> int:
  """args.run(args), at the --matmul-precision of the commands that have one."""
  if getattr(args, "matmul_precision", "float32") == "float32":
    return args.run(args)  # the pipeline's own: 'highest'
  import jax
  with jax.default_matmul_precision(args.matmul_precision):
    return args.run(args)


def main(argv=None) -> int:
  """The `g2face` command; `argv` None: this process's arguments."""
  args = build_parser().parse_args(argv)
  try:
    platforms.use_cpu_when_nothing_else_runs()  # no libtpu start-up noise on CPU-only hosts
    return _run(args)
  except KeyboardInterrupt:
    print(f"g2face {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # every error is one line; --debug shows the traceback
    if args.debug:
      raise
    print(f"g2face {args.command}: error: {one_line(e)}", file=sys.stderr)
    return 2 if isinstance(e, REFUSALS) else 1


# Errors of the input, the files or the config (exit 2); any other error is a failure of
# the run itself, such as a non-finite loss or an XLA out-of-memory error (exit 1).
REFUSALS = (OSError, ValueError, LookupError, ImportError)


def one_line(error: BaseException) -> str:
  """The error's message on one line: its first non-empty line, with the exception's type
  when the message alone would not say what failed (not a refusal of input)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else type(error).__name__
  if len(lines) > 1:
    text += " [...] (--debug for the full message)"
  if not isinstance(error, REFUSALS) and lines:
    text = f"{type(error).__name__}: {text}"
  return text


if __name__ == "__main__":
  sys.exit(main())
