"""Every benchmark of FoR-Net in one place: where the cost is, a training step, the data loader, inference.

    python bench.py                                         # params and FLOPs of each part of Sec. 3: seconds, no GPU
    python bench.py --train [--compile] [--channels-last]   # a train.py step vs DeepLabV3, the recipe's batch and crop
    python bench.py --train --data /path/to/cityscapes      # + the loader: img/s per worker, the --workers needed
    python bench.py --infer [--size 1024 2048] [--ckpt best.pt] [--amp bf16] [--compile]   # batch 1, vs DeepLabV3-R101

FLOPs are those torch.utils.flop_counter counts (convolutions and matmuls) on the meta device, without memory or
time; norms, activations, masking and interpolation add none. GMACs = GFLOPs / 2. Every timing is printed under
a line naming the machine and the versions it was measured with.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as TF
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from fornet import (Cityscapes, FoRNet, FoRNetLoss, TrainTransform, environment, get_device, load_checkpoint, normalize,
                    peak_memory, resolve_amp, run_script)
from train import make_optimizer, train_step

CITYSCAPES_TRAIN = 2975  # images in the fine train split: what --train projects the recipe's duration with
FORNET = "FoR-Net ({backbone}, C={channels})"  # the name of a FoRNet(**kwargs) in every table


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run (none of these: the cost table)")
    g.add_argument("--train", action="store_true", help="time training steps on random data, vs DeepLabV3")
    g.add_argument("--infer", action="store_true", help="time inference at batch 1, vs DeepLabV3-ResNet101")
    g.add_argument("--data", metavar="DIR", help="Cityscapes root: time the loader (decode, augment) as one worker")
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", metavar="PATH", help="FoR-Net as in this train.py checkpoint's config (weights unused)")
    g.add_argument("--backbone", choices=("resnet101", "resnet50"), default="resnet101",
                   help="without --ckpt (Sec. 3.1: resnet101); --train gives DeepLabV3 the same one")
    g = p.add_argument_group("sizes")
    g.add_argument("--crop", type=int, default=768, help="--train, --data and the cost table: square crop (Sec. 4.1)")
    g.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                   help="--infer and the cost table: image size (Cityscapes: 1024 2048; on a CPU try 256 512)")
    g.add_argument("--batch-size", type=int, default=8, help="--train (Sec. 4.1: 8)")
    g.add_argument("--epochs", type=int, default=200, help="--train: the run whose hours are projected (Sec. 4.1)")
    g = p.add_argument_group("timing")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                   help="default: auto for --train (as train.py), off for --infer (float32, as published numbers are)")
    g.add_argument("--compile", action="store_true", help="torch.compile the models (--infer: dynamic=False)")
    g.add_argument("--channels-last", action="store_true", help="--train: model and images in channels-last format")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps first; the first one's time is printed")
    g.add_argument("--runs", type=int, default=10, help="timed steps (--train) or passes (--infer)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.runs < 1:
        p.error("--warmup and --runs must be ≥ 1 (the first step, with --compile the compilation, is never timed)")
    if args.train and args.batch_size < 2:
        p.error("--train needs --batch-size ≥ 2: DeepLabV3's image-pooling BatchNorm cannot train on one image")
    return args


def deeplab(backbone, num_classes=19):
    """torchvision's DeepLabV3, the baseline: untrained, no auxiliary head."""
    build = getattr(torchvision.models.segmentation, f"deeplabv3_{backbone}")
    return build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


def count(build, shape):
    """build()'s forward pass on an input of `shape`, on the meta device -> (model, FlopCounterMode, output)."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model = build()
        out = model(torch.empty(*shape))
    return model, counter, out


def timed(args, device, step, *inputs):
    """step(*inputs) --warmup + --runs times -> (seconds of the first (with --compile: the compilation), seconds
    per timed one, peak GiB of the timed ones)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    seconds = []
    for phase, n in enumerate((1, args.warmup - 1, args.runs)):  # the first step, the other warm-up ones, the timed
        if phase == 2:
            peak_memory(device, reset=True)
        t0 = time.perf_counter()
        for _ in range(n):
            step(*inputs)
        sync()
        seconds.append(time.perf_counter() - t0)
    return seconds[0], seconds[2] / args.runs, peak_memory(device)


