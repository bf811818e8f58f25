"""Train FoR-Net on Cityscapes with the paper's recipe (Sec. 4.1), in one flat loop.

    python train.py --data /path/to/cityscapes                       # one GPU: the paper's recipe
    torchrun --nproc_per_node=4 train.py --data /path/to/cityscapes   # several GPUs (DDP), the same objective
    python train.py --resume runs/fornet/last.pt                      # continue exactly where the run stopped
    python train.py --toy                                             # synthetic demo, CPU, a few minutes
    python train.py --benchmark [--compile] [--data ...]              # cost per step vs DeepLabV3; no data needed

Recipe (Sec. 3.1, 4.1): ResNet-101 with GroupNorm, AdamW lr 1e-4, batch 8, crop 768, 200 epochs, random
scale / crop / flip, poly schedule, CE + Dice + selector loss. Our choices where the paper is silent (README):
torchvision's ImageNet weights to start from, poly power 0.9, weight decay 0.01, scale range 0.5-2, mixed
precision (bf16, or fp16 on older GPUs).
Writes into --out: log.jsonl (a JSON record per log line and per validation), last.pt, best.pt.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as TF
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from fornet import (CLASSES, Cityscapes, ConfusionMatrix, DataError, FoRNet, FoRNetLoss, TrainTransform, environment,
                    load_checkpoint, make_toy_cityscapes, normalize, peak_memory, resolve_amp, save_checkpoint)

MODEL, LOSS = FoRNet.__init__.__kwdefaults__, FoRNetLoss.__init__.__kwdefaults__  # the paper's values live there
# --toy changes these defaults (flags given on the command line still win): a ResNet-50 with a
# narrow head on a generated 128×256 data set, small enough for a 2-core CPU in a few minutes.
# From scratch, poles, signs, lights and people appear only after ~300 iterations at lr 2e-3: 400 leave a margin.
TOY = dict(data="runs/toy/data", out="runs/toy", backbone="resnet50", pretrained="none", channels=64, crop=96,
           batch_size=4, iters=400, lr=2e-3, workers=0, log_every=50, val_every=0)
CITYSCAPES_TRAIN = 2975  # images in the fine train split: what --benchmark projects the recipe's duration with
VAL_PROGRESS = 100  # a progress line every this many validation images


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="Cityscapes root, holding leftImg8bit/ and gtFine/")
    g.add_argument("--toy", action="store_true", help="generate a synthetic Cityscapes-layout set, train a small model")
    g.add_argument("--crop", type=int, default=768, help="square training crop (Sec. 4.1: 768)")
    g.add_argument("--scale", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                   help="random scale range (paper is silent; 0.5 2.0, the common practice)")
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=("resnet101", "resnet50"), default="resnet101", help="Sec. 3.1: resnet101")
    g.add_argument("--pretrained", default="imagenet",
                   help="imagenet (torchvision's weights, downloaded once) | none (from scratch) | PATH to a .pth")
    g.add_argument("--norm", choices=("gn", "bn"), default="gn", help="gn = the paper; bn = deviation for BN weights")
    g.add_argument("--channels", type=int, default=MODEL["channels"], help="width C of the head")
    g.add_argument("--dilation", type=int, default=MODEL["dilation"], help="7×7 branch dilation (Sec. 4.5: 1-16)")
    g.add_argument("--ratios", type=float, nargs=4, default=list(MODEL["ratios"]), metavar="R",
                   help="Top-K ratio of each branch; 1 1 1 1 switches selection off")
    g.add_argument("--no-straight-through", dest="straight_through", action="store_false",
                   help="M is a constant: only L_sel trains the selector")
    g = p.add_argument_group("objective, Eq. (10)")
    g.add_argument("--lambda-dice", type=float, default=LOSS["lambda_dice"], help="λ1; 0 removes L_Dice")
    g.add_argument("--lambda-sel", type=float, default=LOSS["lambda_sel"], help="λ2; 0 removes L_sel")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=0, help="iterations; 0 = --epochs worth of them")
    g.add_argument("--epochs", type=int, default=200, help="used when --iters is 0 (Sec. 4.1: 200)")
    g.add_argument("--batch-size", type=int, default=8, help="total over all GPUs (Sec. 4.1: 8)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW initial learning rate (Sec. 4.1: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-2,
                   help="AdamW weight decay on conv weights (paper is silent; PyTorch's default 0.01)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="auto = bf16 on GPUs of compute capability ≥ 8.0, fp16 on older ones, off on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (the loss and validation stay eager)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="model and images in channels-last memory format")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/fornet", help="directory for log.jsonl, last.pt and best.pt")
    g.add_argument("--val-every", type=int, default=2000,
                   help="validate (and keep best.pt) every N iterations; 0 = only at the end")
    g.add_argument("--val-limit", type=int, default=0, help="validate on the first N val images only (0 = all)")
    g.add_argument("--save-every", type=int, default=1000, help="write last.pt every N iterations")
    g.add_argument("--log-every", type=int, default=20, help="a log line and a log.jsonl record every N iterations")
    g.add_argument("--resume", help="continue the run in this last.pt; flags given here win over the stored ones")
    g.add_argument("--seed", type=int, default=0, help="model init, data order and augmentation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", action="store_true", help="time training steps on random data, vs DeepLabV3")
    g.add_argument("--bench-iters", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    args = p.parse_args(argv)
    if args.dilation < 1 or not all(0 < r <= 1 for r in args.ratios):
        p.error("--dilation must be ≥ 1 (Table 2's '0 (no dilation)' is --dilation 1) and each of --ratios in (0, 1]")
    for action in p._actions:  # parsed again without defaults: the flags this command line gives
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(p.parse_args(argv)))
    if args.toy:
        vars(args).update({k: v for k, v in TOY.items() if k not in args.explicit})
    return args


def poly_lr(it, iters, base_lr, power=0.9):
    """Poly schedule (Sec. 4.1): lr = base_lr · (1 - it/iters)^0.9 (the power is our choice; the paper gives none)."""
    return base_lr * (1 - it / iters) ** power


class Stream(torch.utils.data.Sampler):
    """The training order, endless, from iteration `start` on: yields (image index, augmentation seed).

    Epoch e is a permutation drawn from (seed, e) with one augmentation seed per position, so a
    resumed run sees exactly what the uninterrupted run would have. Iteration j of an epoch takes
    positions j·B ... (j+1)·B - 1 (B the global batch; an epoch's last incomplete batch is dropped)
    and rank r of `world` the positions ≡ r mod world among them: the same images, with the same
    augmentation, whatever the number of GPUs.
    """

    def __init__(self, n, batch, *, seed, start=0, rank=0, world=1):
        self.n, self.batch, self.seed, self.start, self.rank, self.world = n, batch, seed, start, rank, world
        self.iters_per_epoch = n // batch

    def __iter__(self):
        epoch, j = divmod(self.start, self.iters_per_epoch)
        while True:
            g = torch.Generator().manual_seed(1_000_003 * self.seed + epoch)
            order, seeds = torch.randperm(self.n, generator=g), torch.randint(2**62, (self.n,), generator=g)
            for p in range(j * self.batch + self.rank, self.iters_per_epoch * self.batch, self.world):
                yield order[p].item(), seeds[p].item()
            epoch, j = epoch + 1, 0


class Seeded(torch.utils.data.Dataset):
    """dataset[(i, seed)] = dataset[i] with its random augmentation drawn from `seed` (in any worker)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        i, seed = key
        with torch.random.fork_rng(devices=[]):  # the CPU generator, restored afterwards
            torch.default_generator.manual_seed(seed)
            return self.dataset[i]


def make_optimizer(model, lr, weight_decay, fused=False):
    """AdamW (Sec. 4.1). Paper is silent on weight decay (--weight-decay, 0.01: PyTorch's default) applied to conv
    weights, not to norm parameters and biases, and on betas and eps (PyTorch's defaults)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def train_step(model, loss_of, optimizer, scaler, image, target, amp_dtype, it=0):
    """One step: forward under autocast (amp_dtype None = float32), loss_of(output, target) -> (total, parts) in
    float32, backward through the fp16 loss scaler (a no-op otherwise), optimizer step. -> (total, parts)"""
    with torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(image)
    total, parts = loss_of(out, target)
    if not torch.isfinite(total):  # the one host sync per step
        raise FloatingPointError(f"non-finite loss at iteration {it}: total {total.item()}, "
                                 + ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items()))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return total, parts


@torch.no_grad()
def validate(model, dataset, device, rank=0, world=1, workers=0, log=print):
    """Whole-image mIoU on `dataset` in float32 (as evaluate.py's default), each rank taking every world-th image.
    Paper is silent on validation: whole image, no test-time augmentation, every --val-every iterations.
    -> ConfusionMatrix.compute()'s dict + "images", "seconds". Prints progress every VAL_PROGRESS images."""
    model.eval()
    cm, t0, n = ConfusionMatrix(), time.time(), len(dataset)
    mine = torch.utils.data.Subset(dataset, range(rank, n, world))
    for i, (image, target) in enumerate(torch.utils.data.DataLoader(mine, batch_size=None, num_workers=workers), 1):
        logits, _ = model(normalize(image[None].to(device)))  # (1, N, H, W)   image (3, H, W) uint8
        cm.update(logits.argmax(1)[0], target.to(device))
        done = i * world  # about: rank 0's count, times the ranks
        if i % max(1, VAL_PROGRESS // world) == 0 and done < n:
            elapsed = time.time() - t0
            log(f"  validating: {done}/{n} images | {elapsed:.0f} s | ~{elapsed / done * (n - done):.0f} s left")
    cm.reduce()
    model.train()
    return {**cm.compute(), "images": n, "seconds": time.time() - t0}


def open_log(out, resume=None, it=0):
    """<out>/log.jsonl, opened for appending. On --resume it first gets the records up to the checkpoint's iteration
    from the log.jsonl beside the checkpoint: those after it were written by the run that died after its last
    checkpoint and are written again, so every iteration appears once."""
    path, source, kept = Path(out) / "log.jsonl", Path(resume or "").parent / "log.jsonl", []
    for line in source.read_text().splitlines() if resume and source.exists() else []:
        try:
            kept += [line + "\n"] if json.loads(line)["iter"] <= it else []
        except (ValueError, KeyError, TypeError):  # the line a kill cut short
            pass
    Path(f"{path}.tmp").write_text("".join(kept))
    os.replace(f"{path}.tmp", path)
    return open(path, "a")


def benchmark(args, device):
    """Training steps on random data, FoR-Net (our loss) vs torchvision's DeepLabV3 (cross-entropy), same settings."""
    B, size = args.batch_size, (args.crop, args.crop)
    amp, amp_dtype = resolve_amp(args.amp, device)
    deeplab = getattr(torchvision.models.segmentation, f"deeplabv3_{args.backbone}")
    fornet_loss = FoRNetLoss(lambda_dice=args.lambda_dice, lambda_sel=args.lambda_sel)
    models = [(f"FoR-Net ({args.backbone})", lambda: FoRNet(**model_kwargs(args)), lambda out, y: fornet_loss(*out, y)),
              (f"DeepLabV3 ({args.backbone})", lambda: deeplab(weights=None, weights_backbone=None, num_classes=19,
                                                               aux_loss=False),
               lambda out, y: (TF.cross_entropy(out["out"], y, ignore_index=255), {}))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"{environment(device)}\n{B}×3×{size[0]}×{size[1]} | amp {amp} | compile {args.compile} | channels-last "
          f"{args.channels_last} | 3 warm-up + {args.bench_iters} timed steps\n{'model':<22}{'img/s':>8}{'ms/step':>10}"
          f"{'1st step s':>11}{'peak GiB':>10}{'TFLOP/s':>9}{f'{args.epochs} epochs (h)':>16}")
    rows = []
    for name, build, loss_of in models:
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            build()(torch.empty(B, 3, *size))
        model = build().to(device, memory_format=memory_format).train()
        step_model = torch.compile(model) if args.compile else model
        optimizer = make_optimizer(model, 1e-4, args.weight_decay, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        x = normalize(torch.randint(0, 256, (B, 3, *size), dtype=torch.uint8, device=device))
        x = x.contiguous(memory_format=memory_format)
        y = torch.randint(0, 19, (B, *size), device=device)
        t0 = time.perf_counter()
        for i in range(3 + args.bench_iters):
            if i == 1:
                sync()
                first = time.perf_counter() - t0  # with --compile: the compilation
            if i == 3:
                sync()
                peak_memory(device, reset=True)
                t0 = time.perf_counter()
            train_step(step_model, loss_of, optimizer, scaler, x, y, amp_dtype, i)
        sync()
        step = (time.perf_counter() - t0) / args.bench_iters
        tflops = 3 * counter.get_total_flops() / step / 1e12  # training ≈ 3 × the forward pass's FLOPs
        hours = args.epochs * CITYSCAPES_TRAIN / (B / step) / 3600
        rows.append((name, B / step, 1e3 * step, first, peak_memory(device), tflops, hours))
        print(f"{name:<22}{B / step:>8.2f}{1e3 * step:>10.0f}{first:>11.1f}{rows[-1][4]:>10.2f}{tflops:>9.2f}"
              f"{hours:>16.1f}")
        del model, step_model, optimizer
    print(f"step time FoR-Net / DeepLabV3: {rows[0][2] / rows[1][2]:.2f}")
    if args.data:  # the data pipeline in this one process: what one --workers process delivers
        train_set = Cityscapes(args.data, "train")
        n = min(len(train_set), 20)
        for name, transform in (("decode", None), ("decode + augment", TrainTransform(args.crop, tuple(args.scale)))):
            train_set.transform, t0 = transform, time.perf_counter()
            for i in range(n):
                train_set[i]
            per_worker = n / (time.perf_counter() - t0)
            print(f"loader, {name}: {per_worker:.1f} img/s per worker")
        print(f"--workers needed to feed {rows[0][1]:.1f} img/s: {math.ceil(rows[0][1] / per_worker)}")
    return rows


def model_kwargs(args):
    """The FoRNet keyword arguments of a run (stored as config["model"]; evaluate.py rebuilds the model from them)."""
    return dict(num_classes=19, backbone=args.backbone, norm=args.norm, channels=args.channels, dilation=args.dilation,
                ratios=tuple(args.ratios), straight_through=args.straight_through)


def main(args):
    if args.resume:  # the stored flags, except those given on this command line
        ckpt = load_checkpoint(args.resume)
        if "optimizer" not in ckpt:
            raise DataError(f"{args.resume} holds weights only (a best.pt): --resume needs the run's last.pt")
        vars(args).update({k: v for k, v in ckpt["config"].items() if k in vars(args) and k not in args.explicit})
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise DataError(f"--batch-size {args.batch_size} is the total over all GPUs: it must be divisible by {world}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: no GPU visible (use --device cpu)")
    torch.backends.cudnn.benchmark = True  # fixed-size crops: cuDNN picks its fastest kernels once
    if args.benchmark:
        return benchmark(args, torch.device(args.device))

    # ---- distributed set-up: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if args.device.startswith("cuda") else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, device = 0, torch.device(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    it = ckpt["iter"] if args.resume else 0
    if master:
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            log_file = open_log(args.out, args.resume, it)
        except OSError as e:
            raise DataError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None

    def record(kind, **fields):  # one line of log.jsonl, flushed: a kill -9 loses at most the line being written
        if master:
            log_file.write(json.dumps({"type": kind, **fields, "time": round(time.time(), 3)}) + "\n")
            log_file.flush()

    if args.resume:
        log(f"resuming {args.resume} at iteration {it}")
    if args.toy and master and not (Path(args.data) / "leftImg8bit").is_dir():
        log(f"generating the toy data set in {args.data}")
        make_toy_cityscapes(args.data)
    if ddp:
        dist.barrier()  # the toy set exists before any rank reads it
    if not args.data or not Path(args.data).is_dir():
        raise DataError(f"--data {args.data!r}: no such directory (give the Cityscapes root, or use --toy)")
    args.data = str(Path(args.data).resolve())  # stored in the checkpoint for evaluate.py
    torch.manual_seed(args.seed)

    # ---- data: uint8 images and targets from the workers, normalised on the device
    train_set = Cityscapes(args.data, "train", transform=TrainTransform(args.crop, tuple(args.scale)))
    val_set = Cityscapes(args.data, "val")
    if args.val_limit:
        val_set = torch.utils.data.Subset(val_set, range(min(args.val_limit, len(val_set))))
    iters_per_epoch = len(train_set) // args.batch_size
    if iters_per_epoch == 0:
        raise DataError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    iters = args.iters or args.epochs * iters_per_epoch
    if it >= iters:
        log(f"{args.resume} is at iteration {it} of {iters}: nothing left to do (give a larger --iters to go on)")
        return
    stream = Stream(len(train_set), args.batch_size, seed=args.seed, start=it, rank=rank, world=world)
    loader = torch.utils.data.DataLoader(Seeded(train_set), batch_size=args.batch_size // world, sampler=stream,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")

    # ---- model, objective, optimiser
    pretrained = None if args.pretrained == "none" or args.resume else args.pretrained
    first_on_machine = os.environ.get("LOCAL_RANK", "0") == "0"
    if ddp and not first_on_machine:
        dist.barrier()  # one process per machine downloads the ImageNet weights into torch's cache first
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = FoRNet(**model_kwargs(args), pretrained=pretrained).to(device, memory_format=memory_format)
    if ddp and first_on_machine:
        dist.barrier()
    loss_fn = FoRNetLoss(num_classes=19, lambda_dice=args.lambda_dice, lambda_sel=args.lambda_sel)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, fused=device.type == "cuda")
    amp, amp_dtype = resolve_amp(args.amp, device)  # args.amp keeps the request ("auto"): a resume decides anew
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # a no-op unless fp16
    best_miou = -math.inf  # the first validation always writes best.pt
    if args.resume:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:  # empty when the run had no fp16 loss scaling
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DataError(f"cannot resume from {args.resume}: {str(e).splitlines()[0]}") from None
        best_miou = ckpt.get("best_miou", -math.inf)
    raw_model = model  # what is saved and validated: no "module." or "_orig_mod." in its state-dict names
    if ddp:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    config = {**{k: v for k, v in vars(args).items() if k != "explicit"}, "model": model_kwargs(args)}
    val_seconds = None  # the last validation's duration: the ETA counts the ones still to come with it

    def run_validation():
        nonlocal best_miou, val_seconds
        peak_memory(device, reset=True)
        result = validate(raw_model, val_set, device, rank, world, args.workers, log)
        val_seconds, mem = result["seconds"], peak_memory(device)
        log(f"val {it}/{iters} | mIoU {result['miou']:.4f} | pixel acc {result['acc']:.4f} | {result['images']} "
            f"images in {val_seconds:.0f} s | mem {mem:.1f} GiB")
        record("val", iter=it, miou=result["miou"], acc=result["acc"], images=result["images"], seconds=val_seconds,
               mem_gib=mem, iou={c: None if math.isnan(v) else v for c, v in zip(CLASSES, result["iou"].tolist())})
        if master:
            if result["miou"] > best_miou:  # best.pt: what inference needs, no optimizer state
                best_miou = result["miou"]
                save_checkpoint({"model": raw_model.state_dict(), "config": config, "iter": it, "miou": best_miou},
                                Path(args.out) / "best.pt")
            save_last()
        peak_memory(device, reset=True)

    def save_last():  # last.pt: the full training state, for --resume
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "iter": it, "config": config, "best_miou": best_miou},
                        Path(args.out) / "last.pt")

    log(f"{len(train_set)} train / {len(val_set)} val images | {iters} iterations of {args.batch_size} "
        f"({iters / iters_per_epoch:.1f} epochs) on {world} × {device.type} | amp {amp} | log {args.out}/log.jsonl")
    record("run", iter=it, iters=iters, world=world, device=str(device), amp=amp, environment=environment(device),
           config=config)

    # ---- the loop
    data = iter(loader)
    model.train()
    loss_of = lambda out, y: loss_fn(*out, y)  # noqa: E731
    sums, wait, train_time, it_start, it_log = 0, 0.0, 0.0, it, it  # sums: loss terms since the last log line
    peak_memory(device, reset=True)
    t_log = time.time()
    while it < iters:
        lr = poly_lr(it, iters, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_data = time.time()
        image, target = next(data)  # (B, 3, crop, crop) uint8, (B, crop, crop) uint8
        wait += time.time() - t_data
        image = normalize(image.to(device, non_blocking=True)).contiguous(memory_format=memory_format)  # float32
        target = target.to(device, non_blocking=True).long()
        total, parts = train_step(model, loss_of, optimizer, scaler, image, target, amp_dtype, it)
        sums = sums + torch.stack([total.detach(), *parts.values()])  # (4,) on the device: no host sync
        it += 1

        if it % args.log_every == 0 or it == iters:
            dt = time.time() - t_log
            train_time += dt
            terms = dict(zip(["loss", *parts], (sums / (it - it_log)).tolist()))  # means over the interval
            # validations to come: at the multiples of --val-every in [it, iters), and the final one
            vals_left = 1 + ((iters - 1) // args.val_every - (it - 1) // args.val_every if args.val_every else 0)
            eta = train_time / (it - it_start) * (iters - it)
            hm = lambda s: f"{int(s // 3600)}:{int(s % 3600 // 60):02d}"  # noqa: E731
            eta = hm(eta + vals_left * val_seconds) if val_seconds is not None else f"{hm(eta)} + {vals_left} val"
            fields = dict(iter=it, epoch=it / iters_per_epoch, lr=lr, **terms,
                          img_s=(it - it_log) * args.batch_size / dt, data_wait=wait / dt, mem_gib=peak_memory(device))
            log(f"iter {it}/{iters} | epoch {fields['epoch']:.1f} | loss {terms['loss']:.4f} ("
                + " ".join(f"{k} {v:.4f}" for k, v in terms.items() if k != "loss")
                + f") | lr {lr:.2e} | {fields['img_s']:.1f} img/s | data wait {fields['data_wait']:.0%} | "
                f"mem {fields['mem_gib']:.1f} GiB | eta {eta}")
            record("train", **fields)
            peak_memory(device, reset=True)
            sums, wait, it_log, t_log = 0, 0.0, it, time.time()
        paused = time.time()  # validation and checkpoints do not count as training time
        if args.val_every and it % args.val_every == 0 and it < iters:
            run_validation()
        elif master and it % args.save_every == 0:
            save_last()
        t_log += time.time() - paused
    run_validation()
    log(f"done: best val mIoU {best_miou:.4f}, checkpoints and log.jsonl in {args.out}/")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args())
    except (DataError, FloatingPointError) as e:
        # A DataLoader worker re-raises with the worker's traceback in the message; our line is the last.
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1])
