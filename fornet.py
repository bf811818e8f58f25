"""FoR-Net: Learning to Focus on Hard Regions for Efficient Semantic Segmentation.

A single-file reference implementation of arXiv:2605.02764 (Pan, Chan, Li, Shen, 2026), to be read next to the
paper. Part I is the paper: Sec. 3.1-3.6 in its order (the model, Eq. (1)-(8); the objective, Eq. (9)-(10)), then
what Sec. 4.1-4.2 specify (input, augmentation, mIoU; optimiser, lr, batch, epochs and schedule are train.py's). Part
II is what the paper leaves out; Part I calls it by name, so a reader with the paper open can stop at its banner.

Each choice of ours is labelled: "Paper is silent" (on what; what we chose, and from where), "≠ paper" (where we
differ from the paper, and why), "as the published model code" or "≠ published code" for the authors' `fornet/model.py`
(commit d81dcf6) and `fornet/loss.py` (commit a23f7ca) of github.com/henrychan0719/FoR-Net (commits its history no
longer holds): the same layout, with BatchNorm, the same 50.17 M parameters.

Shape legend, used in every trailing shape comment:
    B       batch size
    C       channels of the feature map F (256, see FoRNet)
    H, W    input image size
    h, w    stride-8 feature grid, h = ceil(H/8), w = ceil(W/8)
    H4, W4  stride-4 grid of the low-level features F_low
    N       number of classes (19 on Cityscapes)
    r_i     Top-K ratio of branch i: the paper's "top k percent" / 100; M_i keeps K_i = max(1, round(r_i·h·w))
            locations. k_i is the kernel size of branch C_i (Sec. 3.4). The boundary map B of Eq. (9) is `B_map`.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as TF  # `F` is the paper's feature map
import torchvision
import torchvision.transforms.v2.functional as TVF
from PIL import Image, ImageOps

IGNORE = 255  # Cityscapes convention: trainId 255 = ignore / void

# ======================================================================================================================
# Part I, the paper: Sec. 3 in its order, then Sec. 4.1-4.2
# ======================================================================================================================

# ---------------------------------------------------------------- Sec. 3.1: normalisation (the backbone: FoRNet)


def norm_layer(C, kind="gn"):
    """Sec. 3.1: "we replace all Batch Normalization layers with Group Normalization". -> a norm over C channels.

    Paper is silent on the number of groups: 32, the GroupNorm paper's default, and gcd(32, C) where 32 does not
    divide C (the decoder's 48-wide F_low projection: 16 groups). `GroupNorm` is nn.GroupNorm kept in its input's
    dtype under mixed precision (Part II).
    ≠ paper (opt-in): kind="bn" keeps BatchNorm, as the published model code does, for BatchNorm-trained weights.
    """
    if kind == "gn":
        return GroupNorm(math.gcd(32, C), C)
    if kind == "bn":
        return nn.BatchNorm2d(C)
    raise ValueError(f"norm must be 'gn' or 'bn', got {kind!r}")


def conv_norm_act(c_in, c_out, kernel, *, dilation=1, norm="gn"):
    """Conv (same padding, no bias) -> Norm -> ReLU: the building block of every head layer."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        norm_layer(c_out, norm),
        nn.ReLU(inplace=True),
    )


# ---------------------------------------------------------------- Sec. 3.2: selective region focus, Eq. (1)-(3)


