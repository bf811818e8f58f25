"""Train FoR-Net on Cityscapes with the paper's recipe (Sec. 4.1), in one flat loop.

    python train.py --data /path/to/cityscapes                     # one GPU, the paper's recipe
    torchrun --nproc_per_node=4 train.py --data /path/to/cityscapes   # several GPUs (DDP)
    python train.py --toy                                           # synthetic demo, CPU, < 5 min

Recipe (Sec. 4.1): AdamW lr 1e-4, poly schedule (power 0.9), batch 8, crop 768, 200 epochs,
random scale / crop / flip, CE + Dice + selector loss, AMP.
"""
import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fornet import Cityscapes, ConfusionMatrix, DataError, FoRNet, FoRNetLoss, TrainTransform, make_toy_cityscapes, normalize

# --toy changes these defaults (flags given on the command line still win): a ResNet-50 with a
# narrow head on a generated 128×256 data set, small enough for a 2-core CPU in a few minutes.
# From scratch, poles, signs, lights and people are learnt only after ~300 iterations at lr 2e-3
# (at 200 iterations and lr 1e-3 their IoU is 0); 400 leaves a margin.
TOY = dict(data="runs/toy/data", out="runs/toy", backbone="resnet50", channels=64, crop=96, batch_size=4,
           iters=400, lr=2e-3, workers=0, log_every=50)
