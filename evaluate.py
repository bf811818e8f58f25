"""Evaluate FoR-Net checkpoints on Cityscapes: per-class IoU, mIoU, pixel accuracy, hard regions; side by side.

    python evaluate.py --ckpt runs/fornet/best.pt                          # val split, whole image, float32
    python evaluate.py --ckpt best.pt --scales 0.75 1 1.25 1.5 --flip       # or --mode slide: see --help
    python evaluate.py --ckpt best.pt --images photo.jpg folder/ --save-color out/   # your own pictures
    python evaluate.py --ckpt a.pt b.pt --save-color fig2/                  # one column per run (Table 2, Fig. 2)
    python evaluate.py --group fornet f_s0.pt f_s1.pt --group no_topk n_s0.pt n_s1.pt   # seeds: mean ± std

mIoU is computed as the official Cityscapes script does: one confusion matrix over the whole
split at the labels' full resolution, IoU = TP/(TP+FP+FN), the mean over classes that occur.
Several checkpoints are scored on the same images, each image read once and predicted by every
model; the table has a column per checkpoint (or per --group: mean ± std over its seeds) and the
difference to the first column, marked where it exceeds the seed noise (the rule is printed).
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as TF
from PIL import Image, ImageDraw, ImageFont

from fornet import (CLASSES, PALETTE, Cityscapes, ConfusionMatrix, DataError, HardRegions, get_device, load_model,
                    normalize, read_image, resolve_amp, run_script, to_label_ids, topk_masks)

THIN = ("pole", "traffic light", "traffic sign")  # the thin classes reported beside mIoU
MASK_COLORS = ((255, 40, 40), (255, 150, 0), (255, 255, 0), (0, 200, 255))  # innermost (smallest ratio) first
WRONG = (255, 255, 255)  # white, in no PALETTE colour: a labelled pixel whose prediction is another class
COLUMNS = 2  # panels per row of a --save-color picture
NOISE_RULE = ("Δ: column − first column, in points; ± sample std (n−1) over a group's seeds.\n"
              "* beyond seed noise: |Δ| > the larger std of the two groups; ~ within it; no mark: neither has a std")
NO_GROUPS = "Δ: column − first column, in points; single runs (no --group): no seed noise to compare with"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("checkpoints and data")
    g.add_argument("--ckpt", nargs="+", metavar="CKPT",
                   help="train.py checkpoint(s) (best.pt / last.pt), each rebuilt from its config; several: one "
                        "column each, compared with the first")
    g.add_argument("--group", nargs="+", action="append", metavar=("NAME", "CKPT"),
                   help="instead of --ckpt: a name, then the checkpoints of one variant trained with different "
                        "seeds: one column of mean ± std; repeat per variant, the first is the reference")
    g.add_argument("--data", help="Cityscapes root; default: the path stored in the (first) checkpoint")
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
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    g = p.add_argument_group("hard regions")
    g.add_argument("--trimap", type=int, nargs="+", default=[3, 5, 10], help="mIoU within d px of a GT boundary")
    g.add_argument("--bf-tol", type=int, default=3, help="boundary F-score: match tolerance in px")
    g = p.add_argument_group("outputs")
    g.add_argument("--json", help="write the metrics (several checkpoints: each one's, the groups', the Δs)")
    g.add_argument("--save-pred", help="directory for labelId PNGs, as the official script and server read them "
                                       "(several checkpoints: a subfolder each, named by its column)")
    g.add_argument("--save-color", help="directory for pictures (Fig. 2): image, ground truth, each checkpoint's "
                                        "prediction with its errors in white, S and Top-K masks of the first")
    g.add_argument("--log-every", type=int, default=50, help="progress line every N images")
    args = p.parse_args(argv)
    if bool(args.ckpt) == bool(args.group):
        p.error("give --ckpt CKPT [CKPT ...] or --group NAME CKPT [CKPT ...] (repeated), one of the two")
    if any(len(group) < 2 for group in args.group or []):
        p.error("--group needs a name and at least one checkpoint")
    args.groups = [(group[0], group[1:]) for group in args.group] if args.group else [(None, [c]) for c in args.ckpt]
    args.paths = [c for _, members in args.groups for c in members]  # every checkpoint, in column order
    names = [name for name, _ in args.groups if name]
    if len(set(args.paths)) < len(args.paths) or len(set(names)) < len(names):
        p.error("a checkpoint or a group name is given twice")
    if args.images and not (args.save_color or args.save_pred):
        p.error("--images needs --save-color DIR and/or --save-pred DIR (there are no labels to score)")
    if args.mode == "slide" and not 0 < args.stride <= args.crop:
        p.error(f"--stride must be in (0, --crop], got {args.stride} and {args.crop}")
    return args

# ---------------------------------------------------------------- inference


def slide(model, x, crop, stride):
    """Sliding-window logits, averaged over the windows that cover each pixel. x (1, 3, H, W) -> (1, N, H, W).

    Windows of crop×crop every `stride` px; the last window of a row/column is moved back to end at the border, and
    a side shorter than `crop` gets one window of its own length (no padding).
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

    Softmax probabilities averaged over the passes, as mmsegmentation does: one per scale s at round(s·H)×round(s·W),
    with `flip` each one's mirror image too, the logits mirrored back and resized to H×W first.
    Paper is silent on test-time augmentation, and on whether its mIoU is of whole images or sliding windows: the
    default is one whole-image pass, --mode slide the other (README, "Whole image or sliding window?").
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


