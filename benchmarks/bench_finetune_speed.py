"""Is ``finetune`` as fast as the machine allows? Images per second and wall time, side by side.

For each model (the demo's ``resnet10t`` on the bundled data at 32 px, and a mid-size
one, ``mobilenetv2_100`` at 96 px on a generated folder of JPEGs), medians over
interleaved repeats of:

- ``full`` / ``gates``: ``gct_surgery.train.loop.finetune`` with a one-stage recipe of
  that kind (images/s read from its rows: training time only, validation not counted);
- ``bare``: a bare PyTorch loop over the same gated model, batch, data, timm transform
  and DataLoader settings, with a plain AdamW step: the ceiling for that model here;
- the default thread/worker choice against a grid of hand-tuned ones (threads 1/2,
  workers 0/1/2), as wall time of the whole ``finetune`` call (full stage).

Every measurement runs in a fresh process (torch's thread count is process-wide, and
``auto`` starts from a fresh process's). Ratios printed: finetune/bare, gates/full
(images/s), default/best (wall). Targets: >= 0.9, >= 1.5, <= 1.15.

    python benchmarks/bench_finetune_speed.py                  # both models, 3 repeats
    python benchmarks/bench_finetune_speed.py --tiny           # seconds: proves it works
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {  # name -> (timm model, image size, data: "bundled" or generated JPEG count)
    "demo": ("resnet10t", 32, "bundled"),
    "mid": ("mobilenetv2_100", 96, 400),
}


def prepare(work: Path, model: str, size: int, data: str | int, tiny: bool) -> tuple[Path, Path]:
    """The image folder and a gated checkpoint of ``model`` (random weights, 10 classes)."""
    from gct_surgery.operations import inject_model, open_model

    folder = work / f"data-{data}"
    if not folder.exists():
        if data == "bundled":
            from gct_surgery.bundled_data import write_image_folder

            write_image_folder(folder)
            if tiny:  # a few hundred images are enough to prove the script runs
                for split_dir in (p for p in folder.iterdir() if p.is_dir()):
                    for class_dir in (p for p in split_dir.iterdir() if p.is_dir()):
                        for f in sorted(class_dir.iterdir())[30 if split_dir.name == "train" else 5:]:
                            f.unlink()
        else:
            _write_jpegs(folder, int(data) // (4 if tiny else 1), size)
    ckpt = work / f"{model}.safetensors"
    if not ckpt.exists():
        net, meta = open_model(f"timm:{model}", num_classes=10)
        inject_model(net, meta, output=ckpt, input_size=[3, size, size])
    return folder, ckpt


def _write_jpegs(folder: Path, count: int, size: int) -> None:
    """``count`` textured JPEGs (1.5x the training size, 10 classes), 10% of them for val."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = int(size * 1.5)
    for i in range(count):
        split = "val" if (i // 10) % 10 == 0 else "train"
        d = folder / split / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((side, side), Image.BILINEAR)
        img.save(d / f"{i}.jpg", quality=90)


# --- one measurement, in its own process ----------------------------------------------

def measure(job: dict) -> dict:
    import time

    os.environ["HF_HUB_OFFLINE"] = "1"
    if job["kind"] == "bare":
        return bare_loop(job)
    from gct_surgery.train.config import TrainConfig
    from gct_surgery.train.loop import finetune
    from gct_surgery.train.recipe import Recipe
    from gct_surgery.train.stages import Stage

    recipe = Recipe((Stage(job["kind"], job["kind"], epochs=job["epochs"]),), "bench")
    config = TrainConfig(data=job["data"], out=job["out"], batch_size=job["batch"],
                         img_size=job["size"], workers=job["workers"], threads=job["threads"],
                         seed=0)
    t0 = time.perf_counter()
    result = finetune(job["ckpt"], recipe, config, on_event=lambda *a: None)
    wall = time.perf_counter() - t0
    rows = [r for r in result.rows if r["epoch"] > 0]
    return {"img_s": statistics.median(r["images_per_s"] for r in rows), "wall": wall,
            "machine": result.machine}


def bare_loop(job: dict) -> dict:
    """The same model, data, transform and loader settings; a plain AdamW step."""
    import time

    import torch
    from torch.utils.data import DataLoader

    from gct_surgery.io.checkpoint import load_checkpoint
    from gct_surgery.train import distributed
    from gct_surgery.train.data import resolve_data_config
    from gct_surgery.train.task import load_task

    chosen = distributed.choose("cpu", threads=job["threads"], workers=job["workers"])
    torch.set_num_threads(chosen.threads)
    torch.manual_seed(0)
    loaded = load_checkpoint(job["ckpt"])
    model = loaded.model
    cfg = resolve_data_config(loaded.meta.data, model, img_size=job["size"])
    train_set, _ = load_task(None).datasets(Path(job["data"]), cfg, augment=True)
    loader = DataLoader(train_set, batch_size=job["batch"], shuffle=True, drop_last=True,
                        num_workers=chosen.workers, persistent_workers=chosen.workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    rates = []
    for _ in range(job["epochs"]):
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += len(y)
        rates.append(n / (time.perf_counter() - t0))
    return {"img_s": statistics.median(rates), "wall": 0.0, "machine": chosen.to_dict()}


def run_job(job: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the default is what a user gets
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{job['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,mid", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per measurement (rows' median)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-grid", action="store_true", help="skip the threads x workers grid")
    ap.add_argument("--tiny", action="store_true", help="a few hundred images, 1 repeat, 1 epoch")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.job:
        print(json.dumps(measure(json.loads(a.job))))
        return
    if a.tiny:
        a.repeats, a.epochs, a.batch = 1, 1, min(a.batch, 16)
    import torch

    print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, batch {a.batch}, "
          f"{a.epochs} epochs per measurement, medians of {a.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in a.models.split(","):
            model, size, data = MODELS[name]
            folder, ckpt = prepare(work, model, size, data, a.tiny)
            job = {"data": str(folder), "ckpt": str(ckpt), "batch": a.batch, "size": size,
                   "epochs": a.epochs, "threads": None, "workers": None}
            variants = {k: {**job, "kind": k} for k in ("full", "gates", "bare")}
            grid = [] if a.no_grid else list(itertools.product((1, 2), (0, 1, 2)))
            for t, w in grid:
                variants[f"full t{t} w{w}"] = {**job, "kind": "full", "threads": t, "workers": w}
            got: dict[str, list[dict]] = {k: [] for k in variants}
            for r in range(a.repeats):  # interleaved: one of each per repeat
                for k, v in variants.items():
                    got[k].append(run_job({**v, "out": str(work / f"{name}-{k}-{r}".replace(" ", "-"))}))
            med = {k: (statistics.median(x["img_s"] for x in v), statistics.median(x["wall"] for x in v))
                   for k, v in got.items()}
            chosen = got["full"][0]["machine"]
            print(f"\n{name}: {model}, {size} px, default {chosen['threads']} threads, "
                  f"{chosen['workers']} workers")
            print(f"{'variant':<14}{'img/s':>9}{'wall s':>9}")
            for k, (img_s, wall) in med.items():
                print(f"{k:<14}{img_s:>9.1f}{wall:>9.2f}")
            print(f"finetune full / bare img/s: {med['full'][0] / med['bare'][0]:.2f}  (target >= 0.9)")
            print(f"gates / full img/s:         {med['gates'][0] / med['full'][0]:.2f}  (target >= 1.5)")
            if grid:
                best = min((k for k in med if k.startswith("full t")), key=lambda k: med[k][1])
                print(f"default / best wall:        {med['full'][1] / med[best][1]:.2f}  "
                      f"(best: {best}; target <= 1.15)")


if __name__ == "__main__":
    main()
