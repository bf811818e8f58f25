"""Evaluate a FoR-Net checkpoint on Cityscapes: per-class IoU, mIoU, pixel accuracy, hard regions.

    python evaluate.py --ckpt runs/fornet/best.pt                          # val split, whole image, float32
    python evaluate.py --ckpt best.pt --scales 0.75 1 1.25 1.5 --flip       # or --mode slide: see --help
    python evaluate.py --ckpt best.pt --images photo.jpg folder/ --save-color out/   # your own pictures
    python evaluate.py --benchmark --size 1024 2048                         # vs DeepLabV3-R101, no data

mIoU is computed as the official Cityscapes script does: one confusion matrix over the whole
split at the labels' full resolution, IoU = TP/(TP+FP+FN), the mean over classes that occur.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as TF
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode

from fornet import (CLASSES, PALETTE, Cityscapes, ConfusionMatrix, DataError, FoRNet, boundary_map, environment,
                    load_checkpoint, load_model, normalize, peak_memory, read_image, resolve_amp, to_label_ids,
                    topk_masks)

THIN = ("pole", "traffic light", "traffic sign")  # the thin classes reported beside mIoU
MASK_COLORS = ((255, 40, 40), (255, 150, 0), (255, 255, 0), (0, 200, 255))  # innermost (smallest ratio) first


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("checkpoint and data")
    g.add_argument("--ckpt", help="train.py checkpoint (best.pt / last.pt); the model is rebuilt from its config")
    g.add_argument("--data", help="Cityscapes root; default: the path stored in the checkpoint")
    g.add_argument("--split", default="val", help="leftImg8bit/<split> to evaluate")
    g.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    g.add_argument("--images", nargs="+", metavar="PATH",
                   help="your own images (files, or folders of .png/.jpg/.jpeg) instead of a split: no metrics")
    g = p.add_argument_group("inference")
    g.add_argument("--mode", choices=("whole", "slide"), default="whole", help="one pass, or crop×crop windows")
    g.add_argument("--crop", type=int, default=768, help="slide: window size (default: the training crop, Sec. 4.1)")
    g.add_argument("--stride", type=int, default=512, help="slide: step between windows")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], help="input scales; softmax averaged over them")
    g.add_argument("--flip", action="store_true", help="add horizontally flipped passes (softmax averaged)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="off",
                   help="off (default): float32, as published numbers are; auto/bf16/fp16 for speed (as train.py)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (compiles anew for each input size)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g = p.add_argument_group("hard regions")
    g.add_argument("--trimap", type=int, nargs="+", default=[3, 5, 10], help="mIoU within d px of a GT boundary")
    g.add_argument("--bf-tol", type=int, default=3, help="boundary F-score: match tolerance in px")
    g = p.add_argument_group("outputs")
    g.add_argument("--json", help="write the metrics to this file")
    g.add_argument("--save-pred", help="directory for labelId PNGs, as the official script and server read them")
    g.add_argument("--save-color", help="directory for 2×2 pictures: image, prediction, S, Top-K masks")
    g.add_argument("--log-every", type=int, default=50, help="progress line every N images")
    g = p.add_argument_group("benchmark (needs no data)")
    g.add_argument("--benchmark", action="store_true", help="params, GMACs, latency, memory vs DeepLabV3-R101")
    g.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"), help="CPU: try 256 512")
    g.add_argument("--backbone", choices=("resnet101", "resnet50"), default="resnet101", help="if no --ckpt")
    g.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    g.add_argument("--runs", type=int, default=10, help="timed runs")
    args = p.parse_args(argv)
    if not args.ckpt and not args.benchmark:
        p.error("--ckpt is required (except with --benchmark)")
    if args.images and not (args.save_color or args.save_pred):
        p.error("--images needs --save-color DIR and/or --save-pred DIR (there are no labels to score)")
    if args.mode == "slide" and not 0 < args.stride <= args.crop:
        p.error(f"--stride must be in (0, --crop], got {args.stride} and {args.crop}")
    return args


# ---------------------------------------------------------------- inference


def slide(model, x, crop, stride):
    """Sliding-window logits. x (1, 3, H, W) -> (1, N, H, W).

    Windows of crop×crop every `stride` px; the last window of a row/column is moved back to end
    at the border, and a side shorter than `crop` gets one window of its own length (no padding).
    Logits are summed and divided by the number of windows that cover each pixel.
    """
    H, W = x.shape[-2:]
    starts = lambda L: list(range(0, max(L - crop, 0), stride)) + [max(L - crop, 0)]  # noqa: E731
    total, count = 0, x.new_zeros(1, 1, H, W)
    for top in starts(H):
        for left in starts(W):
            logits, _ = model(x[..., top:top + crop, left:left + crop])  # (1, N, crop, crop)
            if isinstance(total, int):
                total = x.new_zeros(1, logits.shape[1], H, W)  # (1, N, H, W)
            total[..., top:top + crop, left:left + crop] += logits.float()
            count[..., top:top + crop, left:left + crop] += 1
    return total / count


@torch.no_grad()
def predict(model, image, *, mode="whole", crop=768, stride=512, scales=(1.0,), flip=False, amp_dtype=None):
    """Class probabilities of one image. image (1, 3, H, W), normalised -> (1, N, H, W) float32.

    Each scale s resizes the input to round(s·H)×round(s·W); with `flip` the mirrored input is run
    too and its logits are mirrored back. Every pass's logits are resized to H×W and turned into
    softmax probabilities, which are averaged over the passes (as mmsegmentation does).
    Paper is silent on test-time augmentation; the default (one whole-image pass) has none.
    """
    H, W = image.shape[-2:]
    probs = 0
    for s in scales:
        x = image if s == 1 else TF.interpolate(image, size=(round(s * H), round(s * W)), mode="bilinear",
                                                align_corners=False, antialias=s < 1)  # (1, 3, sH, sW)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            with torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(xi)[0] if mode == "whole" else slide(model, xi, crop, stride)  # (1, N, sH, sW)
            logits = logits.float().flip(-1) if flipped else logits.float()  # back to the image's orientation
            if logits.shape[-2:] != (H, W):
                logits = TF.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)  # (1, N, H, W)
            probs = probs + logits.softmax(1)
    return probs / (len(scales) * (2 if flip else 1))


# ---------------------------------------------------------------- hard-region metrics


def gt_boundary(target):
    """(H, W) trainIds -> (H, W) bool: labelled pixels with a different labelled trainId among their 8 neighbours."""
    return boundary_map(target[None], target.shape[-2:], band=0)[0][0, 0] > 0  # full size, not widened


def dilate(mask, d):
    """(..., H, W) bool -> (..., H, W) bool: pixels within Chebyshev distance d of a set pixel.

    The (2d+1)×(2d+1) max filter separates into a row pass and a column pass; on a bool mask each
    pass is an OR of the mask shifted by 1..d px both ways (nothing enters from beyond the border).
    Same result as the (2d+1)² max-pool (tested), about 100× faster at d = 10 on 1024×2048 (1 CPU thread).
    """
    for dim in (-1, -2):
        src, mask, L = mask, mask.clone(), mask.shape[dim]
        for k in range(1, min(d, L - 1) + 1):
            mask.narrow(dim, k, L - k).logical_or_(src.narrow(dim, 0, L - k))  # from k px before
            mask.narrow(dim, 0, L - k).logical_or_(src.narrow(dim, k, L - k))  # from k px after
    return mask


class HardRegions:
    """Hard-region metrics accumulated over a split (counts summed over images, never per-image means).

    Trimap mIoU at width d: a ConfusionMatrix over the pixels within d px (Chebyshev) of a GT
    boundary pixel. Boundary F-score: per class c, the boundary pixels of c in the GT and in the
    prediction (both by `gt_boundary`, prediction restricted to labelled pixels); precision =
    predicted ones within `tol` px of a GT one, recall = GT ones within `tol` px of a predicted
    one; F_c = 2PR/(P+R) from the summed counts; mean over classes with any boundary pixel.
    Paper is silent on hard-region metrics: widths 3, 5, 10 px and tolerance 3 px are ours; the
    boundary F-score is not comparable with published ones, whose tolerance and averaging differ.
    """

    def __init__(self, widths=(3, 5, 10), tol=3, num_classes=19):
        self.trimap = {d: ConfusionMatrix(num_classes) for d in widths}
        self.tol, self.num_classes = tol, num_classes
        self.counts = torch.zeros(4, num_classes, dtype=torch.long)  # matched pred, all pred, matched GT, all GT

    def update(self, pred, target):
        """pred, target (H, W) trainIds (target 255 = ignore)."""
        edge_gt = gt_boundary(target)  # (H, W)
        for d, cm in self.trimap.items():
            band = dilate(edge_gt, d)  # (H, W)
            cm.update(pred[band], target[band])
        valid = target != 255
        edge_pred = gt_boundary(pred.masked_fill(~valid, 255))  # (H, W)
        N = self.num_classes
        n_gt = torch.bincount(target[edge_gt], minlength=N)[:N].cpu()  # (N,)   |B_gt,c|
        n_pred = torch.bincount(pred[edge_pred], minlength=N)[:N].cpu()  # (N,)   |B_pred,c|
        matched_pred, matched_gt = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)
        for c in ((n_gt > 0) & (n_pred > 0)).nonzero().flatten().tolist():  # else nothing can match
            B_gt, B_pred = edge_gt & (target == c), edge_pred & (pred == c)  # (H, W) each
            matched_pred[c] = (B_pred & dilate(B_gt, self.tol)).sum().item()
            matched_gt[c] = (B_gt & dilate(B_pred, self.tol)).sum().item()
        self.counts += torch.stack([matched_pred, n_pred, matched_gt, n_gt])  # (4, N)

    def compute(self):
        """-> {"trimap": {d: mIoU}, "bf": (N,) float64, NaN where a class has no boundary pixel}."""
        m_p, n_p, m_g, n_g = self.counts.double()
        P, R = m_p / n_p.clamp(min=1), m_g / n_g.clamp(min=1)  # (N,) each
        bf = torch.where(P + R > 0, 2 * P * R / (P + R), 0.0)  # (N,)
        bf[(n_p + n_g) == 0] = math.nan
        return {"trimap": {d: cm.compute()["miou"] for d, cm in self.trimap.items()}, "bf": bf}


# ---------------------------------------------------------------- pictures


def save_color(path, image, pred, sel, ratios):
    """One PNG of 2×2 panels: image | prediction (PALETTE) / S = σ(sel) over image | Top-K masks over image.

    image (3, H, W) uint8, pred (H, W) trainIds, sel (1, 1, h, w). The masks of the ratios are
    nested, so each location is coloured by the smallest ratio whose mask holds it.
    """
    H, W = pred.shape
    rgb = image.cpu().float() / 255  # (3, H, W)
    color = torch.tensor(PALETTE, dtype=torch.float)[pred.cpu()].permute(2, 0, 1) / 255  # (3, H, W)
    S = sel.float().sigmoid().cpu()  # (1, 1, h, w)   Eq. (1)
    s = TF.interpolate(S, size=(H, W), mode="bilinear", align_corners=False)[0]  # (1, H, W)
    heat = torch.cat([(3 * s).clamp(0, 1), (3 * s - 1).clamp(0, 1), (3 * s - 2).clamp(0, 1)])  # (3, H, W) black→white
    level = sum(topk_masks(sel.cpu(), ratios))  # (1, 1, h, w): number of masks holding each cell
    level = TF.interpolate(level, size=(H, W), mode="nearest")[0, 0].long()  # (H, W)
    inner = (len(ratios) - level).clamp(max=len(ratios) - 1) % len(MASK_COLORS)  # (H, W) index of the smallest mask
    mask_rgb = torch.tensor(MASK_COLORS, dtype=torch.float)[inner].permute(2, 0, 1) / 255  # (3, H, W)
    masks = torch.where(level > 0, 0.35 * rgb + 0.65 * mask_rgb, 0.5 * rgb)  # (3, H, W)
    grid = torch.cat([torch.cat([rgb, color], 2), torch.cat([0.4 * rgb + 0.6 * heat, masks], 2)], 1)  # (3, 2H, 2W)
    picture = Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=max(10, H // 20))  # Pillow ≥ 10.1
    legend = [("Top-K masks:", "white")] + [(f"{r:.0%}", MASK_COLORS[i % 4]) for i, r in enumerate(ratios)]
    for (x, y), items in (((0, 0), [("image", "white")]), ((W, 0), [("prediction", "white")]),
                          ((0, H), [("S = sigmoid(sel)", "white")]), ((W, H), legend)):
        x += 3
        for text, fill in items:
            box = draw.textbbox((x, y + 2), text, font=font)
            draw.rectangle(box, fill="black")
            draw.text((x, y + 2), text, fill=fill, font=font)
            x = box[2] + 4
    picture.save(path)


# ---------------------------------------------------------------- benchmark


def benchmark(args, device, amp_dtype):
    """Inference at batch 1: params, GMACs (FLOPs/2 of convs and matmuls, counted on the meta device), latency,
    peak memory; FoR-Net (the checkpoint's config, else the paper's defaults) vs torchvision's DeepLabV3-R101."""
    kwargs = load_checkpoint(args.ckpt)["config"]["model"] if args.ckpt else dict(backbone=args.backbone)
    deeplab = torchvision.models.segmentation.deeplabv3_resnet101
    name = f"FoR-Net ({kwargs.get('backbone', 'resnet101')}, C={kwargs.get('channels', 256)})"
    models = [(name, lambda: FoRNet(**kwargs)),
              ("DeepLabV3-ResNet101 (torchvision)",
               lambda: deeplab(weights=None, weights_backbone=None, num_classes=19, aux_loss=False))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{environment(device)}\n1×3×{args.size[0]}×{args.size[1]} | amp {args.amp} | compile {args.compile} | "
          f"{args.warmup} warm-up + {args.runs} timed runs\n"
          f"{'model':<36}{'params (M)':>11}{'GMACs':>10}{'latency (ms)':>14}"
          f"{'FPS':>8}{'peak mem (GiB)':>16}")
    rows = []
    for name, build in models:
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            meta = build().eval()
            meta(torch.empty(1, 3, *args.size))
        model, x = build().eval().to(device), torch.randn(1, 3, *args.size, device=device)
        model = torch.compile(model, dynamic=False) if args.compile else model
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for i in range(args.warmup + args.runs):
                if i == args.warmup:
                    sync()  # CUDA runs asynchronously: wait for the GPU before reading the clock
                    peak_memory(device, reset=True)
                    t0 = time.perf_counter()
                model(x)
            sync()
        ms = (time.perf_counter() - t0) / args.runs * 1e3
        rows.append((name, sum(p.numel() for p in meta.parameters()) / 1e6, counter.get_total_flops() / 2e9, ms,
                     1e3 / ms, peak_memory(device)))
        print(f"{name:<36}{rows[-1][1]:>11.2f}{rows[-1][2]:>10.1f}{ms:>14.1f}{1e3 / ms:>8.2f}{rows[-1][5]:>16.2f}")
        del model, meta
    return rows