class Selector(nn.Module):
    """The selector network φ of S = σ(φ(F)). Paper: Sec. 3.2, Eq. (1).

    F (B, C, h, w) -> φ(F) (B, 1, h, w), the selector *logits*, float32; S = σ(φ(F)) is taken in `FoRNet`.
    Paper is silent on the layout of φ ("a lightweight convolutional block followed by a 1×1 projection"): 3×3 conv
    C -> C/2 + norm + ReLU, then a 1×1 conv to one channel, as the published model code; in float32 under mixed
    precision (`autocast_off`), so that Top-K does not rank values full of ties.
    """

    def __init__(self, C, *, norm="gn"):
        super().__init__()
        self.block = conv_norm_act(C, C // 2, 3, norm=norm)
        self.proj = nn.Conv2d(C // 2, 1, 1)

    def forward(self, F):
        x = self.block(F)  # (B, C/2, h, w)
        with autocast_off(x):
            return self.proj(x.float())  # (B, 1, h, w)   φ(F)


def topk_masks(scores, ratios):
    """M_i = TopK(S), Eq. (2): for each ratio r_i, the {0,1} mask of the K_i = max(1, round(r_i·h·w)) top locations.

    scores (B, 1, h, w) -> one mask (B, 1, h, w), float32, per ratio, each image ranked on its own.
    Paper is silent on what K_i counts: every cell, also a training crop's padding (`TrainTransform`), as the
    published model code: the crop of an image scaled by less than 0.75 (768/1024) is partly padding, so training
    keeps a different share of the real cells than inference does. Paper is silent on the ranking: FoRNet ranks the
    logits φ(F), the order of S without the ties of float32 σ (1.0 for every logit above ≈ 17), and rounds with
    Python's round(), as the published model code. One ranking serves all ratios: the masks are nested (that of 0.1
    inside that of 0.2, ...). Not differentiable: see `FoRNet`'s straight_through.
    ≠ published code: ties go to the first position (a stable sort); its torch.topk leaves their order unspecified.
    """
    assert scores.dim() == 4 and scores.shape[1] == 1, f"scores must be (B, 1, h, w), got {tuple(scores.shape)}"
    assert all(0.0 < r <= 1.0 for r in ratios), f"Top-K ratios must be in (0, 1], got {ratios}"
    B, _, h, w = scores.shape
    order = torch.argsort(scores.detach().float().reshape(B, h * w), dim=1, descending=True, stable=True)  # (B, h*w)
    masks = []
    for r in ratios:
        M = torch.zeros(B, h * w, device=scores.device)  # (B, h*w)
        M.scatter_(1, order[:, :max(1, round(r * h * w))], 1.0)
        masks.append(M.view(B, 1, h, w))  # (B, 1, h, w)
    return masks


def select(F, M):
    """F_sel = F ⊙ M, Eq. (3): the features F (B, C, h, w) where the mask M (B, 1, h, w) is 1, zero elsewhere.
    Eq. (6) applies it to F_ctx, the features with global context."""
    return F * M.to(F.dtype)  # Eq. (3): F_sel = F ⊙ M, M broadcast over the C channels


# ---------------------------------------------------------------- Sec. 3.3: global context, Eq. (4)-(5)


class GlobalContext(nn.Module):
    """F_ctx = F + ψ(GAP(F)). Paper: Sec. 3.3, Eq. (4)-(5).

    F (B, C, h, w) -> F_ctx (B, C, h, w).
    Paper is silent on ψ ("a projection layer"): a two-layer 1×1 bottleneck C -> C/4 -> C with ReLU, as the
    published model code.
    """

    def __init__(self, C, *, reduction=4):
        super().__init__()
        c = C // reduction
        self.psi = nn.Sequential(nn.Conv2d(C, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, C, 1))

    def forward(self, F):
        g = self.psi(TF.adaptive_avg_pool2d(F, 1))  # (B, C, 1, 1)   Eq. (4): g = ψ(GAP(F))
        return F + g  # Eq. (5): F_ctx = F + g, g broadcast over h×w


# ---------------------------------------------------------------- Sec. 3.4: multi-scale reasoning, Eq. (6)-(7)


class Branches(nn.ModuleList):
    """The four branches C_i and their sum. Paper: Sec. 3.4, Eq. (6)-(7).

    (F, F_ctx (B, C, h, w), masks [(B, 1, h, w)] × 4) -> F_agg (B, C, h, w).
    C_i: a k_i×k_i convolution, k_i = 1, 3, 5, 7 (Sec. 3.4); the 7×7 one dilated (Sec. 4.5: 16 is the best).
    Paper is silent on what follows the convolution: norm + ReLU, as the published model code.
    """

    def __init__(self, C, *, kernels=(1, 3, 5, 7), dilation=16, norm="gn"):
        super().__init__(conv_norm_act(C, C, k_i, dilation=dilation if k_i == 7 else 1, norm=norm) for k_i in kernels)

    def forward(self, F, F_ctx, masks):
        F_agg = F
        for C_i, M_i in zip(self, masks):
            F_i = C_i(select(F_ctx, M_i))  # (B, C, h, w)   Eq. (6): F_i = C_i(F_ctx ⊙ M_i)
            F_agg = F_agg + F_i  # Eq. (7): F_agg = F + Σ_i F_i
        return F_agg


# ---------------------------------------------------------------- Sec. 3.5: decoder, Eq. (8)


class Decoder(nn.Module):
    """Y = D(F_agg, F_low). Paper: Sec. 3.5, Eq. (8).

    F_agg (B, C, h, w), F_low (B, 256, H4, W4) -> logits Y (B, N, H4, W4).
    Paper is silent on the layout ("a lightweight decoder consisting of convolutional layers"): DeepLabV3+-style, as
    the published model code: F_low projected to 48 channels, concatenated with F_agg upsampled to stride 4, two 3×3
    conv blocks, a 1×1 classifier.
    """

    def __init__(self, C, low_channels, num_classes, *, low_proj=48, norm="gn"):
        super().__init__()
        self.low = conv_norm_act(low_channels, low_proj, 1, norm=norm)
        self.fuse = nn.Sequential(conv_norm_act(C + low_proj, C, 3, norm=norm), conv_norm_act(C, C, 3, norm=norm))
        self.classifier = nn.Conv2d(C, num_classes, 1)

    def forward(self, F_agg, F_low):
        low = self.low(F_low)  # (B, 48, H4, W4)
        F_up = TF.interpolate(F_agg, size=low.shape[-2:], mode="bilinear", align_corners=False)  # (B, C, H4, W4)
        x = self.fuse(torch.cat([F_up, low], dim=1))  # (B, C, H4, W4)
        return self.classifier(x)  # (B, N, H4, W4)


# ---------------------------------------------------------------- the model: Sec. 3.1-3.5, Fig. 1


class FoRNet(nn.Module):
    """FoR-Net: ResNet (output stride 8) + selector-driven Top-K multi-scale reasoning + decoder.

    Paper: Sec. 3.1-3.5, Eq. (1)-(8), Fig. 1.
    x (B, 3, H, W), `normalize`d -> (logits (B, N, H, W), φ(F) (B, 1, h, w)), the selector logits: S = σ(φ(F)).
    Any H, W work; h = ceil(H/8).

    Arguments (keyword-only):
      num_classes  N, 19 for Cityscapes.
      backbone     "resnet101" (Sec. 3.1) or "resnet50" (small / CPU runs).
      norm         "gn" (Sec. 3.1, `norm_layer`) or "bn" (≠ paper, opt-in: for BatchNorm weights).
      pretrained   None (nothing is downloaded), "imagenet", "torchvision" or a path: `load_backbone` (Part II).
      channels     C, the width of F. Paper is silent; 256, as the published model code.
      ratios       Top-K ratio r_i of each branch's mask M_i, Eq. (2), (6). Paper is silent; (0.1, 0.2, 0.3, 0.4), as
                   the published model code. (1, 1, 1, 1) keeps every location: no selection.
      kernels      kernel size k_i of each branch C_i, Eq. (6): 1, 3, 5, 7 (Sec. 3.4).
      dilation     dilation of the 7×7 branch: 16, the paper's best (Sec. 4.5's "0 (no dilation)" is 1 here).
      straight_through  Paper is silent on whether L_CE and L_Dice reach φ through the hard masks. True, as the
                   published model code: M_i + S - sg(S) (sg: stop-gradient), M_i in value, its gradient into S, at
                   every ratio (1 too: ratios=(1, 1, 1, 1) removes the selection alone). False: only L_sel trains φ.
    """

    def __init__(self, *, num_classes=19, backbone="resnet101", norm="gn", pretrained=None, channels=256,
                 ratios=(0.10, 0.20, 0.30, 0.40), kernels=(1, 3, 5, 7), dilation=16, straight_through=True):
        super().__init__()
        assert backbone in ("resnet50", "resnet101"), f"backbone must be resnet50 or resnet101, got {backbone!r}"
        assert len(ratios) == len(kernels), "one Top-K ratio per branch"
        self.ratios, self.straight_through = tuple(ratios), straight_through
        # Sec. 3.1: output stride 8 = layer3 and layer4 dilated instead of strided.
        resnet = getattr(torchvision.models, backbone)(
            weights=None, replace_stride_with_dilation=[False, True, True], norm_layer=lambda c: norm_layer(c, norm))
        del resnet.avgpool, resnet.fc  # classification head unused
        self.backbone = resnet
        if pretrained is not None:
            load_backbone(self.backbone, pretrained, backbone)
        # Paper is silent on the width of F: a 1×1 conv, layer4's 2048 channels to C, as the published model code.
        self.reduce = conv_norm_act(2048, channels, 1, norm=norm)
        self.selector = Selector(channels, norm=norm)
        self.context = GlobalContext(channels)
        self.branches = Branches(channels, kernels=kernels, dilation=dilation, norm=norm)
        self.decoder = Decoder(channels, 256, num_classes, norm=norm)

    def forward(self, x):
        assert x.dim() == 4 and x.shape[1] == 3, f"expected images (B, 3, H, W), got {tuple(x.shape)}"
        net = self.backbone  # torchvision's ResNet: its `bn` layers are the GroupNorms of `norm_layer`
        # Paper is silent on which "earlier layers" give F_low: layer1 (stride 4), as the published model code.
        F_low = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))  # (B, 256, H4, W4)
        F = self.reduce(net.layer4(net.layer3(net.layer2(F_low))))  # (B, C, h, w)

        phi = self.selector(F)  # (B, 1, h, w)   φ(F), float32
        S = phi.sigmoid()  # Eq. (1): S = σ(φ(F))
        M = topk_masks(phi, self.ratios)  # [(B, 1, h, w)] × 4   Eq. (2): M_i = TopK(S), ranked on φ(F)
        if self.straight_through:
            M = [M_i + (S - S.detach()) for M_i in M]  # Paper is silent: value M_i, gradient into S (see above)
        F_ctx = self.context(F)  # Eq. (4)-(5): F_ctx = F + ψ(GAP(F))
        F_agg = self.branches(F, F_ctx, M)  # Eq. (6)-(7): F_agg = F + Σ_i C_i(F_ctx ⊙ M_i), ⊙ of Eq. (3)
        Y = self.decoder(F_agg, F_low)  # (B, N, H4, W4)   Eq. (8): Y = D(F_agg, F_low)
        # Paper is silent on how Y reaches the input size: bilinear, in float32, as the published model code.
        logits = TF.interpolate(Y.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, N, H, W)
        return logits, phi


