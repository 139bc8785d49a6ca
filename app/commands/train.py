"""`s2amnet train`: train a model from scratch on a dataset folder (see model/train.py)."""

from __future__ import annotations

import json
import shlex
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on a dataset folder (native layout detected)",
                       description="Train S2-AMNet from scratch. Checkpoints every epoch to --out; "
                                   "--resume continues an interrupted run.")
    p.add_argument("--task", required=True, choices=["classify", "detect", "segment"])
    p.add_argument("--data", required=True, help="dataset folder (magnetic-tile, NEU-DET, CrackForest, "
                                                 "DeepCrack or your own layout, see docs/TRAINING.md); several "
                                                 "folders with the same classes: comma-separated")
    p.add_argument("--variant", default="tiny", help="tiny | small | base | large")
    p.add_argument("--epochs", type=int)
    p.add_argument("--imgsz", type=int, help="square input size (letterbox)")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float, help="linear LR warm-up length (fractions allowed)")
    p.add_argument("--crop", type=int, help="segment: training crop size")
    p.add_argument("--out", default="", help="run folder (default runs/NAME, NAME being --name)")
    p.add_argument("--name", default="", help="model name written to the manifest (default <data folder>-<task>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.pt with the run's own data and settings; only --epochs, "
                        "--time-limit, --close-mosaic, --workers, --threads, --export, --export-mask, "
                        "--keep-epochs, --device and --val-every may change, any other option must agree "
                        "with the run")
    p.add_argument("--export", help="copy the best weights folder here at the end (e.g. weights/NAME)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    p.add_argument("--time-limit", type=float, metavar="MIN",
                   help="minutes for this invocation: the epochs (at most --epochs) are fitted to it after the "
                        "first epochs, and the run stops before it would overrun")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and at the last)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--init-backbone", help="weights folder whose backbone initialises this model "
                                           "(e.g. a segmenter trained on the same images)")
    p.add_argument("--init-weights", help="weights folder of the same task, variant and classes to continue "
                                          "training from (new schedule; e.g. the shipped model)")
    p.add_argument("--no-aux-mask", action="store_true",
                   help="classify: do not train the auxiliary mask head even when masks exist")
    p.add_argument("--export-mask", help="classify with masks: copy the segment model formed by the backbone "
                                         "and the auxiliary mask head (best val mIoU) here at the end")
    p.add_argument("--close-mosaic", type=int, metavar="N",
                   help="detect: train the last N epochs without mosaic (on whole images, as served)")
    p.add_argument("--copy-paste", type=float, default=0.0, metavar="P",
                   help="classify with masks: with probability P a defect image is trained as its defect "
                        "pasted onto a random defect-free image (more surroundings for rare classes); segment: "
                        "with probability P an image gets a piece of a training image's defects (same data folder, "
                        "donors in proportion to their defect area) pasted in")
    p.add_argument("--defect-keep", type=float, default=0.5, metavar="F",
                   help="classify: a random training crop of an image with a defect mask keeps at least this "
                        "fraction of its defect pixels (default 0.5; lower: also defects cut by the frame down "
                        "to a sliver at the border, as in photos framed tighter)")
    p.add_argument("--fg-sampling", type=float, default=0.0, metavar="P",
                   help="segment: sample each training image in proportion to its defect-pixel fraction ** P "
                        "(within each data folder; 0 = off): images whose defects cover much of the image "
                        "are shown more often")
    p.add_argument("--rotate", type=float, default=0.0, metavar="DEG",
                   help="segment: rotate each training image by a random angle in [-DEG, DEG] degrees (the "
                        "corners are ignored in the loss); besides the flips and 90-degree turns")
    p.add_argument("--balance", type=float, metavar="P",
                   help="classify / segment: class-balanced sampling, each image drawn with weight "
                        "(its class's image count) ** -P: 0 = as in the data, 1 = every class equally often "
                        "(default 0.5: full balance over-corrects on magnetic tile, 70 %% defect-free)")
    p.add_argument("--exposure", type=float, default=0.0, metavar="G",
                   help="classify / segment: multiply each training image's intensities by a gain drawn "
                        "log-uniformly from [e^-G, e^G] (clipped at white), besides brightness/contrast/gamma: "
                        "the same parts photographed at other exposures (magnetic tile: exp0-exp6)")
    p.add_argument("--select", choices=("pooled", "folders"), default="pooled",
                   help="several --data folders: pick the best epoch by the val metric over all their val images "
                        "(pooled) or by the mean of each folder's val metric (folders: each dataset counts "
                        "equally, as in sampling; each folder's metric is logged)")
    p.add_argument("--keep-epochs", action="store_true",
                   help="also save every validated epoch's EMA weights, with its val metrics, to OUT/epochs/NNN/ "
                        "(a weights folder each; for picking an epoch by more than the recipe's metric)")
    p.add_argument("--max-train-batches", type=int, help=argparse_hidden())
    p.add_argument("--max-val-images", type=int, help=argparse_hidden())
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def run(args) -> int:
    from model.checkpoint import CheckpointError
    from model.data import DatasetFormatError
    from model.train import TrainConfig, TrainConfigError, TrainOutputError, train

    cfg = TrainConfig(task=args.task, data=args.data, variant=args.variant, epochs=args.epochs,
                      imgsz=args.imgsz, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_epochs=args.warmup_epochs,
                      crop=args.crop, out=args.out, name=args.name, resume=args.resume, export=args.export,
                      workers=args.workers, threads=args.threads, device=args.device, seed=args.seed,
                      time_limit=args.time_limit, val_every=args.val_every,
                      max_train_batches=args.max_train_batches, init_backbone=args.init_backbone,
                      init_weights=args.init_weights, close_mosaic=args.close_mosaic,
                      aux_mask=not args.no_aux_mask, export_mask=args.export_mask, max_val_images=args.max_val_images,
                      copy_paste=args.copy_paste, fg_sampling=args.fg_sampling, rotate=args.rotate,
                      exposure=args.exposure, defect_keep=args.defect_keep,
                      select=args.select, keep_epochs=args.keep_epochs, balance=args.balance,
                      command="s2amnet " + shlex.join(sys.argv[1:]))
    try:
        result = train(cfg, progress=not args.quiet)
    # bad options, data folder, --init-* weights or --resume state: a message, not a traceback
    except (TrainConfigError, DatasetFormatError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # the run trained but its result could not be copied, or the disk failed while writing the run folder
    except (TrainOutputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