# On --resume these come from the command line; every other flag is restored from the checkpoint.
RUN_FLAGS = ("resume", "workers", "device", "log_every")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="Cityscapes root, holding leftImg8bit/ and gtFine/")
    g.add_argument("--toy", action="store_true", help="generate a synthetic Cityscapes-layout set and train a small model on it")
    g.add_argument("--crop", type=int, default=768, help="square training crop (Sec. 4.1: 768)")
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=("resnet101", "resnet50"), default="resnet101")
    g.add_argument("--pretrained", default="none", help="none | imagenet | PATH to a .pth (see README: GN weights)")
    g.add_argument("--norm", choices=("gn", "bn"), default="gn", help="gn = the paper; bn = deviation for BN weights")
    g.add_argument("--channels", type=int, default=256, help="width C of the head")
    g.add_argument("--dilation", type=int, default=16, help="dilation of the 7×7 branch (Sec. 4.5)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=0, help="iterations; 0 = --epochs worth of them")
    g.add_argument("--epochs", type=int, default=200, help="used when --iters is 0 (Sec. 4.1: 200)")
    g.add_argument("--batch-size", type=int, default=8, help="total over all GPUs (Sec. 4.1: 8)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW initial learning rate (Sec. 4.1: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-2,
                   help="AdamW weight decay on conv weights (paper is silent; PyTorch's default 0.01)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="auto = bf16 on GPUs that support it, else fp16; off on CPU")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/fornet", help="directory for last.pt and best.pt")
    g.add_argument("--val-every", type=int, default=0, help="validate every N iterations; 0 = only at the end")
    g.add_argument("--save-every", type=int, default=1000, help="write last.pt every N iterations")
    g.add_argument("--log-every", type=int, default=20, help="print a log line every N iterations")
    g.add_argument("--resume", help="continue the run saved in this checkpoint (its flags are restored)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.toy:
        p.set_defaults(**TOY)
        args = p.parse_args(argv)
    return args


def poly_lr(it, iters, base_lr, power=0.9):
    """Poly schedule (Sec. 4.1): lr = base_lr · (1 - it/iters)^0.9."""
    return base_lr * (1 - it / iters) ** power


def batches(loader, sampler, epoch):
    """Endless stream of batches, reshuffled every epoch."""
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def validate(model, dataset, device, amp_dtype, rank=0, world=1):
    """Whole-image mIoU on `dataset`, each rank taking every world-th image, matrices summed."""
    model.eval()
    cm = ConfusionMatrix()
    for i in range(rank, len(dataset), world):
        image, target = dataset[i]  # (3, H, W), (H, W)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, _ = model(image[None].to(device))  # (1, N, H, W)
        cm.update(logits.argmax(1)[0], target.to(device))
    cm.reduce()
    model.train()
    return cm.compute()


def resolve_amp(amp, device):
    """--amp -> (name, autocast dtype or None); auto = bf16 on GPUs that support it, else fp16; off on CPU."""
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    return amp, {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def save(obj, path):
    """Write, then rename: a kill at any moment leaves the previous file intact."""
    tmp = Path(f"{path}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A training checkpoint, or one clear error saying why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} not found") from None
    except Exception as e:  # torch.load's own messages are long and suggest unsafe loading
        raise DataError(f"cannot load checkpoint {path}: not a PyTorch checkpoint ({type(e).__name__})") from None
    missing = [k for k in ("model", "optimizer", "scaler", "iter", "config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt


def main(args):
    # ---- distributed set-up: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if args.device.startswith("cuda") else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)

    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        run_flags = {k: getattr(args, k) for k in RUN_FLAGS}
        vars(args).update(ckpt["config"], **run_flags)
        log(f"resuming {args.resume} at iteration {ckpt['iter']}")
    if args.toy and master and not (Path(args.data) / "leftImg8bit").is_dir():
        log(f"generating the toy data set in {args.data}")
        make_toy_cityscapes(args.data)
    if ddp:
        dist.barrier()  # the toy set exists before any rank reads it
    if not args.data or not Path(args.data).is_dir():
        raise DataError(f"--data {args.data!r}: no such directory (give the Cityscapes root, or use --toy)")
    args.data = str(Path(args.data).resolve())  # stored in the checkpoint for evaluate.py
    assert args.batch_size % world == 0, f"--batch-size {args.batch_size} must be divisible by {world} GPUs"
    torch.manual_seed(args.seed + rank)

    # ---- data
    train_set = Cityscapes(args.data, "train", transform=TrainTransform(args.crop))
    val_set = Cityscapes(args.data, "val", transform=normalize)
    sampler = torch.utils.data.DistributedSampler(train_set, seed=args.seed) if ddp else None
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size // world, shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    iters_per_epoch = len(loader)
    assert iters_per_epoch > 0, f"{len(train_set)} training images are fewer than one batch of {args.batch_size}"
    iters = args.iters or args.epochs * iters_per_epoch

    # ---- model, objective, optimiser
    model_kwargs = dict(num_classes=19, backbone=args.backbone, norm=args.norm, channels=args.channels, dilation=args.dilation)
    pretrained = None if args.pretrained == "none" or ckpt else args.pretrained
    model = FoRNet(**model_kwargs, pretrained=pretrained).to(device)
    loss_fn = FoRNetLoss(num_classes=19)
    # Paper is silent on weight decay: applied to conv weights, not to norm parameters or biases.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    args.amp, amp_dtype = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # a no-op unless fp16
    it, best_miou = 0, 0.0
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DataError(f"cannot resume from {args.resume}: {str(e).splitlines()[0]}") from None
        it, best_miou = ckpt["iter"], ckpt.get("best_miou", 0.0)
    raw_model = model
    if ddp:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(name):
        save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
              "iter": it, "config": {**vars(args), "model": model_kwargs}, "best_miou": best_miou}, Path(args.out) / name)

    def run_validation():
        nonlocal best_miou
        result = validate(raw_model, val_set, device, amp_dtype, rank, world)
        log(f"val {it}/{iters} | mIoU {result['miou']:.4f} | pixel acc {result['acc']:.4f}")
        if master:
            if result["miou"] > best_miou:
                best_miou = result["miou"]
                checkpoint("best.pt")
            checkpoint("last.pt")

    if master:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    log(f"{len(train_set)} train / {len(val_set)} val images | {iters} iterations of {args.batch_size} "
        f"({iters / iters_per_epoch:.1f} epochs) on {world} × {device.type} | amp {args.amp}")

    # ---- the loop
    data = batches(loader, sampler, epoch=it // iters_per_epoch)
    model.train()
    t0, t_start, it_start = time.time(), time.time(), it
    while it < iters:
        lr = poly_lr(it, iters, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        image, target = next(data)  # (B, 3, crop, crop), (B, crop, crop)
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, sel = model(image)
        total, parts = loss_fn(logits, sel, target)  # float32 throughout
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at iteration {it}: total {total.item()}, "
                                     + ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items()))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        it += 1

        if it % args.log_every == 0 or it == iters:
            dt = time.time() - t0
            speed = args.log_every * args.batch_size / dt if it % args.log_every == 0 else float("nan")
            eta = (time.time() - t_start) / (it - it_start) * (iters - it)
            mem = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # GiB
            log(f"iter {it}/{iters} | loss {total.item():.4f} ("
                + " ".join(f"{k} {v.item():.4f}" for k, v in parts.items())
                + f") | lr {lr:.2e} | {speed:.1f} img/s | mem {mem:.1f} GiB | eta {eta / 60:.1f} min")
            t0 = time.time()
        if args.val_every and it % args.val_every == 0 and it < iters:
            run_validation()
        elif master and it % args.save_every == 0:
            checkpoint("last.pt")
    run_validation()
    log(f"done: best val mIoU {best_miou:.4f}, checkpoints in {args.out}/")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args())
    except (DataError, FloatingPointError) as e:
        # A DataLoader worker re-raises with the worker's traceback in the message; our line is the last.
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1])