# ---------------------------------------------------------------- main


def infer(model, image, name, args, amp_dtype):
    """(H, W) trainIds for one image (3, H, W) uint8 on the device; writes `name`_pred/_color.png when asked."""
    x = normalize(image[None])  # (1, 3, H, W)
    pred = predict(model, x, mode=args.mode, crop=args.crop, stride=args.stride, scales=args.scales, flip=args.flip,
                   amp_dtype=amp_dtype).argmax(1)[0]  # (H, W)
    if args.save_pred:  # official labelIds, as cityscapesScripts and the test server read them
        Image.fromarray(to_label_ids(pred).byte().cpu().numpy()).save(Path(args.save_pred) / f"{name}_pred.png")
    if args.save_color:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            _, sel = model(x)  # (1, 1, h, w)   whole image at scale 1, whatever --mode
        save_color(Path(args.save_color) / f"{name}_color.png", image, pred, sel, model.ratios)
    return pred


def own_images(model, args, device, amp_dtype):
    """--images: the files given and the .png/.jpg/.jpeg files of the folders given, any size, RGB / grey / RGBA
    (converted to RGB). An unreadable file is named in one line and skipped; the run ends with an error."""
    paths = [f for p in map(Path, args.images) for f in
             (sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg")) if p.is_dir() else [p])]
    if not paths:
        raise DataError(f"no .png/.jpg/.jpeg images in {' '.join(args.images)}")
    if len({p.stem for p in paths}) < len(paths):  # outputs are named by stem: one would overwrite another
        raise DataError("two inputs share a file name (without extension): rename one or run them apart")
    failed, t0 = [], time.time()
    for i, path in enumerate(paths):
        try:
            image = read_image(path, "RGB").permute(2, 0, 1)  # (3, H, W) uint8
        except DataError as e:
            print(f"skipped: {e}")
            failed.append(path)
        else:
            infer(model, image.to(device), path.stem, args, amp_dtype)
        if (i + 1) % args.log_every == 0 or i + 1 == len(paths):
            print(f"{i + 1}/{len(paths)} images | {(i + 1 - len(failed)) / (time.time() - t0):.2f} img/s")
    if failed:
        raise DataError(f"{len(failed)} of {len(paths)} images could not be read (named above); "
                        "the others were written")
    return paths


def main(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: no GPU visible (use --device cpu)")
    args.amp, amp_dtype = resolve_amp(args.amp, device)

    if args.benchmark:
        return benchmark(args, device, amp_dtype)

    model, config = load_model(args.ckpt)
    if config["model"].get("num_classes", 19) != len(CLASSES):
        raise DataError(f"{args.ckpt} holds a {config['model']['num_classes']}-class model; "
                        f"Cityscapes evaluation needs {len(CLASSES)} classes")
    model.to(device)
    if args.compile:
        model = torch.compile(model, dynamic=False)  # attributes such as model.ratios still reach the model
    for folder in filter(None, (args.save_pred, args.save_color)):
        Path(folder).mkdir(parents=True, exist_ok=True)
    if args.images:
        return own_images(model, args, device, amp_dtype)
    data = args.data or config.get("data")
    if not data:
        raise DataError(f"{args.ckpt} stores no data path: pass --data /path/to/cityscapes")
    dataset = Cityscapes(data, args.split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers)
    print(f"{args.ckpt}: {len(dataset)} {args.split} images from {data} | mode {args.mode} | scales "
          f"{args.scales} | flip {args.flip} | amp {args.amp} | {device}")

    cm, hard = ConfusionMatrix(len(CLASSES)), HardRegions(args.trimap, args.bf_tol, len(CLASSES))
    t0 = time.time()
    for i, (image, target) in enumerate(loader):
        target = target.to(device).long()  # (H, W)
        pred = infer(model, image.to(device), dataset.images[i].name.replace("_leftImg8bit.png", ""), args, amp_dtype)
        cm.update(pred, target)
        hard.update(pred, target)
        if (i + 1) % args.log_every == 0 or i + 1 == len(dataset):
            print(f"{i + 1}/{len(dataset)} images | {(i + 1) / (time.time() - t0):.2f} img/s | mIoU so far "
                  f"{cm.compute()['miou'] * 100:.2f}")

    result, hr = cm.compute(), hard.compute()
    iou, bf = result["iou"], hr["bf"]
    thin = iou[[CLASSES.index(c) for c in THIN]].nanmean().item()
    pct = lambda v: "    -" if math.isnan(v) else f"{100 * v:5.2f}"  # noqa: E731
    print(f"\n{'class':<15}{'IoU':>7}{f'BF@{args.bf_tol}px':>9}")
    for c, name in enumerate(CLASSES):
        print(f"{name:<15}{pct(iou[c].item()):>7}{pct(bf[c].item()):>9}")
    print(f"{'mean':<15}{pct(result['miou']):>7}{pct(bf.nanmean().item()):>9}")
    print(f"\nmIoU {pct(result['miou'])} | pixel acc {pct(result['acc'])} | thin classes ({', '.join(THIN)}) "
          f"mIoU {pct(thin)}")
    print("trimap mIoU " + " | ".join(f"±{d}px {pct(v)}" for d, v in hr["trimap"].items())
          + f" | boundary F @{args.bf_tol}px {pct(bf.nanmean().item())}")

    nan_none = lambda v: None if math.isnan(v) else v  # noqa: E731
    per_class = lambda values: {n: nan_none(v) for n, v in zip(CLASSES, values.tolist())}  # noqa: E731
    metrics = {"mIoU": nan_none(result["miou"]), "pixel_acc": result["acc"], "thin_mIoU": nan_none(thin),
               "IoU": per_class(iou), "trimap_mIoU": {str(d): nan_none(v) for d, v in hr["trimap"].items()},
               "boundary_F": nan_none(bf.nanmean().item()), "boundary_F_tol_px": args.bf_tol,
               "boundary_F_per_class": per_class(bf), "images": len(dataset),
               **{k: vars(args)[k] for k in ("ckpt", "split", "mode", "crop", "stride", "scales", "flip", "amp")}}
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    try:
        main(get_args())
    except DataError as e:
        lines = str(e).strip().splitlines()
        worker = [line.split("DataError: ", 1)[1] for line in lines if "DataError: " in line]  # from a loader worker
        sys.exit("error: " + (worker[-1] if worker else lines[0]))