# ---------------------------------------------------------------- Sec. 3.6: auxiliary supervision, Eq. (9)-(10)


def boundary_map(target, size, *, band=2, ignore_index=IGNORE):
    """The boundary map B of L_sel = BCE(S, B), Eq. (9), built from ground-truth trainIds.

    target (B, H, W) -> (B_map (B, 1, h, w) in [0, 1], cells (B, 1, h, w) in {0, 1}), float32, at `size` = (h, w).
    Paper is silent on B beyond "a boundary map constructed from ground truth labels"; as the published model code:
    a pixel is a boundary pixel when a different *valid* label lies in its 3×3 neighbourhood (void is no object). A
    cell holding one gets B = 1, a cell d ≤ `band` cells away (Chebyshev) 0.5^d: cells near an edge rank above the
    rest, as masks keeping 10-40 % of the cells need. `cells`: those holding a labelled pixel, over which L_sel
    averages (B is 0 elsewhere). With size = (H, W) and band = 0, B_map is the boundary pixels (`gt_boundary`).
    """
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    t = target.unsqueeze(1).float()  # (B, 1, H, W)
    above = float(ignore_index) + 1.0  # above every label: ignored pixels never win the min-pool below
    nb_max = TF.max_pool2d(torch.where(valid, t, -1.0), 3, stride=1, padding=1)  # (B, 1, H, W) largest valid label
    nb_min = -TF.max_pool2d(torch.where(valid, -t, -above), 3, stride=1, padding=1)  # (B, 1, H, W) smallest valid one
    edge = (valid & (nb_max != nb_min)).float()  # (B, 1, H, W)
    near = TF.adaptive_max_pool2d(edge, size)  # (B, 1, h, w) 1 on boundary cells
    B_map = near
    for d in range(1, band + 1):
        near = TF.max_pool2d(near, 3, stride=1, padding=1)  # (B, 1, h, w) within d cells of a boundary cell
        B_map = torch.maximum(B_map, 0.5**d * near)
    cells = TF.adaptive_max_pool2d(valid.float(), size)  # (B, 1, h, w)
    return B_map * cells, cells