def parts(model):
    """The parts of Sec. 3 in the order of FoRNet.forward -> [(name, module paths, r)], r the share of cells it
    computes under Top-K: r_i for branch C_i, 1 for the parts without a mask. Together the parts hold every parameter
    (FoRNet deletes the ResNet's unused avgpool and fc) and every counted FLOP (the final upsampling counts none)."""
    branches = []
    for i, (C_i, r) in enumerate(zip(model.branches, model.ratios)):
        (k, _), (d, _) = C_i[0].kernel_size, C_i[0].dilation
        name = f"C_{i + 1} Eq. (6): {k}×{k}{f', dilation {d}' if d > 1 else ''}, r={r:g}"
        branches.append((name, [f"branches.{i}"], r))
    return [("stem: conv1, bn1, relu, maxpool", ["backbone.conv1", "backbone.bn1"], 1),
            *[(f"layer{i}", [f"backbone.layer{i}"], 1) for i in range(1, 5)],
            ("reduce: 1×1 conv, 2048 → C", ["reduce"], 1), ("selector φ, Eq. (1)", ["selector"], 1),
            ("global context ψ, Eq. (4)-(5)", ["context"], 1), *branches, ("decoder D, Eq. (8)", ["decoder"], 1)]


def cost_table(args, kwargs):
    """Parameters and forward FLOPs of each part at batch 1, at --crop² and at --size; and for branch C_i, the FLOPs
    if it convolved only the k_i cells its Top-K mask M_i keeps: Sec. 3.6's "focuses computational resources on
    critical regions" read as FLOPs. Not what FoRNet computes: C_i(F_ctx ⊙ M_i) is a dense convolution, nonzero
    around the kept cells too; computing the kept cells only would take a sparse one. -> the figures printed, rows
    [(name, r, params, [FLOPs per size], [FLOPs per size with Top-K])] in the order of `parts`."""
    sizes, flops, totals, cells = [(args.crop, args.crop), tuple(args.size)], [], [], []
    for size in sizes:
        model, counter, (_, sel) = count(lambda: FoRNet(**kwargs), (1, 3, *size))  # sel (1, 1, h, w)
        prefix = type(model).__name__ + "."  # get_flop_counts() names a module by its path under the model's class
        flops.append({name.removeprefix(prefix): sum(ops.values()) for name, ops in counter.get_flop_counts().items()})
        totals.append(counter.get_total_flops())
        cells.append(sel.shape[-2:].numel())  # h·w
    rows = []
    for name, paths, r in parts(model):
        dense = [sum(f.get(path, 0) for path in paths) for f in flops]
        # Top-K keeps k_i = max(1, round(r_i·h·w)) cells (topk_masks); a convolution costs the same at every cell.
        masked = [d * max(1, round(r * c)) // c for d, c in zip(dense, cells)]
        params = sum(p.numel() for path in paths for p in model.get_submodule(path).parameters())
        rows.append((name, r, params, dense, masked))
    params = sum(p.numel() for p in model.parameters())
    with_masks = [sum(masked) for masked in zip(*(row[4] for row in rows))]
    assert [sum(dense) for dense in zip(*(row[3] for row in rows))] == totals, "an op counted outside the parts"
    print(f"{FORNET.format(**kwargs)}, batch 1: parameters and forward FLOPs per part, "
          f"counted by FlopCounterMode (torch {torch.__version__}) on the meta device.\nTop-K: GFLOPs of branch C_i "
          f"if it convolved only the k_i = max(1, round(r_i·h·w)) cells of its mask M_i, Eq. (2).\n{'part':<36}"
          f"{'params (M)':>11}" + "".join(f"{f'GFLOPs {h}×{w}':>19}{'share':>7}{'Top-K':>9}" for h, w in sizes))
    for name, r, n, dense, masked in rows + [("total", 0, params, totals, with_masks)]:  # r < 1: a Top-K figure
        line = f"{name:<36}{n / 1e6:>11.2f}"
        for d, m, t in zip(dense, masked, totals):
            topk = f"{m / 1e9:.2f}" if r < 1 else ""  # the branches, and the total with them on their Top-K cells
            line += f"{d / 1e9:>19.2f}{d / t:>7.1%}{topk:>9}"
        print(line.rstrip())
    print("total with the branches on their Top-K cells only: "
          + " | ".join(f"{m / t - 1:+.1%} at {h}×{w}" for m, t, (h, w) in zip(with_masks, totals, sizes)))
    return dict(sizes=sizes, rows=rows, params=params, totals=totals, cells=cells, with_masks=with_masks)


def train_bench(args, kwargs, device):
    """--train: FoR-Net (our loss) vs DeepLabV3 (cross entropy, ignore 255) with the same backbone, classes, batch,
    crop, amp and memory format, each step train.py's own."""
    B, N, size = args.batch_size, kwargs["num_classes"], (args.crop, args.crop)
    amp, amp_dtype = resolve_amp(args.amp or "auto", device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = normalize(torch.randint(0, 256, (B, 3, *size), dtype=torch.uint8, device=device))
    x, y = x.contiguous(memory_format=memory_format), torch.randint(0, N, (B, *size), device=device)
    fornet_loss = FoRNetLoss(num_classes=N)  # λ1, λ2 do not change the cost
    models = [(FORNET.format(**kwargs), lambda: FoRNet(**kwargs), lambda out, y: fornet_loss(*out, y)),
              (f"DeepLabV3 ({kwargs['backbone']})", lambda: deeplab(kwargs["backbone"], N),
               lambda out, y: (TF.cross_entropy(out["out"], y, ignore_index=255), {}))]
    print(f"{B}×3×{size[0]}×{size[1]} | amp {amp} | compile {args.compile} | channels-last {args.channels_last} | "
          f"{args.warmup} warm-up + {args.runs} timed steps\n{'model':<30}{'img/s':>8}{'ms/step':>10}"
          f"{'1st step s':>11}{'peak GiB':>10}{'TFLOP/s':>9}{f'{args.epochs} epochs (h)':>16}")
    rows = []
    for name, build, loss_of in models:
        flops = count(build, x.shape)[1].get_total_flops()
        model = build().to(device, memory_format=memory_format).train()
        optimizer = make_optimizer(model, 1e-4, 1e-2, fused=device.type == "cuda")  # train.py's lr and weight decay
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        run = torch.compile(model) if args.compile else model
        first, step, peak = timed(args, device, train_step, run, loss_of, optimizer, scaler, x, y, amp_dtype)
        rows.append((name, B / step, 1e3 * step, first, peak, 3 * flops / step / 1e12,  # training ≈ 3× forward FLOPs
                     args.epochs * CITYSCAPES_TRAIN / (B / step) / 3600))
        print("{:<30}{:>8.2f}{:>10.0f}{:>11.1f}{:>10.2f}{:>9.2f}{:>16.1f}".format(*rows[-1]))
    print(f"step time FoR-Net / DeepLabV3: {rows[0][2] / rows[1][2]:.2f}")
    return rows


def loader_bench(args, dataset, rate=None):
    """--data: what one train.py --workers process delivers, on the first 20 training images; rate: img/s to feed."""
    n = min(len(dataset), 20)
    for name, transform in (("decode", None), ("decode + augment", TrainTransform(args.crop))):
        dataset.transform, t0 = transform, time.perf_counter()
        for i in range(n):
            dataset[i]
        per_worker = n / (time.perf_counter() - t0)
        print(f"loader, {name}: {per_worker:.1f} img/s per worker")
    if rate:
        print(f"--workers needed to feed {rate:.1f} img/s: {math.ceil(rate / per_worker)}")
    return per_worker


def infer_bench(args, kwargs, device):
    """--infer: FoR-Net vs torchvision's DeepLabV3-ResNet101, in eval mode (BatchNorm over one image)."""
    amp, amp_dtype = resolve_amp(args.amp or "off", device)
    x = torch.randn(1, 3, *args.size, device=device)
    print(f"1×3×{args.size[0]}×{args.size[1]} | amp {amp} | compile {args.compile} | {args.warmup} warm-up + "
          f"{args.runs} timed runs\n{'model':<36}{'params (M)':>11}{'GMACs':>10}{'latency (ms)':>14}{'FPS':>8}"
          f"{'1st run s':>10}{'peak mem (GiB)':>16}")
    rows = []
    for name, build in [(FORNET.format(**kwargs), lambda: FoRNet(**kwargs).eval()),
                        ("DeepLabV3-ResNet101 (torchvision)", lambda: deeplab("resnet101").eval())]:
        meta, counter, _ = count(build, x.shape)
        model = build().to(device)
        run = torch.compile(model, dynamic=False) if args.compile else model
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            first, seconds, peak = timed(args, device, run, x)
        rows.append((name, sum(p.numel() for p in meta.parameters()) / 1e6, counter.get_total_flops() / 2e9,
                     1e3 * seconds, 1 / seconds, first, peak))
        print("{:<36}{:>11.2f}{:>10.1f}{:>14.1f}{:>8.2f}{:>10.1f}{:>16.2f}".format(*rows[-1]))
    return rows


def main(args):
    device = get_device(args.device)
    chosen = load_checkpoint(args.ckpt)["config"]["model"] if args.ckpt else dict(backbone=args.backbone)
    kwargs = {**FoRNet.__init__.__kwdefaults__, **chosen, "pretrained": None}  # all of FoRNet's; never weights
    if not (args.train or args.infer or args.data):
        return cost_table(args, kwargs)
    dataset = Cityscapes(args.data, "train") if args.data else None  # a bad --ckpt or --data: fails before timing
    torch.backends.cudnn.benchmark = True  # fixed sizes: cuDNN picks its fastest kernels once, in the warm-up
    print(environment(device))
    result = {"train": train_bench(args, kwargs, device)} if args.train else {}
    if args.data:
        result["loader"] = loader_bench(args, dataset, result["train"][0][1] if args.train else None)
    if args.infer:
        result["infer"] = infer_bench(args, kwargs, device)
    return result


if __name__ == "__main__":
    run_script(main, get_args())