# ---------------------------------------------------------------- pictures


def save_color(path, image, preds, names, sel, ratios, target=None):
    """One PNG of H×W panels, COLUMNS a row (Fig. 2): image | ground truth | each checkpoint's prediction | S | masks.

    image (3, H, W) uint8; preds: one (H, W) trainIds per checkpoint, labelled with its name; target (H, W)
    trainIds, or None for your own images (then no ground-truth panel and no errors). S = σ(sel) and the Top-K
    masks are the first checkpoint's, sel (1, 1, h, w): the masks of the ratios are nested, so each location is
    coloured by the smallest ratio whose mask holds it.
    """
    H, W = image.shape[-2:]
    rgb = image.cpu().float() / 255  # (3, H, W)
    palette = torch.tensor(PALETTE + ((0, 0, 0),), dtype=torch.float) / 255  # (20, 3): the last, black, for ignore
    paint = lambda labels: palette[labels.cpu().clamp(max=len(PALETTE))].permute(2, 0, 1)  # noqa: E731  (3, H, W)
    panels = [(rgb, [("image", "white")])]
    if target is not None:
        panels.append((paint(target), [("ground truth", "white")]))
    for pred, name in zip(preds, names):
        color, legend = paint(pred), [(name if len(preds) > 1 else "prediction", "white")]
        if target is not None:
            wrong = ((pred != target) & (target != 255)).cpu()  # (H, W)
            color = torch.where(wrong, torch.tensor(WRONG)[:, None, None] / 255, color)
            legend.append(("wrong: white", WRONG))
        panels.append((color, legend))
    S = sel.float().sigmoid().cpu()  # (1, 1, h, w)   Eq. (1)
    s = TF.interpolate(S, size=(H, W), mode="bilinear", align_corners=False)[0]  # (1, H, W)
    heat = torch.cat([(3 * s).clamp(0, 1), (3 * s - 1).clamp(0, 1), (3 * s - 2).clamp(0, 1)])  # (3, H, W) black→white
    level = sum(topk_masks(sel.cpu(), ratios))  # (1, 1, h, w): number of masks holding each cell
    level = TF.interpolate(level, size=(H, W), mode="nearest")[0, 0].long()  # (H, W)
    inner = (len(ratios) - level).clamp(max=len(ratios) - 1) % len(MASK_COLORS)  # (H, W) index of the smallest mask
    mask_rgb = torch.tensor(MASK_COLORS, dtype=torch.float)[inner].permute(2, 0, 1) / 255  # (3, H, W)
    masks = torch.where(level > 0, 0.35 * rgb + 0.65 * mask_rgb, 0.5 * rgb)  # (3, H, W)
    first = f" of {names[0]}" if len(preds) > 1 else ""
    legend = [(f"Top-K masks{first}:", "white")] + [(f"{r:.0%}", MASK_COLORS[i % 4]) for i, r in enumerate(ratios)]
    panels += [(0.4 * rgb + 0.6 * heat, [(f"S = sigmoid(sel){first}", "white")]), (masks, legend)]
    picture = Image.new("RGB", (COLUMNS * W, math.ceil(len(panels) / COLUMNS) * H))  # black
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=max(10, H // 20))  # Pillow ≥ 10.1
    for i, (panel, items) in enumerate(panels):
        left, top = i % COLUMNS * W, i // COLUMNS * H
        picture.paste(Image.fromarray((panel * 255).round().byte().permute(1, 2, 0).numpy()), (left, top))
        x = left + 3
        for text, fill in items:
            box = draw.textbbox((x, top + 2), text, font=font)
            draw.rectangle(box, fill="black")
            draw.text((x, top + 2), text, fill=fill, font=font)
            x = box[2] + 4
    picture.save(path)


# ---------------------------------------------------------------- scores and comparison


def column_names(paths):
    """A short name per checkpoint: the fewest trailing path parts, without .pt, that tell them apart."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(q[-k:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    return list(paths)  # one file written two ways (a.pt, ./a.pt): the paths as given


def scores(cm, hard, path, images, args):
    """One checkpoint's metrics: fractions, None where a class never occurs (as --json writes them)."""
    result, hr = cm.compute(), hard.compute()
    iou, bf = result["iou"], hr["bf"]
    thin = iou[[CLASSES.index(c) for c in THIN]].nanmean().item()
    nan_none = lambda v: None if math.isnan(v) else v  # noqa: E731
    per_class = lambda values: {n: nan_none(v) for n, v in zip(CLASSES, values.tolist())}  # noqa: E731
    return {"mIoU": nan_none(result["miou"]), "pixel_acc": result["acc"], "thin_mIoU": nan_none(thin),
            "IoU": per_class(iou), "trimap_mIoU": {str(d): nan_none(v) for d, v in hr["trimap"].items()},
            "boundary_F": nan_none(bf.nanmean().item()), "boundary_F_tol_px": args.bf_tol,
            "boundary_F_per_class": per_class(bf), "images": images, "ckpt": path,
            **{k: vars(args)[k] for k in ("split", "mode", "crop", "stride", "scales", "flip", "amp")}}


def pct(v):
    """A fraction as a percentage, '-' where it is undefined (None or NaN)."""
    return "    -" if v is None or math.isnan(v) else f"{100 * v:5.2f}"


def print_scores(m):
    """The report of one checkpoint: per-class IoU and boundary F, then mIoU and the hard regions."""
    tol = m["boundary_F_tol_px"]
    print(f"\n{'class':<15}{'IoU':>7}{f'BF@{tol}px':>9}")
    for name in CLASSES:
        print(f"{name:<15}{pct(m['IoU'][name]):>7}{pct(m['boundary_F_per_class'][name]):>9}")
    print(f"{'mean':<15}{pct(m['mIoU']):>7}{pct(m['boundary_F']):>9}")
    print(f"\nmIoU {pct(m['mIoU'])} | pixel acc {pct(m['pixel_acc'])} | thin classes ({', '.join(THIN)}) "
          f"mIoU {pct(m['thin_mIoU'])}")
    print("trimap mIoU " + " | ".join(f"±{d}px {pct(v)}" for d, v in m["trimap_mIoU"].items())
          + f" | boundary F @{tol}px {pct(m['boundary_F'])}")


def table_rows(m):
    """One checkpoint's metrics -> {row of the comparison table: fraction or None}, in the table's order."""
    rows = {"mIoU": m["mIoU"], "pixel acc": m["pixel_acc"], "thin-class mIoU": m["thin_mIoU"]}
    rows.update({f"trimap mIoU ±{d}px": v for d, v in m["trimap_mIoU"].items()})
    rows[f"boundary F @{m['boundary_F_tol_px']}px"] = m["boundary_F"]
    rows.update({f"IoU {c}": v for c, v in m["IoU"].items()})
    return rows


def beyond_noise(delta, std_a, std_b):
    """Is a difference of group means beyond seed noise: |Δ| > the larger std of the two groups (None: a group
    of one)? None when neither has a std or Δ is undefined. Simple on purpose: a few seeds carry no test."""
    stds = [s for s in (std_a, std_b) if s is not None]
    if delta is None or not stds:
        return None
    return abs(delta) > max(stds)


def compare(results, names, groups):
    """Several checkpoints' metrics -> {"checkpoints": name -> metrics, "groups": name -> members and, per table
    row, mean, std (sample, n − 1), delta (mean − the first group's mean) and beyond_noise, "rule"}.
    A class that never occurred in a checkpoint (None) is left out of its group's mean and std."""
    columns, start = {}, 0
    for group, members in groups:  # --ckpt: groups of one, named by their checkpoint
        rows = [table_rows(m) for m in results[start:start + len(members)]]
        c = {"members": names[start:start + len(members)], "mean": {}, "std": {}, "delta": {}, "beyond_noise": {}}
        columns[group or names[start]] = c
        ref, start = next(iter(columns.values())), start + len(members)
        for row in rows[0]:
            v = [r[row] for r in rows if r[row] is not None]
            mean = c["mean"][row] = statistics.mean(v) if v else None
            c["std"][row] = statistics.stdev(v) if len(v) > 1 else None  # none for a group of one
            c["delta"][row] = None if mean is None or ref["mean"][row] is None else mean - ref["mean"][row]
            c["beyond_noise"][row] = beyond_noise(c["delta"][row], c["std"][row], ref["std"][row])
    return {"checkpoints": dict(zip(names, results)), "groups": columns, "rule": NOISE_RULE}


def print_comparison(comparison):
    """The comparison table in %: a row per metric; a column per group (mean ± std) or checkpoint, then the Δs."""
    columns = list(comparison["groups"].items())  # [(name, group)], the first is the reference
    for name, c in columns:
        if len(c["members"]) > 1:
            print(f"{name}: mean ± std over {', '.join(c['members'])}")
    width = max(14, *(len(f"Δ {name}") for name, _ in columns)) + 3
    mark = {True: " *", False: " ~", None: "  "}
    header = [name for name, _ in columns] + [f"Δ {name}" for name, _ in columns[1:]]
    print(f"\n{'':<19}" + "".join(f"{h:>{width}}" for h in header))
    for row in columns[0][1]["mean"]:
        cells = []
        for _, c in columns:
            cells.append(pct(c["mean"][row]) + ("" if c["std"][row] is None else f" ± {100 * c['std'][row]:.2f}"))
        for _, c in columns[1:]:
            delta = c["delta"][row]
            cells.append("    -  " if delta is None else f"{100 * delta:+.2f}{mark[c['beyond_noise'][row]]}")
        print(f"{row:<19}" + "".join(f"{cell:>{width}}" for cell in cells))
    print(NOISE_RULE if any(len(c["members"]) > 1 for _, c in columns) else NO_GROUPS)


# ---------------------------------------------------------------- main


def infer(models, names, image, stem, args, amp_dtype, target=None):
    """Each model's (H, W) trainIds for one image (3, H, W) uint8 on the device; writes `stem`_pred.png (one per model)
    and `stem`_color.png when --save-pred and --save-color ask, the latter with the ground truth if target (H, W)."""
    x = normalize(image[None])  # (1, 3, H, W)
    preds = [predict(model, x, mode=args.mode, crop=args.crop, stride=args.stride, scales=args.scales, flip=args.flip,
                     amp_dtype=amp_dtype).argmax(1)[0] for model in models]  # (H, W) each
    for pred, name in zip(preds, names) if args.save_pred else ():  # labelIds, as the official script reads them
        folder = Path(args.save_pred, name.replace("/", "_") if len(names) > 1 else "")
        folder.mkdir(parents=True, exist_ok=True)  # here, once every input has been checked
        Image.fromarray(to_label_ids(pred).byte().cpu().numpy()).save(folder / f"{stem}_pred.png")
    if args.save_color:
        Path(args.save_color).mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            _, sel = models[0](x)  # (1, 1, h, w)   whole image at scale 1, whatever --mode
        save_color(Path(args.save_color) / f"{stem}_color.png", image, preds, names, sel, models[0].ratios, target)
    return preds


def own_images(models, names, args, device, amp_dtype):
    """--images: the files given and the .png/.jpg/.jpeg files of the folders given, any size, RGB / grey / RGBA
    (converted to RGB). An unreadable file is named in one line and skipped; the run ends with an error."""
    paths = [f for p in map(Path, args.images) for f in
             (sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg")) if p.is_dir() else [p])]
    if not paths:
        raise DataError(f"no .png/.jpg/.jpeg images in {' '.join(args.images)}")
    first = {}  # outputs are named by stem: one would overwrite another
    for p in paths:
        if first.setdefault(p.stem, p) != p:
            raise DataError(f"{first[p.stem]} and {p} share a file name without extension, which names their "
                            "outputs: rename one or run them apart")
    failed, t0 = [], time.time()
    for i, path in enumerate(paths):
        try:
            image = read_image(path, "RGB").permute(2, 0, 1)  # (3, H, W) uint8
        except DataError as e:
            print(f"skipped: {e}")
            failed.append(path)
        else:
            infer(models, names, image.to(device), path.stem, args, amp_dtype)
        if (i + 1) % args.log_every == 0 or i + 1 == len(paths):
            print(f"{i + 1}/{len(paths)} images | {(i + 1 - len(failed)) / (time.time() - t0):.2f} img/s")
    if failed:
        raise DataError(f"{len(failed)} of {len(paths)} images could not be read (named above); "
                        "the others were written")
    return paths


def main(args):
    """One checkpoint: its metrics (as --json writes them); several: the comparison; --images: the paths drawn."""
    device = get_device(args.device)
    args.amp, amp_dtype = resolve_amp(args.amp, device)
    names, models, configs = column_names(args.paths), [], []
    for path in args.paths:  # every checkpoint is read and checked before anything is written
        model, config = load_model(path)
        if config["model"].get("num_classes", 19) != len(CLASSES):
            raise DataError(f"{path} holds a {config['model']['num_classes']}-class model; "
                            f"Cityscapes evaluation needs {len(CLASSES)} classes")
        model.to(device)
        models.append(torch.compile(model, dynamic=False) if args.compile else model)  # model.ratios still reachable
        configs.append(config)
    if args.json and not Path(args.json).parent.is_dir():
        raise DataError(f"--json {args.json}: folder {Path(args.json).parent} not found")
    if args.images:
        return own_images(models, names, args, device, amp_dtype)
    data = args.data or configs[0].get("data")
    if not data:
        raise DataError(f"{args.paths[0]} stores no data path: pass --data /path/to/cityscapes")
    dataset = Cityscapes(data, args.split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers)
    who = args.paths[0] if len(args.paths) == 1 else f"{len(args.paths)} checkpoints ({', '.join(names)})"
    print(f"{who}: {len(dataset)} {args.split} images from {data} | mode {args.mode} | scales "
          f"{args.scales} | flip {args.flip} | amp {args.amp} | {device}")

    counts = [(ConfusionMatrix(len(CLASSES)), HardRegions(args.trimap, args.bf_tol, len(CLASSES))) for _ in models]
    t0 = time.time()
    for i, (image, target) in enumerate(loader):  # each image read once, predicted by every model
        target = target.to(device).long()  # (H, W)
        stem = dataset.images[i].name.replace("_leftImg8bit.png", "")
        preds = infer(models, names, image.to(device), stem, args, amp_dtype, target)
        for (cm, hard), pred in zip(counts, preds):
            cm.update(pred, target)
            hard.update(pred, target)
        if (i + 1) % args.log_every == 0 or i + 1 == len(dataset):
            so_far = " / ".join(f"{cm.compute()['miou'] * 100:.2f}" for cm, _ in counts)
            print(f"{i + 1}/{len(dataset)} images | {(i + 1) / (time.time() - t0):.2f} img/s | mIoU so far {so_far}")

    results = [scores(cm, hard, path, len(dataset), args) for (cm, hard), path in zip(counts, args.paths)]
    if len(results) == 1:
        out = results[0]
        print_scores(out)
    else:
        out = compare(results, names, args.groups)
        print_comparison(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    run_script(main, get_args())