class FoRNetLoss(nn.Module):
    """L = L_CE + λ1·L_Dice + λ2·L_sel. Paper: Sec. 3.6, Eq. (9)-(10). Paper is silent on λ1, λ2: 1.0 and 0.5, as the
    published model code.

    (logits (B, N, H, W), φ(F) (B, 1, h, w), target (B, H, W) trainIds) -> (L, {"ce", "dice", "sel"}), float32, the
    terms detached for logging. Each term is a ratio of sums over the labelled pixels (cells for L_sel), written term
    by term below. Paper is silent on several GPUs: the sums are added over all of them (`all_ranks_sum`) before the
    ratios, so that GPUs sharing a batch optimise exactly what one GPU with the whole batch does. No wait for the GPU.
    ≠ published code: a batch with no labelled pixel gives 0 (where the published code's L_Dice is 1).
    """

    def __init__(self, *, num_classes=19, lambda_dice=1.0, lambda_sel=0.5, ignore_index=IGNORE):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.lambda_dice, self.lambda_sel = lambda_dice, lambda_sel

    def forward(self, logits, phi, target):
        assert logits.shape[0] == target.shape[0] and logits.shape[-2:] == target.shape[-2:], \
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree"
        N = self.num_classes
        logits, phi, target = logits.float(), phi.float(), target.long()
        V = target != self.ignore_index  # (B, H, W) the labelled pixels
        t = target.masked_fill(~V, 0)  # (B, H, W) each pixel's label (class 0 where ignored, then weighted 0)
        log_P = logits.log_softmax(1)  # (B, N, H, W) log class probabilities
        log_P_t = log_P.gather(1, t.unsqueeze(1)).squeeze(1) * V  # (B, H, W) log P of the pixel's label; 0 if ignored

        # L_CE = −(1/|V|)·Σ_{p∈V} log P_t(p), P_t(p) the probability of pixel p's label. Paper is silent on void: the
        # mean over the labelled pixels V (trainId 255 left out), as the published model code.
        ce_sum, n_V = -log_P_t.sum(), V.sum().float()  # (), ()

        # L_Dice = the mean over the classes c in the target of 1 − (2·Σ_V P_c·T_c + 1) / (Σ_V P_c + Σ_V T_c + 1), T the
        # one-hot target. Paper is silent on the variant: soft, per class over the batch, smoothing 1, the mean over the
        # classes present, as the published model code. T is never built: Σ P_c·T_c adds up P_t per label, Σ T_c
        # counts the labels.
        per_class = lambda x: x.new_zeros(N).index_add(0, t.flatten(), x.flatten())  # noqa: E731  (N,) Σ by label
        inter = per_class(log_P_t.exp() * V)  # (N,) Σ P_c·T_c
        p_sum = torch.einsum("bnhw,bhw->n", log_P.exp(), V.float())  # (N,) Σ P_c
        t_sum = per_class(V.float())  # (N,) Σ T_c

        # L_sel = the mean of BCE(S, B) over the cells holding a labelled pixel (Paper is silent; as the published model
        # code); computed on the logits φ(F), where BCE of σ(φ) is one numerically safe step.
        B_map, cells = boundary_map(target, phi.shape[-2:], ignore_index=self.ignore_index)  # (B, 1, h, w) each
        bce = TF.binary_cross_entropy_with_logits(phi, B_map, reduction="none")  # (B, 1, h, w)   Eq. (9): BCE(S, B)
        sel_sum, n_cells = (bce * cells).sum(), cells.sum()  # (), ()

        # The global batch: every sum above added over all GPUs in one step (on one GPU: unchanged), then the ratios.
        sums = all_ranks_sum(ce_sum, n_V, inter, p_sum, t_sum, sel_sum, n_cells)
        ce_sum, n_V, inter, p_sum, t_sum, sel_sum, n_cells = sums
        L_ce = ce_sum / n_V.clamp(min=1)
        present = (t_sum > 0).float()  # (N,)
        L_dice = ((1 - (2 * inter + 1) / (p_sum + t_sum + 1)) * present).sum() / present.sum().clamp(min=1)
        L_sel = sel_sum / n_cells.clamp(min=1)
        total = L_ce + self.lambda_dice * L_dice + self.lambda_sel * L_sel  # Eq. (10)
        return total, {"ce": L_ce.detach(), "dice": L_dice.detach(), "sel": L_sel.detach()}


# ---------------------------------------------------------------- Sec. 4.1: input and augmentation

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet, RGB


def normalize(image):
    """The network's input: RGB (..., 3, H, W), uint8 or float in [0, 1] -> float32 with ImageNet mean/std. Paper is
    silent on it: the statistics the backbone's weights expect (`load_backbone`). Python scalars: no host copy."""
    x = image.float() / 255 if image.dtype == torch.uint8 else image.float().clone()
    for c, (mean, std) in enumerate(zip(MEAN.tolist(), STD.tolist())):
        x[..., c, :, :].sub_(mean).div_(std)
    return x


class TrainTransform:
    """Training augmentation, Sec. 4.1: random scale s, a crop×crop crop (768), horizontal flip.

    image (3, H, W) uint8, target (H, W) -> (3, crop, crop), (crop, crop), dtypes kept.
    Paper is silent on the scale range: 0.5-2.0, the common practice; on the rest: s, the crop's position and the flip
    (probability 0.5) drawn uniformly; a scaled image smaller than the crop padded at its bottom and right, image with
    the ImageNet mean, target 255. Only the window's source is resized (image bilinear, antialiased; label
    nearest-exact): scaling the whole image, up to rounding at the window's edges, at a cost that does not grow with s².
    """

    def __init__(self, crop=768, scale=(0.5, 2.0)):
        self.crop, self.scale = crop, scale

    def __call__(self, image, target):
        s = torch.empty(()).uniform_(*self.scale).item()
        H, W = target.shape
        size = [min(self.crop, round(L * s)) for L in (H, W)]  # the window once scaled: crop², or the scaled image
        win_h, win_w = [L if n < self.crop else min(L, round(self.crop / s)) for L, n in zip((H, W), size)]  # source
        top = torch.randint(0, H - win_h + 1, ()).item()
        left = torch.randint(0, W - win_w + 1, ()).item()
        image = TVF.resize(image[:, top:top + win_h, left:left + win_w], size, antialias=True)  # (3, *size) bilinear
        target = TVF.resize(target[None, top:top + win_h, left:left + win_w], size,
                            TVF.InterpolationMode.NEAREST_EXACT)[0]  # (*size)
        fill = MEAN if image.is_floating_point() else (MEAN * 255).round()
        out = fill.to(image.dtype)[:, None, None].repeat(1, self.crop, self.crop)  # (3, crop, crop)
        out[:, :size[0], :size[1]] = image
        target = TF.pad(target, (0, self.crop - size[1], 0, self.crop - size[0]), value=IGNORE)  # (crop, crop)
        if torch.rand(()) < 0.5:
            out, target = out.flip(-1), target.flip(-1)
        return out.contiguous(), target.contiguous()


