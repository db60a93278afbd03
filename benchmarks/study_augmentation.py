"""Issue 15: which train augmentation should fine-tuning use by default?

timm's ImageNet-from-scratch transform (random resized crop keeping 8-100% of the
image, colour jitter 0.4) is tuned for hundreds of epochs from random weights. A
fine-tuning run is a few epochs from a model that already works. This study
fine-tunes the demo's model on the bundled Fashion-MNIST subset with timm's setting
and with milder ones, and prints the final val top-1 of each.

Through the library calls the commands use (as ``gct_surgery/demo.py`` does):

1. the bundled data as an image folder (3,000 train, 1,000 val images, 10 classes);
2. the demo's "existing model": ``timm:resnet10t`` trained from scratch for
   ``--pretrain-epochs`` with timm's from-scratch augmentation (what it is for);
3. gates injected, then for every setting and seed one short ``full`` stage of the
   built-in recipe (``--epochs``) on a small train set (``--train-per-class`` images
   of each class, the first in file order: fine-tuning data is usually small), and
   the val top-1 (all 1,000 val images) of its last epoch.

Usage (results go under ``--out``, default ``/tmp/gct-aug-study``; nothing is written
inside the repository)::

    HF_HUB_OFFLINE=1 python benchmarks/study_augmentation.py --seeds 0 1 --epochs 2
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

# name: (crop_scale, hflip, color_jitter)
SETTINGS = {
    "timm from scratch": (0.08, 0.5, 0.4),
    "mild (0.5, jitter 0.1)": (0.5, 0.5, 0.1),
    "milder (0.8, no jitter)": (0.8, 0.5, 0.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/gct-aug-study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=2, help="epochs of the full stage")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-per-class", type=int, default=50)
    args = p.parse_args()

    from gct_surgery.bundled_data import write_image_folder
    from gct_surgery.io.checkpoint import save
    from gct_surgery.operations import inject_model, open_model
    from gct_surgery.train.config import TrainConfig
    from gct_surgery.train.loop import finetune
    from gct_surgery.train.recipe import Recipe, default_recipe
    from gct_surgery.train.stages import Stage

    out = Path(args.out)
    data = out / "data"
    if not (data / "train").is_dir():
        write_image_folder(data)

    small = out / f"data-{args.train_per_class}"
    if not (small / "train").is_dir():
        import shutil

        shutil.copytree(data / "val", small / "val")
        for folder in sorted((data / "train").iterdir()):
            (small / "train" / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:args.train_per_class]:
                shutil.copy(image, small / "train" / folder.name / image.name)

    def config(run: str, seed: int, setting: tuple[float, float, float], folder: Path = small) -> TrainConfig:
        crop, hflip, jitter = setting
        return TrainConfig(data=str(folder), out=str(out / run), batch_size=args.batch_size, workers=0,
                           seed=seed, img_size=args.img_size, crop_scale=crop, hflip=hflip,
                           color_jitter=jitter)

    started = time.perf_counter()
    base = out / "base.safetensors"
    if not base.exists():
        model, meta = open_model("timm:resnet10t", num_classes=10)
        save(model, out / "untrained.safetensors", meta)
        pretrain = Recipe((Stage(name="pretrain", kind="full", epochs=args.pretrain_epochs, lr=3e-3,
                                 base_lr=3e-3, warmup=0.05),), "study pre-training")
        result = finetune(out / "untrained.safetensors", pretrain,
                          config("pretrain", 0, SETTINGS["timm from scratch"], data))
        print(f"existing model: top1 {result.last['top1']:.2f} after {args.pretrain_epochs} epochs")
        model, meta = open_model(str(result.run_dir / "last.safetensors"))
        inject_model(model, meta, output=base, input_size=[3, args.img_size, args.img_size])

    full = default_recipe().only("full").override(epochs=args.epochs)
    top1: dict[str, list[float]] = {}
    for name, setting in SETTINGS.items():
        for seed in args.seeds:
            run = f"runs/{'-'.join(map(str, setting))}/seed{seed}"
            result = finetune(base, full, config(run, seed, setting))
            top1.setdefault(name, []).append(result.last["top1"])
            print(f"{name} seed {seed}: top1 {result.last['top1']:.2f}", flush=True)

    print(f"\nfull stage, {args.epochs} epochs on {args.train_per_class} images per class, seeds {args.seeds}, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print(f"| setting (crop scale, hflip, jitter) | {' | '.join(f'seed {s}' for s in args.seeds)} | mean |")
    print(f"|---|{'---|' * len(args.seeds)}---|")
    for name, values in top1.items():
        crop, hflip, jitter = SETTINGS[name]
        cells = " | ".join(f"{v:.2f}" for v in values)
        print(f"| {name}: {crop}, {hflip}, {jitter} | {cells} | {statistics.mean(values):.2f} |")


if __name__ == "__main__":
    main()
