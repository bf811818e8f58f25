"""Train FoR-Net on Cityscapes with the paper's recipe (Sec. 4.1), in one flat loop.

    python train.py --data /path/to/cityscapes                       # one GPU: the paper's recipe
    torchrun --nproc_per_node=4 train.py --data /path/to/cityscapes   # several GPUs (DDP), the same objective
    python train.py --resume runs/fornet/last.pt                      # continue exactly where the run stopped
    python train.py --toy                                             # synthetic demo, CPU, a few minutes

Recipe (Sec. 3.1, 4.1): ResNet-101 with GroupNorm, AdamW lr 1e-4, batch 8, crop 768, 200 epochs, random
scale / crop / flip, poly schedule, CE + Dice + selector loss; where the paper is silent, the flags' defaults
(README, "Choices and deviations"). Writes log.jsonl (a JSON record per log line and validation), last.pt and
best.pt into --out, never into an --out that holds another run; --tensorboard adds the curves. Ctrl-C or SIGTERM
stops it after the step in flight, with last.pt written. Costs: bench.py.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from fornet import (CLASSES, Cityscapes, ConfusionMatrix, DataError, FoRNet, FoRNetLoss, Seeded, Stream, TrainTransform,
                    all_ranks_sum, environment, first_line, get_device, load_checkpoint, make_toy_cityscapes, normalize,
                    peak_memory, resolve_amp, run_script, save_checkpoint)

# The model's and the loss's defaults: the paper's values (Sec. 3-4), and where it is silent the published code's.
MODEL, LOSS = FoRNet.__init__.__kwdefaults__, FoRNetLoss.__init__.__kwdefaults__
# --toy changes these defaults (flags given on the command line still win): a ResNet-50 with a
# narrow head on a generated 128×256 data set, small enough for a 2-core CPU in a few minutes.
# From scratch, poles, signs, lights and people appear only after ~300 iterations at lr 2e-3: 400 leave a margin.
TOY = dict(data="runs/toy/data", out="runs/toy", backbone="resnet50", pretrained="none", channels=64, crop=96,
           batch_size=4, iters=400, lr=2e-3, workers=0, log_every=50, val_every=0)
VAL_PROGRESS = 100  # a progress line every this many validation images
TB_TRAIN = ("loss", "ce", "dice", "sel", "lr", "img_s", "data_wait", "mem_gib")  # a log line's TensorBoard scalars
RUN_FILES = ("last.pt", "best.pt", "log.jsonl")  # what a run writes into --out
# fp16: GradScaler halves its scale at each skipped step; this many in a row (from its start at 2^16: below 2^-8)
# mean the loss overflows at any scale. One overflow now and then, when the scale has grown, is routine.
MAX_SKIPPED = 25


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="Cityscapes root, holding leftImg8bit/ and gtFine/")
    g.add_argument("--toy", action="store_true", help="generate a synthetic Cityscapes-layout set, train a small model")
    g.add_argument("--crop", type=int, default=768, help="square training crop (Sec. 4.1: 768)")
    g.add_argument("--scale", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                   help="random scale range (Paper is silent: 0.5 2.0, the common practice)")
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=("resnet101", "resnet50"), default="resnet101", help="Sec. 3.1: resnet101")
    g.add_argument("--pretrained", default="imagenet",
                   help="imagenet (trained with --norm's layers: GroupNorm weights from OpenMMLab, BatchNorm ones "
                        "from torchvision; downloaded once) | torchvision (BatchNorm-trained, also into GroupNorm) | "
                        "none (from scratch) | PATH to a .pth trained on RGB input with ImageNet mean/std")
    g.add_argument("--norm", choices=("gn", "bn"), default="gn",
                   help="gn: Sec. 3.1; bn: ≠ paper, as the published model code, for BatchNorm weights")
    g.add_argument("--channels", type=int, default=MODEL["channels"],
                   help="width C of F (Paper is silent: 256, as the published model code)")
    g.add_argument("--dilation", type=int, default=MODEL["dilation"], help="7×7 branch dilation (Sec. 4.5: 1-16)")
    g.add_argument("--ratios", type=float, nargs=4, default=list(MODEL["ratios"]), metavar="R",
                   help="Top-K ratio of each branch (Paper is silent: 0.1 0.2 0.3 0.4, as the published model code); "
                        "1 1 1 1 keeps every location: no selection, the same gradient path")
    g.add_argument("--no-straight-through", dest="straight_through", action="store_false",
                   help="M a constant: only L_sel trains the selector (Paper is silent; by default L_CE and L_Dice "
                        "reach it too, as the published model code)")
    g = p.add_argument_group("objective, Eq. (10)")
    g.add_argument("--lambda-dice", type=float, default=LOSS["lambda_dice"],
                   help="λ1 (Paper is silent: 1.0, as the published model code); 0 removes L_Dice")
    g.add_argument("--lambda-sel", type=float, default=LOSS["lambda_sel"],
                   help="λ2 (Paper is silent: 0.5, as the published model code); 0 removes L_sel")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=0, help="iterations; 0 = --epochs worth of them")
    g.add_argument("--epochs", type=int, default=200, help="used when --iters is 0 (Sec. 4.1: 200)")
    g.add_argument("--batch-size", type=int, default=8, help="total over all GPUs (Sec. 4.1: 8)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW initial learning rate (Sec. 4.1: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-2,
                   help="AdamW weight decay on conv weights (Paper is silent: 0.01, PyTorch's default)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="auto = bf16 on GPUs of compute capability ≥ 8.0, fp16 on older ones, off on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (the loss and validation stay eager)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="model and images in channels-last memory format")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/fornet", help="directory for log.jsonl, last.pt and best.pt")
    g.add_argument("--val-every", type=int, default=2000,
                   help="validate (and keep best.pt) every N iterations; 0 = only at the end (Paper is silent)")
    g.add_argument("--val-limit", type=int, default=0, help="validate on the first N val images only (0 = all)")
    g.add_argument("--save-every", type=int, default=1000, help="write last.pt every N iterations")
    g.add_argument("--log-every", type=int, default=20, help="a log line and a log.jsonl record every N iterations")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the log's curves for TensorBoard into --out (pip install tensorboard)")
    g.add_argument("--resume", help="continue the run in this last.pt; flags given here win over the stored ones")
    g.add_argument("--seed", type=int, default=0, help="model init, data order and augmentation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    args = p.parse_args(argv)
    if args.dilation < 1 or not all(0 < r <= 1 for r in args.ratios):
        p.error("--dilation must be ≥ 1 (Sec. 4.5's '0 (no dilation)' is --dilation 1) and each of --ratios in (0, 1]")
    for action in p._actions:  # parsed again without defaults: the flags this command line gives
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(p.parse_args(argv)))
    if args.toy:
        vars(args).update({k: v for k, v in TOY.items() if k not in args.explicit})
    return args


def poly_lr(it, iters, base_lr, power=0.9):
    """Poly schedule (Sec. 4.1): lr = base_lr · (1 - it/iters)^power for the step after `it`. Paper is silent on the
    power: 0.9, the common practice."""
    return base_lr * (1 - it / iters) ** power


def make_optimizer(model, lr, weight_decay, fused=False):
    """AdamW (Sec. 4.1). Paper is silent on the weight decay: --weight-decay (0.01, PyTorch's default) on conv
    weights, none on norm parameters and biases; and on betas and eps: PyTorch's defaults (0.9, 0.999), 1e-8."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def train_step(model, loss_of, optimizer, scaler, image, target, amp_dtype):
    """One step: forward under autocast (amp_dtype None = float32), loss_of(output, target) -> (total, parts) in
    float32, backward through the fp16 loss scaler (a no-op otherwise), optimizer step.

    -> (total, parts, skipped), device tensors: with a fused optimizer (on GPUs) nothing here waits for the GPU.
    skipped is 1 when the fp16 scaler skipped the step because its gradients overflowed (inf/NaN; it then halves
    its scale), else 0.
    """
    with torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(image)
    total, parts = loss_of(out, target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    # GradScaler's scale as a device tensor (get_scale() would wait for the GPU); None unless fp16.
    scale = scaler._get_scale_async().clone() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    skipped = scaler._get_scale_async() < scale if scaler.is_enabled() else torch.zeros((), device=total.device)
    return total, parts, skipped.float()


@torch.no_grad()
def validate(model, dataset, device, rank=0, world=1, workers=0, log=print):
    """Whole-image mIoU on `dataset` in float32 (as evaluate.py's default), each rank taking every world-th image.
    Paper is silent on validation: whole image, no test-time augmentation, every --val-every iterations.
    -> ConfusionMatrix.compute()'s dict + "images", "seconds". Prints progress every VAL_PROGRESS images."""
    model.eval()
    cm, t0, n = ConfusionMatrix(), time.time(), len(dataset)
    mine = torch.utils.data.Subset(dataset, range(rank, n, world))
    batches = iter(torch.utils.data.DataLoader(mine, batch_size=None, num_workers=workers, worker_init_fn=quiet_worker))
    try:
        for i, (image, target) in enumerate(batches, 1):
            logits, _ = model(normalize(image[None].to(device)))  # (1, N, H, W)   image (3, H, W) uint8
            cm.update(logits.argmax(1)[0], target.to(device))
            done = i * world  # about: rank 0's count, times the ranks
            if i % max(1, VAL_PROGRESS // world) == 0 and done < n:
                elapsed = time.time() - t0
                log(f"  validating: {done}/{n} images | {elapsed:.0f} s | ~{elapsed / done * (n - done):.0f} s left")
    finally:
        end_workers(batches)
    cm.mat = all_ranks_sum(cm.mat.to(device))[0].cpu()  # the split's matrix, on every rank
    model.train()
    return {**cm.compute(), "images": n, "seconds": time.time() - t0}


def model_kwargs(args):
    """The FoRNet keyword arguments of a run (stored as config["model"]; evaluate.py rebuilds the model from them)."""
    return dict(num_classes=19, backbone=args.backbone, norm=args.norm, channels=args.channels, dilation=args.dilation,
                ratios=tuple(args.ratios), straight_through=args.straight_through)


# ---------------------------------------------------------------- set-up: resume, GPUs, output, data, model


def resume_state(args):
    """--resume: the checkpoint (None without), its flags copied into args except those this command line gives."""
    if not args.resume:
        return None
    ckpt = load_checkpoint(args.resume)
    if "optimizer" not in ckpt:
        raise DataError(f"{args.resume} holds weights only (a best.pt): --resume needs the run's last.pt")
    vars(args).update({k: v for k, v in ckpt["config"].items() if k in vars(args) and k not in args.explicit})
    return ckpt


def refuse_to_overwrite(args):
    """DataError if --out cannot be written, or holds a run that this one would overwrite: any but the one being
    resumed. Every rank checks, before anything is written."""
    out = Path(args.out)
    existing = next(p for p in (out, *out.parents) if p.exists())  # the folder that will hold --out
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise DataError(f"--out {out}: cannot write there ({existing} is not a writable folder)")
    found = [name for name in RUN_FILES if (out / name).exists() and (out / name).stat().st_size > 0]
    if not found or (args.resume and out.resolve() == Path(args.resume).resolve().parent):
        return
    try:
        at = load_checkpoint(out / found[0])["iter"] if found[0].endswith(".pt") else \
            json.loads((out / found[0]).read_text().splitlines()[-1])["iter"]
    except (DataError, ValueError, IndexError, KeyError):  # unreadable, empty, or a line cut short
        at = "?"
    way = f"continue it with --resume {out / 'last.pt'}" if "last.pt" in found else \
        f"it wrote no last.pt to resume: delete {', '.join(str(out / name) for name in found)}"
    raise DataError(f"--out {out} already holds a run ({found[0]} at iteration {at}): {way}, or pass another --out")


def setup_distributed(args):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: one process per GPU. -> (ddp, rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise DataError(f"--batch-size {args.batch_size} is the total over all GPUs: it must be divisible by {world}")
    device = get_device(args.device)
    if "RANK" not in os.environ:
        return False, 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if device.type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), world, device


class RunLog:
    """What a run says: lines printed for the person watching, and <out>/log.jsonl, one JSON record per line, for the
    person who comes back later; with `tensorboard` (a SummaryWriter class) the same figures as TensorBoard scalars in
    <out>. Both flushed as written; only rank 0 speaks; a write that fails (a full disk) ends the run in one line.

    On --resume the new log.jsonl starts with the records up to the checkpoint's iteration from the log.jsonl beside
    the checkpoint: those after it, from a run that died after its last checkpoint, are written again, so every
    iteration appears once; TensorBoard hides them from its curves (purge_step)."""

    def __init__(self, out, master, resume=None, it=0, tensorboard=None):
        self.master, self.out, self.file, self.tb = master, Path(out or "."), None, None
        if not master:
            return
        self.path, source, kept = self.out / "log.jsonl", Path(resume or "").parent / "log.jsonl", []
        for line in source.read_text().splitlines() if resume and source.exists() else []:
            try:
                kept += [line + "\n"] if json.loads(line)["iter"] <= it else []
            except (ValueError, KeyError, TypeError):  # the line a kill cut short
                pass
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            Path(f"{self.path}.tmp").write_text("".join(kept))
            os.replace(f"{self.path}.tmp", self.path)
            self.file = open(self.path, "a")
            self.tb = tensorboard and tensorboard(self.out, purge_step=it + 1)  # hides points after `it` from before
        except OSError as e:
            raise DataError(f"--out {out}: cannot write there ({e.strerror or e})") from None

    def print(self, text):
        if self.master:
            print(text, flush=True)

    def record(self, kind, **fields):
        """A log.jsonl record (kind "run", "train", "val" or "stop"); "train" and "val" also as TensorBoard scalars."""
        if not self.master:
            return
        try:
            self.file.write(json.dumps({"type": kind, **fields, "time": round(time.time(), 3)}) + "\n")
            self.file.flush()  # a kill -9 loses at most the line being written
            if self.tb and kind in ("train", "val"):
                scalars = {f"{kind}/{k}": fields[k] for k in (TB_TRAIN if kind == "train" else ("miou", "acc"))}
                iou = fields.get("iou", {}).items()  # classes that never occurred (None) have no point
                scalars.update({f"val/iou/{c.replace(' ', '_')}": v for c, v in iou if v is not None})
                for tag, value in scalars.items():
                    self.tb.add_scalar(tag, value, fields["iter"])
                self.tb.flush()
        except OSError as e:
            name = os.fsdecode(e.filename) if e.filename else self.path  # TensorBoard's events file names itself
            raise DataError(f"cannot write {name}: {e.strerror or e}; {checkpoints_kept(self.out)}") from None

    def close(self):
        for f in (self.file, self.tb):
            try:
                f and f.close()
            except OSError:  # a write failed: `record` has said so
                pass


def summary_writer():
    """torch's TensorBoard SummaryWriter class, for --tensorboard: tensorboard is needed only then."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DataError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def checkpoints_kept(out):
    """What a failed write leaves in `out`, in words: each checkpoint that still loads, with its iteration."""
    kept = []
    for name in ("last.pt", "best.pt"):
        try:  # mmap: reads "iter" without reading the weights
            kept.append(f"{out / name} (iteration {torch.load(out / name, mmap=True, weights_only=True)['iter']})")
        except Exception:  # missing or unreadable: not kept
            pass
    return f"intact: {' and '.join(kept)}" if kept else "no checkpoint written yet"


class Stop:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, `docker stop`, `timeout`) while the run lasts; `restore` puts the
    previous handlers back. The first signal only sets `signum`: the loop stops after the step in flight (`requested`).
    A second one on one process ends the run at once (a save in flight leaves the previous file); under torchrun,
    which passes its own signal on to every rank, it changes nothing (torchrun kills the ranks 30 s later)."""

    def __init__(self, ddp, device, last, saved=None):
        self.signum, self.ddp, self.device, self.last, self.saved = None, ddp, device, last, saved  # saved: last's iter
        self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(self, signum, frame):
        if self.signum is None or self.ddp:
            self.signum = self.signum or signum
            return
        kept = f"{self.last} of iteration {self.saved} kept" if self.saved is not None else f"no {self.last} written"
        os.write(2, f"stopped at once by a second {signal.Signals(signum).name}: {kept}\n".encode())
        raise SystemExit(128 + signum)

    def requested(self, at_log_line):
        """The signal to stop on after this step, or None: on one process at once, with no wait for the GPU; under
        torchrun at log lines only, where the host waits anyway and the ranks agree (the largest signal number any
        received), so that all stop at the same iteration."""
        if not self.ddp:
            return self.signum
        if not at_log_line:
            return None
        flag = torch.tensor(self.signum or 0, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() or None

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def quiet_worker(worker_id):
    """Loader processes ignore SIGINT and SIGTERM (a terminal's Ctrl-C and SLURM's SIGTERM reach them too): the main
    process decides when to stop, and ends them through the loader (`end_workers`), not by a signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_workers(batches):
    """Ends the loader processes of the iterator `batches` now, also when a traceback keeps it alive: DataLoader's own
    shutdown (private); Python's exit would send them SIGTERM, which `quiet_worker` ignores."""
    getattr(batches, "_shutdown_workers", lambda: None)()


def make_data(args, it, rank, world, device, ddp):
    """-> (train_set, val_set, loader, iters, iters_per_epoch): uint8 crops from the loader processes, normalised
    later on the device; the loader's order continues at iteration `it` (`Stream`)."""
    if args.toy and rank == 0 and not (Path(args.data) / "leftImg8bit").is_dir():
        print(f"generating the toy data set in {args.data}")
        make_toy_cityscapes(args.data)
    if ddp:
        dist.barrier()  # the toy set exists before any rank reads it
    if not args.data or not Path(args.data).is_dir():
        raise DataError(f"--data {args.data!r}: no such directory (give the Cityscapes root, or use --toy)")
    args.data = str(Path(args.data).resolve())  # stored in the checkpoint for evaluate.py
    train_set = Cityscapes(args.data, "train", transform=TrainTransform(args.crop, tuple(args.scale)))
    val_set = Cityscapes(args.data, "val")
    if args.val_limit:
        val_set = torch.utils.data.Subset(val_set, range(min(args.val_limit, len(val_set))))
    iters_per_epoch = len(train_set) // args.batch_size
    if iters_per_epoch == 0:
        raise DataError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    stream = Stream(len(train_set), args.batch_size, seed=args.seed, start=it, rank=rank, world=world)
    loader = torch.utils.data.DataLoader(Seeded(train_set), batch_size=args.batch_size // world, sampler=stream,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=quiet_worker)
    return train_set, val_set, loader, args.iters or args.epochs * iters_per_epoch, iters_per_epoch


def make_model(args, ckpt, device, ddp, amp_dtype, memory_format):
    """-> (model, optimizer, scaler, best_miou), from scratch / ImageNet weights, or the state in `ckpt`."""
    pretrained = None if args.pretrained == "none" or ckpt else args.pretrained
    first_on_machine = os.environ.get("LOCAL_RANK", "0") == "0"
    if ddp and not first_on_machine:
        dist.barrier()  # one process per machine downloads the ImageNet weights into torch's cache first
    model = FoRNet(**model_kwargs(args), pretrained=pretrained)
    if ddp and first_on_machine:
        dist.barrier()
    if ddp and args.norm == "bn":  # batch statistics over all GPUs, as one GPU with the whole batch computes them
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if dist.get_rank() == 0:
            print(f"norm: BatchNorm -> SyncBatchNorm over {dist.get_world_size()} GPUs" if device.type == "cuda" else
                  "note: --norm bn without GPUs: SyncBatchNorm needs NCCL, so each process normalises over its own "
                  f"{args.batch_size // dist.get_world_size()} images, not the one-GPU objective")
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # a no-op unless fp16
    if not ckpt:
        return model, optimizer, scaler, -math.inf  # the first validation always writes best.pt
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run had no fp16 loss scaling
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DataError(f"cannot resume from {args.resume}: {first_line(e)}") from None
    return model, optimizer, scaler, ckpt.get("best_miou", -math.inf)


# ---------------------------------------------------------------- the loop's log lines, validation and checkpoints


class Interval:
    """The training steps since the last log line. Their loss terms stay on the device, a (5,) row per step (loss,
    ce, dice, sel, skipped), and reach the host at once only in `rows()`: at log lines, validations and checkpoints.
    Time spent in validation and checkpoints is left out (`pause`), so img/s and the ETA count training only."""

    def __init__(self, it, iters, iters_per_epoch, args, device):
        self.it_start, self.train_time = it, 0.0  # this process's first iteration; training seconds so far
        self.skipped_before = self.skipped_after = 0  # fp16 steps skipped in a row before / up to the end of it
        self.iters, self.iters_per_epoch, self.args, self.device = iters, iters_per_epoch, args, device
        self.reset(it)

    def reset(self, it):
        self.it, self.steps, self.wait, self.t0 = it, [], 0.0, time.time()  # the interval starts after iteration it
        self.skipped_before = self.skipped_after

    def add(self, total, parts, skipped):
        self.steps.append(torch.stack([total.detach(), *parts.values(), skipped]))  # (5,), no host sync

    def pause(self, seconds):
        self.t0 += seconds

    def rows(self):
        """The steps' rows on the host, and those of them the fp16 scaler did not skip. FloatingPointError for such
        a step whose loss is not finite (bf16, float32: its update made the weights non-finite), or when MAX_SKIPPED
        steps in a row were skipped."""
        rows = torch.stack(self.steps).tolist() if self.steps else []
        in_a_row = self.skipped_before
        for i, r in enumerate(rows):
            in_a_row = in_a_row + 1 if r[4] else 0
            if not r[4] and not all(map(math.isfinite, r)):
                raise FloatingPointError(f"non-finite loss at iteration {self.it + i + 1}: loss {r[0]:.4g} (ce "
                                         f"{r[1]:.4g}, dice {r[2]:.4g}, sel {r[3]:.4g}): resume from the last "
                                         "checkpoint with a lower --lr or --amp off")
            if in_a_row == MAX_SKIPPED:
                raise FloatingPointError(f"{MAX_SKIPPED} steps in a row up to iteration {self.it + i + 1} overflowed "
                                         "in fp16 and were skipped: use --amp bf16 (GPUs of compute capability ≥ "
                                         "8.0) or --amp off")
        self.skipped_after = in_a_row
        return rows, [r for r in rows if not r[4]]

    def log(self, log, it, lr, val_seconds):
        """The log line and log.jsonl "train" record of the interval that ends at iteration `it`; a new interval."""
        rows, kept = self.rows()
        dt = time.time() - self.t0
        self.train_time += dt
        means = torch.tensor(kept).mean(0).tolist() if kept else [math.nan] * 4  # nan: every step skipped
        terms = dict(zip(["loss", "ce", "dice", "sel"], means))
        # ETA: training time per iteration so far, plus the validations to come: at the multiples of --val-every in
        # [it, iters) and the final one, each timed by the last one (before the first, counted).
        iters, every = self.iters, self.args.val_every
        vals_left = 1 + ((iters - 1) // every - (it - 1) // every if every else 0)
        eta = self.train_time / (it - self.it_start) * (iters - it)
        hm = lambda s: f"{int(s // 3600)}:{int(s % 3600 // 60):02d}"  # noqa: E731
        eta = hm(eta + vals_left * val_seconds) if val_seconds is not None else f"{hm(eta)} + {vals_left} val"
        fields = dict(iter=it, epoch=it / self.iters_per_epoch, lr=lr, **terms, skipped=len(rows) - len(kept),
                      img_s=len(rows) * self.args.batch_size / dt, data_wait=self.wait / dt,
                      mem_gib=peak_memory(self.device))
        skipped = f" | fp16 skipped {fields['skipped']}" if fields["skipped"] else ""
        log.print(f"iter {it}/{iters} | epoch {fields['epoch']:.1f} | loss {terms['loss']:.4f} ("
                  + " ".join(f"{k} {terms[k]:.4f}" for k in ("ce", "dice", "sel"))
                  + f") | lr {lr:.2e} | {fields['img_s']:.1f} img/s | data wait {fields['data_wait']:.0%} | "
                  f"mem {fields['mem_gib']:.1f} GiB | eta {eta}{skipped}")
        log.record("train", **fields)
        peak_memory(self.device, reset=True)
        self.reset(it)


def log_validation(log, result, it, iters, device):
    mem = peak_memory(device)
    log.print(f"val {it}/{iters} | mIoU {result['miou']:.4f} | pixel acc {result['acc']:.4f} | {result['images']} "
              f"images in {result['seconds']:.0f} s | mem {mem:.1f} GiB")
    log.record("val", iter=it, miou=result["miou"], acc=result["acc"], images=result["images"],
               seconds=result["seconds"], mem_gib=mem,
               iou={c: None if math.isnan(v) else v for c, v in zip(CLASSES, result["iou"].tolist())})


def save(out, name, model, config, it, **extra):
    """<out>/best.pt (what inference needs: extra = miou) or <out>/last.pt (the full training state: extra =
    optimizer, scaler, best_miou); never with non-finite weights (`save_checkpoint`). A write that fails (a full
    disk, a vanished --out) ends the run in one line that names what is kept; nothing half-written is left."""
    try:
        save_checkpoint({"model": model.state_dict(), "config": config, "iter": it, **extra}, Path(out) / name)
    except OSError as e:
        raise DataError(f"cannot write {Path(out) / name} at iteration {it}: {e.strerror or e}; "
                        f"{checkpoints_kept(Path(out))}") from None


# ---------------------------------------------------------------- main


def main(args):
    ckpt = resume_state(args)
    writer = summary_writer() if args.tensorboard else None  # on every rank: a missing package stops all at once
    ddp, rank, world, device = setup_distributed(args)
    refuse_to_overwrite(args)  # on every rank, before anything is written
    torch.backends.cudnn.benchmark = True  # fixed-size crops: cuDNN picks its fastest kernels once
    it, master = ckpt["iter"] if ckpt else 0, rank == 0
    train_set, val_set, loader, iters, iters_per_epoch = make_data(args, it, rank, world, device, ddp)
    if it >= iters:  # a finished run, resumed
        if master:
            print(f"{args.resume} is at iteration {it} of {iters}: nothing left to do (give a larger --iters)")
        if ddp:
            dist.destroy_process_group()
        return
    amp, amp_dtype = resolve_amp(args.amp, device)  # args.amp keeps the request ("auto"): a resume decides anew
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)  # the model's initial weights
    raw_model, optimizer, scaler, best_miou = make_model(args, ckpt, device, ddp, amp_dtype, memory_format)
    log = RunLog(args.out, master, args.resume, it, writer)  # data and model are ready: a failed start leaves no log
    if ckpt:
        log.print(f"resuming {args.resume} at iteration {it}")
    model = raw_model  # raw_model is saved and validated: no "module." or "_orig_mod." in its state-dict names
    if ddp:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    loss_fn = FoRNetLoss(num_classes=19, lambda_dice=args.lambda_dice, lambda_sel=args.lambda_sel)
    loss_of = lambda out, y: loss_fn(*out, y)  # noqa: E731
    config = {**{k: v for k, v in vars(args).items() if k != "explicit"}, "model": model_kwargs(args)}
    log.print(f"{len(train_set)} train / {len(val_set)} val images | {iters} iterations of {args.batch_size} "
              f"({iters / iters_per_epoch:.1f} epochs) on {world} × {device.type} | amp {amp} | "
              f"log {args.out}/log.jsonl")
    log.record("run", iter=it, iters=iters, world=world, device=str(device), amp=amp,
               environment=environment(device), config=config)

    data, interval, val_seconds = iter(loader), Interval(it, iters, iters_per_epoch, args, device), None
    last = Path(args.out) / "last.pt"
    stop = Stop(ddp, device, last, it if last.exists() else None)  # SIGINT, SIGTERM: stop after the step in flight
    model.train()
    peak_memory(device, reset=True)
    try:
        while it < iters:
            lr = poly_lr(it, iters, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_data = time.time()
            image, target = next(data)  # (B, 3, crop, crop) uint8, (B, crop, crop) uint8
            interval.wait += time.time() - t_data
            image = normalize(image.to(device, non_blocking=True)).contiguous(memory_format=memory_format)  # float32
            target = target.to(device, non_blocking=True).long()
            interval.add(*train_step(model, loss_of, optimizer, scaler, image, target, amp_dtype))
            it += 1

            log_line = it % args.log_every == 0 or it == iters
            signum = stop.requested(log_line) if it < iters else None  # the last iteration ends the run anyway
            if log_line or signum:
                interval.log(log, it, lr, val_seconds)
            validating = it == iters or (args.val_every and it % args.val_every == 0)
            if not (validating or it % args.save_every == 0 or signum):
                continue
            interval.rows()  # stops here, not in a checkpoint, if a step since the last log line diverged
            paused = time.time()  # validation and checkpoints are not training time
            if validating:
                peak_memory(device, reset=True)
                result = validate(raw_model, val_set, device, rank, world, args.workers, log.print)
                val_seconds = result["seconds"]
                log_validation(log, result, it, iters, device)
                if master and result["miou"] > best_miou:
                    best_miou = result["miou"]
                    save(args.out, "best.pt", raw_model, config, it, miou=best_miou)
                peak_memory(device, reset=True)
            if master:
                save(args.out, "last.pt", raw_model, config, it, optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict(), best_miou=best_miou)
            stop.saved = it
            interval.pause(time.time() - paused)
            if signum:
                name = signal.Signals(signum).name
                log.record("stop", iter=it, signal=name)
                log.print(f"stopped by {name} at iteration {it}: {last} written; continue with "
                          f"python train.py --resume {last}")
                if ddp:
                    dist.destroy_process_group()
                sys.exit(128 + signum)  # as a shell reports a process ended by the signal: 130, 143
        log.print(f"done: best val mIoU {best_miou:.4f}, checkpoints and log.jsonl in {args.out}/")
    finally:
        stop.restore()
        log.close()
        end_workers(data)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main, get_args())