# ---------------------------------------------------------------- Sec. 4.2: the mIoU


class ConfusionMatrix:
    """One int64 confusion matrix over a whole split; rows = ground truth, columns = prediction. Sec. 4.2: mIoU.

    IoU_c = TP / (TP + FP + FN); mIoU = the mean over the classes that occur (in ground truth or prediction; the
    others are NaN and left out). Paper is silent on the averaging: as the official Cityscapes evaluation computes
    it. Over several GPUs, `train.validate` sums `mat` over them (`all_ranks_sum`, on the GPU) before `compute`.
    """

    def __init__(self, num_classes=19, ignore_index=IGNORE):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred, target):
        """pred, target: int tensors of the same shape (any); target's ignore_index is skipped."""
        assert pred.shape == target.shape, f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ"
        keep = target != self.ignore_index
        n = self.num_classes
        idx = target[keep].long() * n + pred[keep].long()  # (P,)
        self.mat += torch.bincount(idx, minlength=n * n).cpu().view(n, n)  # (N, N)

    def compute(self):
        """-> {"iou": (N,) float64 with NaN for absent classes, "miou", "acc"} (fractions)."""
        m = self.mat.double()
        tp = m.diag()  # (N,)
        iou = tp / (m.sum(0) + m.sum(1) - tp)  # (N,)   0/0 = NaN for classes that never occur
        return {"iou": iou, "miou": iou.nanmean().item(), "acc": (tp.sum() / m.sum().clamp(min=1)).item()}


# ======================================================================================================================
# Part II, what the paper leaves out: mixed precision, ImageNet weights, sums over GPUs, Cityscapes files, the
# training order, a toy data set, hard-region metrics, checkpoints, devices and errors
# ======================================================================================================================

# ---------------------------------------------------------------- mixed precision


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps its input's dtype under autocast (`norm_layer`, Sec. 3.1); same parameters and names.

    Why: CUDA autocast runs group_norm in float32 (CPU autocast does not), so under bf16 every GN would return float32,
    the in-place ReLU after it would keep that float32 tensor for backward, and the next conv would make a bf16 copy
    again: more activation memory than no AMP at all. Here autocast is off and the affine parameters are cast to the
    input's dtype; the CUDA kernel still accumulates mean and variance in float32. Without autocast, with float32
    inputs, this is exactly nn.GroupNorm.
    """

    def forward(self, x):
        with autocast_off(x):
            weight = self.weight.to(x.dtype) if self.affine else None
            bias = self.bias.to(x.dtype) if self.affine else None
            return TF.group_norm(x, self.num_groups, weight, bias, self.eps)


def autocast_off(x):
    """A context with autocast switched off on x's device (cuda, cpu, mps, xpu; a meta tensor uses cpu's)."""
    return torch.autocast(x.device.type if x.device.type != "meta" else "cpu", enabled=False)


def resolve_amp(amp, device):
    """--amp -> (name, autocast dtype or None).

    "auto": bf16 on GPUs of compute capability ≥ 8.0 (Ampere and newer, where bf16 runs natively),
    fp16 with loss scaling on older GPUs (V100, T4: `torch.cuda.is_bf16_supported()` says True
    there too, counting emulation), off on a CPU. Paper is silent on mixed precision: our choice.
    """
    if amp == "auto":
        amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return amp, {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


# ---------------------------------------------------------------- ImageNet weights for the backbone

# GroupNorm-trained ImageNet ResNets: the GroupNorm authors' (Detectron's R-50-GN, R-101-GN; ImageNet top-1 76.0 and
# 77.4 %), as OpenMMLab publishes them. The 8 hex digits are the start of the file's SHA-256, checked on download.
GN_WEIGHTS = {"resnet50": "https://download.openmmlab.com/pretrain/third_party/resnet50_gn-9186a21c.pth",
              "resnet101": "https://download.openmmlab.com/pretrain/third_party/resnet101_gn-cac0ab98.pth"}


def caffe_conv1_to_rgb(weight):
    """conv1 weights made for Caffe-style input -> the same filters for our input, `normalize(rgb)`.

    weight (64, 3, 7, 7) -> (64, 3, 7, 7). Caffe-style input is BGR, 0-255, minus the mean (103.53, 116.28,
    123.675), std 1; ours is RGB, (x/255 - MEAN) / STD. Since 255·MEAN is exactly that mean,
    x_caffe[2 - c] = 255·STD[c]·x_ours[c]: flip the input channels and scale each by 255·STD[c]. conv1 has no bias
    and pads with zeros (the mean in both), so the first feature map is the same up to float32 rounding.
    """
    return weight.flip(1) * (255 * STD).view(1, 3, 1, 1)


def load_backbone(resnet, pretrained, arch):
    """Load ImageNet weights into a torchvision ResNet with GroupNorm or BatchNorm (README, "Initial weights").

    "imagenet": weights trained with the model's own norm layers: for GroupNorm `GN_WEIGHTS` (downloaded once into
      $TORCH_HOME/hub/checkpoints, hash-checked, OpenMMLab names, conv1 converted by `caffe_conv1_to_rgb`), for
      BatchNorm torchvision's IMAGENET1K_V2, as the published model code loads. "torchvision": IMAGENET1K_V2
      whatever the norm (the A/B; GroupNorm has no place for the running statistics). A path: a .pth state dict,
      bare or under "state_dict"/"model", torchvision or OpenMMLab names, trained on our input (`normalize`).
    Paper is silent on the initial weights. Prints what was loaded; DataError if it cannot be had or fits nothing.
    """
    group_norm = any(isinstance(m, nn.GroupNorm) for m in resnet.modules())
    caffe = pretrained == "imagenet" and group_norm
    if pretrained in ("imagenet", "torchvision"):
        weights = {"resnet50": torchvision.models.ResNet50_Weights, "resnet101": torchvision.models.ResNet101_Weights}
        source = url = GN_WEIGHTS[arch] if caffe else weights[arch].IMAGENET1K_V2.url
        try:  # as torchvision's weights API loads its own
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        except Exception as e:  # offline (URLError is an OSError), a wrong hash (RuntimeError), not a torch file
            raise DataError(f"could not get the ImageNet weights of {arch} ({first_line(e)}): put {url} in "
                            f"{torch.hub.get_dir()}/checkpoints/, or pass --pretrained PATH to a .pth, or none"
                            + (", or torchvision (BatchNorm-trained)" if caffe else "")) from None
    else:
        source = pretrained
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"pretrained weights {pretrained!r} not found") from None
        except Exception as e:  # not a torch file, pickled objects (torch.load's message suggests unsafe loading)
            raise DataError(f"cannot read pretrained weights {pretrained!r} ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        state = state.get(key, state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise DataError(f"{source} does not hold a state dict")
    own = resnet.state_dict()
    renamed = {}
    for name, tensor in state.items():
        name = re.sub(r"^(module\.)?(backbone\.)?", "", name)
        name = re.sub(r"(^|\.)gn(\d)", r"\1bn\2", name)  # OpenMMLab names GroupNorm layers gn1, gn2, ...
        if name in own and own[name].shape == tensor.shape:
            renamed[name] = tensor
    if not renamed:
        raise DataError(f"pretrained weights {source} match no parameter of {arch}")
    if caffe and "conv1.weight" in renamed:
        renamed["conv1.weight"] = caffe_conv1_to_rgb(renamed["conv1.weight"])
    missing = [n for n in own if n not in renamed]
    resnet.load_state_dict(renamed, strict=False)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one process per machine speaks
        converted = " (conv1 converted from Caffe-style input)" if caffe else ""
        not_found = f"; not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else ""
        print(f"backbone: loaded {len(renamed)}/{len(own)} tensors from {source}{converted}{not_found}")
        if group_norm and any("running_mean" in n for n in state):
            print("backbone: note: BatchNorm-trained weights loaded into GroupNorm, running statistics dropped "
                  "(see README, 'Initial weights')")


# ---------------------------------------------------------------- sums over all GPUs


def all_ranks_sum(*tensors):
    """The tensors, each summed over all processes when torch.distributed is initialised (else as they are), in one
    all-reduce, differentiably -> a tuple, in the same order and shapes. Used for `FoRNetLoss`'s sums and for
    `ConfusionMatrix.mat` (on the process's device: NCCL sums GPU tensors only).

    The backward pass sums the gradients over the ranks too: every rank's loss is a function of every rank's sums.
    DDP then averages the parameter gradients over the w ranks, which cancels the w copies of the loss: the result is
    the gradient of the one loss over the global batch.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensors
    flat = _AllRanksSum.apply(torch.cat([t.reshape(-1) for t in tensors]))  # (Σ numel,)
    return tuple(s.view_as(t) for s, t in zip(flat.split([t.numel() for t in tensors]), tensors))


class _AllRanksSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


# ---------------------------------------------------------------- Cityscapes files and id tables

# The 19 evaluated classes in trainId order, and their official colours.
CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
           "bicycle")
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# labelId of each trainId (cityscapesScripts' labels.py); every other id 0..33 maps to 255.
TRAIN_ID_TO_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# Lookup tables over all 256 uint8 values; -1 marks a value that is not a Cityscapes id.
# Ids are 0..33; 255 (license plate's -1 stored as uint8) is accepted as ignore.
ID_LUT = torch.full((256,), -1, dtype=torch.long)
ID_LUT[:34] = IGNORE
ID_LUT[255] = IGNORE
ID_LUT[list(TRAIN_ID_TO_ID)] = torch.arange(19)
TRAIN_ID_LUT = torch.full((256,), -1, dtype=torch.long)
TRAIN_ID_LUT[:19] = torch.arange(19)
TRAIN_ID_LUT[IGNORE] = IGNORE
LABEL_ID_LUT = torch.zeros(256, dtype=torch.long)  # trainId -> labelId; 255 (and anything else) -> 0 "unlabeled"
LABEL_ID_LUT[:19] = torch.tensor(TRAIN_ID_TO_ID)


def to_train_ids(label_ids):
    """Official labelIds (0..33) -> trainIds (0..18, 255 = ignore), int64; -1 for a value that is no id."""
    return ID_LUT.to(label_ids.device)[label_ids.long()]


def to_label_ids(train_ids):
    """trainIds (0..18; 255 -> 0 'unlabeled') -> official labelIds, int64: what the benchmark reads."""
    return LABEL_ID_LUT.to(train_ids.device)[train_ids.long()]


def read_image(path, mode=None):
    """An image file as a uint8 tensor, (H, W, 3) or (H, W), converted to the PIL `mode` (e.g. "RGB") if one is given;
    DataError naming the file if it cannot be read as an image."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # photos stored rotated, with an EXIF orientation tag
            return torch.from_numpy(np.array(im if mode is None else im.convert(mode)))
    except (OSError, ValueError) as e:  # missing, a folder, truncated, not an image
        raise DataError(f"cannot read {path}: {first_line(e)}") from None


class Cityscapes(torch.utils.data.Dataset):
    """Cityscapes fine annotations in the official layout.

    root/leftImg8bit/{split}/{city}/*_leftImg8bit.png paired with root/gtFine/{split}/{city}/*_gtFine_labelTrainIds.png
    when present (cityscapesScripts' createTrainIdLabelImgs), else *_gtFine_labelIds.png mapped with `to_train_ids`.
    ds[i] -> transform(image (3, H, W) uint8 RGB, target (H, W) uint8 trainIds), at full resolution when transform is
    None. Pairs are sorted by image path. Images stay uint8 (a quarter of float32) until `normalize` runs on the device.
    """

    def __init__(self, root, split="train", transform=None):
        image_dir = Path(root) / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise DataError(f"{image_dir} not found: expected the Cityscapes layout root/leftImg8bit/{split}/<city>/")
        self.images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise DataError(f"no *_leftImg8bit.png images under {image_dir}")
        self.labels = []
        for image in self.images:
            name = image.name.replace("_leftImg8bit.png", "_gtFine_")
            stem = Path(root) / "gtFine" / split / image.parent.name / name
            label = Path(f"{stem}labelTrainIds.png")
            label = label if label.exists() else Path(f"{stem}labelIds.png")
            if not label.exists():
                raise DataError(f"no label for {image}: expected {label}")
            self.labels.append(label)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = read_image(self.images[i])  # (H, W, 3) uint8
        label = read_image(self.labels[i])  # (H, W) uint8
        if image.dim() != 3 or image.shape[2] != 3 or label.shape != image.shape[:2]:
            raise DataError(f"{self.images[i]} {tuple(image.shape)} and {self.labels[i]} {tuple(label.shape)} disagree")
        lut = TRAIN_ID_LUT if self.labels[i].name.endswith("labelTrainIds.png") else ID_LUT
        target = lut[label.long()]  # (H, W) int64
        if (target < 0).any():
            bad = label[target < 0].unique().tolist()
            kind = "train" if lut is TRAIN_ID_LUT else ""
            raise DataError(f"{self.labels[i]} holds value(s) {bad}, not Cityscapes {kind}ids")
        image, target = image.permute(2, 0, 1), target.byte()  # (3, H, W), (H, W)
        return (image, target) if self.transform is None else self.transform(image, target)


# ---------------------------------------------------------------- the training order


class Stream(torch.utils.data.Sampler):
    """The training order, endless, from iteration `start` on: yields (image index, augmentation seed).

    Epoch e is a permutation drawn from (seed, e) with one augmentation seed per position, so a resumed run sees exactly
    what the uninterrupted run would have. Iteration j of an epoch takes positions j·B ... (j+1)·B - 1 (B the global
    batch; an epoch's last incomplete batch is dropped) and rank r of `world` the positions ≡ r mod world among them:
    the same images, with the same augmentation, whatever the number of GPUs.
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


# ---------------------------------------------------------------- a toy data set


def make_toy_cityscapes(root, *, n_train=48, n_val=12, size=(128, 256), seed=0):
    """Write a small synthetic data set in the exact Cityscapes layout and labelIds.

    Street-like scenes: sky, buildings, vegetation, sidewalk and road, crossed by thin poles carrying traffic signs and
    lights, with cars and people: the paper's hard regions (thin structures, sharp boundaries). Each class is drawn in
    its palette colour plus texture noise and a per-image brightness change. Returns root. Deterministic in `seed`.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(lo, hi):  # an integer in [lo, hi)
        return int(torch.randint(lo, hi, (), generator=g))

    H, W = size
    cls = {name: i for i, name in enumerate(CLASSES)}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = ("toytown", "mockburg")[i % 2]
            t = torch.full((H, W), cls["sky"], dtype=torch.long)  # trainIds
            horizon = rand(H * 3 // 10, H // 2)
            for x0 in range(0, W, rand(W // 8, W // 4)):  # buildings and trees along the street
                top = rand(H // 10, horizon)
                t[top:horizon + H // 10, x0:x0 + rand(W // 16, W // 6)] = cls[("building", "vegetation")[rand(0, 2)]]
            road_top = horizon + H // 10
            t[road_top:] = cls["road"]
            t[road_top:road_top + rand(H // 16, H // 8), :] = cls["sidewalk"]
            for _ in range(rand(1, 4)):  # cars and people on the road
                x0, y0 = rand(0, W - W // 6), rand(road_top, H - H // 10)
                t[y0:y0 + rand(H // 12, H // 6), x0:x0 + rand(W // 12, W // 5)] = cls["car"]
                px = rand(0, W - 4)
                t[road_top - H // 8:road_top + H // 16, px:px + rand(2, 5)] = cls["person"]
            for _ in range(rand(3, 7)):  # thin poles (2-5 px, under one stride-8 cell) with a sign or a light on top
                px, top, w = rand(4, W - 10), rand(H // 10, horizon), rand(2, 6)
                t[top:road_top + 2, px:px + w] = cls["pole"]
                t[top:top + rand(4, 9), px - 2:px + w + 2] = cls[("traffic sign", "traffic light")[rand(0, 2)]]
            colours = torch.tensor(PALETTE, dtype=torch.float)[t]  # (H, W, 3)
            noise = torch.randn(H, W, 3, generator=g) * 12 + torch.randn(3, generator=g) * 10
            image = ((colours + noise) * (0.75 + 0.5 * torch.rand((), generator=g))).clamp(0, 255).byte()  # (H, W, 3)
            label_ids = to_label_ids(t).byte()  # (H, W)
            label_ids[:H // 20] = 3  # "out of roi" strip at the top: an id that maps to ignore
            name = f"{city}_{i:06d}_000019"
            for kind, px, suffix in (("leftImg8bit", image, "leftImg8bit"), ("gtFine", label_ids, "gtFine_labelIds")):
                folder = Path(root) / kind / split / city
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(px.numpy()).save(folder / f"{name}_{suffix}.png")
    return root


# ---------------------------------------------------------------- hard-region metrics


def gt_boundary(target):
    """(H, W) trainIds -> (H, W) bool: labelled pixels with a different labelled trainId among their 8 neighbours."""
    return boundary_map(target[None], target.shape[-2:], band=0)[0][0, 0] > 0  # full size, not widened


def dilate(mask, d):
    """(..., H, W) bool -> (..., H, W) bool: pixels within Chebyshev distance d of a set pixel.

    The (2d+1)² max filter as a row pass and a column pass, each an OR of the mask shifted by 1..d px both ways:
    max_pool2d's result (tested), ~100× faster at d = 10 on 1024×2048 (1 CPU thread).
    """
    for dim in (-1, -2):
        src, mask, L = mask, mask.clone(), mask.shape[dim]
        for k in range(1, min(d, L - 1) + 1):
            mask.narrow(dim, k, L - k).logical_or_(src.narrow(dim, 0, L - k))  # from k px before
            mask.narrow(dim, 0, L - k).logical_or_(src.narrow(dim, k, L - k))  # from k px after
    return mask


class HardRegions:
    """Hard-region metrics over a split, from counts summed over its images (never per-image means).

    Trimap mIoU at width d: a ConfusionMatrix over the pixels within d px (Chebyshev) of a GT boundary pixel.
    Boundary F-score of class c: its boundary pixels (`gt_boundary`) in the GT and in the prediction (on labelled
    pixels); P = predicted ones within `tol` px of a GT one, R = GT ones within `tol` px of a predicted one,
    F_c = 2PR/(P+R); the mean over classes with a boundary pixel. Paper is silent on hard-region metrics: widths
    and tolerance are ours, and the F-score is not comparable with published ones (other tolerance, averaging).
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
        edge_pred = gt_boundary(pred.masked_fill(target == IGNORE, IGNORE))  # (H, W)
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


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(checkpoint, path):
    """torch.save, atomically: written to <path>.tmp, flushed to the disk, then renamed, so that a kill at any moment
    leaves the previous file intact. FloatingPointError, and nothing written, if checkpoint["model"] holds a non-finite
    weight. Whatever stops the write (a full disk, a vanished folder, Ctrl-C) removes the temporary file and is raised
    again."""
    weights = [t for t in checkpoint.get("model", {}).values() if t.is_floating_point()]
    if weights and not torch.stack([torch.isfinite(t).all() for t in weights]).all():
        raise FloatingPointError(f"non-finite weights at iteration {checkpoint.get('iter')}: {path} not written")
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: a failed write raises OSError (a path would give RuntimeError)
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """A train.py checkpoint as a dict, or DataError saying why it cannot be used.

    Both kinds hold "model" (the state dict), "config" (train.py's flags, with config["model"] = the FoRNet keyword
    arguments, and the data path) and "iter". last.pt is the full training state for --resume (+ "optimizer", "scaler",
    "best_miou"); best.pt holds what inference needs (+ "miou"), a third of last.pt's size since AdamW keeps two moments
    per weight.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} not found") from None
    except Exception as e:  # torch.load's own messages are long and suggest unsafe loading
        raise DataError(f"cannot load checkpoint {path}: not a PyTorch checkpoint ({type(e).__name__})") from None
    missing = [k for k in ("model", "config", "iter") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)})")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["config"].get("model"), dict):
        raise DataError(f"{path} has no config['model'] (the FoRNet arguments): not written by this train.py")
    return ckpt


def load_model(path):
    """A trained FoR-Net from a checkpoint (best.pt or last.pt) -> (model in eval mode, config).

        model, config = load_model("best.pt")
        logits, phi = model(normalize(image)[None])  # image (3, H, W) uint8, e.g. read_image(p, "RGB").permute(2, 0, 1)
    """
    ckpt = load_checkpoint(path)
    try:
        model = FoRNet(**ckpt["config"]["model"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, ValueError, AssertionError) as e:
        raise DataError(f"{path}: weights do not fit the model in its config: {first_line(e)}") from None
    return model.eval(), ckpt["config"]


# ---------------------------------------------------------------- devices and errors


class DataError(Exception):
    """A user's input that cannot be used: data set (missing, unpaired, corrupt, mislabelled), image, weights,
    checkpoint or flag. The scripts print its message as one line and exit non-zero (`run_script`)."""


def run_script(main, args):
    """main(args), as every script runs it: a DataError (a user's mistake) or a FloatingPointError (a run that
    diverged) ends as one `error: ...` line on stderr and exit status 1, not a traceback."""
    try:
        return main(args)
    except (DataError, FloatingPointError) as e:
        # A DataLoader worker's error arrives re-raised, its message holding the worker's traceback, which
        # ends with "fornet.DataError: <our message>".
        worker = [line.split("DataError: ", 1)[1] for line in str(e).splitlines() if "DataError: " in line]
        sys.exit("error: " + (worker[-1] if worker else first_line(e)))


def first_line(e):
    """An exception's message as one line: its first, or its type's name where it has none."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def get_device(name):
    """--device -> torch.device; DataError for a name that is no device, or a GPU where none is visible."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device (cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no GPU visible (use --device cpu)")
    return device


def peak_memory(device, reset=False):
    """GiB since the last reset: CUDA's allocator peak on a GPU; on a CPU the process's peak RSS (Linux)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    if not Path("/proc/self/status").exists():
        return math.nan
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 2**20


def environment(device):
    """One line naming the machine and the versions, printed with every measured figure."""
    versions = f"torch {torch.__version__} | torchvision {torchvision.__version__}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or "?"
        except (OSError, subprocess.SubprocessError):
            driver = "?"
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}) | driver {driver} | {versions} | "
                f"CUDA {torch.version.cuda} | cuDNN {torch.backends.cudnn.version()}")
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", info)
    isa = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"CPU {name[1] if name else '?'} ({isa}), {torch.get_num_threads()} threads | {versions}"
