"""Tests for the FoR-Net reference: CPU only, small inputs, no network. Run: python -m pytest -q"""
import pytest
import torch
import torch.nn as nn

from fornet import FoRNet, FoRNetLoss, boundary_map, load_backbone, topk_mask

torch.set_num_threads(2)


def small_model(**kw):
    """ResNet-50 backbone with a narrow head: the smallest configuration that is still FoR-Net."""
    torch.manual_seed(0)
    return FoRNet(**{"num_classes": 5, "backbone": "resnet50", "channels": 32, **kw})


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_shapes_and_output_stride(backbone):
    model = FoRNet(num_classes=7, backbone=backbone, channels=32).eval()
    with torch.no_grad():
        logits, sel = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 7, 64, 96)
    assert sel.shape == (2, 1, 8, 12)  # output stride 8


def test_input_not_multiple_of_8():
    with torch.no_grad():
        logits, sel = small_model().eval()(torch.randn(1, 3, 50, 75))
    assert logits.shape == (1, 5, 50, 75)
    assert sel.shape == (1, 1, 7, 10)  # ceil(50/8), ceil(75/8)


def test_default_model_has_no_batchnorm():
    model = FoRNet()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in small_model(norm="bn").modules())


def test_batched_equals_per_sample():
    model = small_model().eval()
    x = torch.randn(3, 3, 48, 64)
    with torch.no_grad():
        logits, sel = model(x)
        for i in range(3):
            li, si = model(x[i:i + 1])
            torch.testing.assert_close(li, logits[i:i + 1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(si, sel[i:i + 1], rtol=1e-4, atol=1e-4)


def test_seven_by_seven_branch_dilation_and_S_range():
    model = small_model(dilation=4)
    convs = [branch[0] for branch in model.branches]
    assert [c.kernel_size[0] for c in convs] == [1, 3, 5, 7]
    assert [c.dilation[0] for c in convs] == [1, 1, 1, 4]
    assert FoRNet(backbone="resnet50").branches[3][0].dilation == (16, 16)  # the paper's best
    _, sel = model.eval()(torch.randn(2, 3, 40, 40))
    S = sel.sigmoid()
    assert S.min() >= 0 and S.max() <= 1


def test_selector_logits_are_float32_under_bf16_autocast():
    model = small_model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, sel = model(torch.randn(1, 3, 32, 32))
    assert sel.dtype == torch.float32 and logits.dtype == torch.float32


# ---------------------------------------------------------------- Top-K


def test_topk_mask_exact_count_and_true_top():
    torch.manual_seed(0)
    scores = torch.rand(4, 1, 7, 9)
    for ratio in (0.1, 0.25, 0.5, 1.0):
        M = topk_mask(scores, ratio)
        k = max(1, round(ratio * 63))
        assert M.shape == scores.shape and set(M.unique().tolist()) <= {0.0, 1.0}
        assert (M.flatten(1).sum(1) == k).all()
        for b in range(4):
            chosen = scores[b].flatten()[M[b].flatten() == 1]
            rest = scores[b].flatten()[M[b].flatten() == 0]
            assert len(rest) == 0 or chosen.min() > rest.max()


def test_topk_mask_edge_ratios_and_ties():
    scores = torch.zeros(2, 1, 3, 3)  # all tied
    assert (topk_mask(scores, 1e-6).flatten(1).sum(1) == 1).all()  # at least one
    assert (topk_mask(scores, 1.0) == 1).all()
    assert (topk_mask(scores, 0.5).flatten(1).sum(1) == 4).all()  # round(4.5) = 4
    with pytest.raises(AssertionError):
        topk_mask(scores, 0.0)
    with pytest.raises(AssertionError):
        topk_mask(scores, 1.5)
    half = torch.rand(2, 1, 8, 8).to(torch.bfloat16)  # ties from half precision: still exact and nested
    m1, m2 = topk_mask(half, 0.1), topk_mask(half, 0.3)
    assert (m1.flatten(1).sum(1) == 6).all() and (m1 <= m2).all()


def test_topk_mask_per_image_independence():
    torch.manual_seed(1)
    a, b = torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6)
    both = topk_mask(torch.cat([a, b]), 0.3)
    assert torch.equal(both[0:1], topk_mask(a, 0.3)) and torch.equal(both[1:2], topk_mask(b, 0.3))
    assert torch.equal(topk_mask(torch.cat([a, b * 100]), 0.3)[0:1], topk_mask(a, 0.3))  # scale of b irrelevant to a


# ---------------------------------------------------------------- gradient path


def selector_grad(model, term, x, target):
    """Gradient norm that one part of the objective sends to the selector φ's parameters."""
    model.zero_grad()
    logits, sel = model(x)
    if term == "seg":  # L_CE + λ1·L_Dice
        loss = FoRNetLoss(num_classes=5, lambda_sel=0)(logits, sel, target)[0]
    else:  # L_sel, Eq. (9)
        loss = nn.functional.binary_cross_entropy_with_logits(sel, boundary_map(target, sel.shape[-2:])[0])
    loss.backward()
    return sum(p.grad.norm() for p in model.selector.parameters() if p.grad is not None)


def test_gradient_path_to_selector():
    """Documented path: with straight_through (default) L_CE + L_Dice reach φ; without, only L_sel does."""
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    ste = small_model()
    assert selector_grad(ste, "seg", x, target) > 0
    assert selector_grad(ste, "sel", x, target) > 0
    hard = small_model(straight_through=False)
    assert selector_grad(hard, "seg", x, target) == 0
    assert selector_grad(hard, "sel", x, target) > 0
    # the forward value is the hard mask either way
    with torch.no_grad():
        torch.testing.assert_close(ste.eval()(x)[0], hard.eval()(x)[0])


# ---------------------------------------------------------------- objective


def test_boundary_map_on_hand_made_labels():
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[:, :, 8:] = 1  # vertical edge between columns 7 and 8
    target[:, :4, :] = 255  # top rows ignored
    B_map, valid = boundary_map(target, (2, 2))
    # cells are 8×8: the edge lies in both columns of cells; the top cells still hold labelled pixels
    assert B_map.tolist() == [[[[1.0, 1.0], [1.0, 1.0]]]]
    assert valid.tolist() == [[[[1.0, 1.0], [1.0, 1.0]]]]
    B4, _ = boundary_map(target, (4, 4))
    assert B4[0, 0, 1:].tolist() == [[0, 1, 1, 0]] * 3  # only cells touching the edge
    assert B4[0, 0, 0].sum() == 0  # ignored rows: no boundary against void
    empty = torch.full((1, 16, 16), 255)
    B_e, v_e = boundary_map(empty, (2, 2))
    assert B_e.sum() == 0 and v_e.sum() == 0


def test_loss_ignores_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, 16, requires_grad=True)
    sel = torch.randn(2, 1, 2, 2, requires_grad=True)
    target = torch.randint(0, 5, (2, 16, 16))
    target[0, :8] = 255  # the whole upper half of image 0 = its top two cells
    total, parts = FoRNetLoss(num_classes=5)(logits, sel, target)
    assert set(parts) >= {"ce", "dice", "sel"}
    total.backward()
    assert logits.grad[0, :, :8].abs().sum() == 0  # ignored pixels get no gradient
    assert logits.grad[0, :, 8:].abs().sum() > 0
    assert sel.grad[0, 0, 0].abs().sum() == 0 and sel.grad[0, 0, 1].abs().sum() > 0  # ignored cells too


def test_all_ignore_batch_is_finite():
    logits = torch.randn(2, 5, 16, 16, requires_grad=True)
    sel = torch.randn(2, 1, 2, 2, requires_grad=True)
    total, parts = FoRNetLoss(num_classes=5)(logits, sel, torch.full((2, 16, 16), 255))
    total.backward()
    assert torch.isfinite(total) and total == 0
    assert torch.isfinite(logits.grad).all()


def test_loss_finite_under_bf16_autocast():
    model, loss_fn = small_model(), FoRNetLoss(num_classes=5)
    target = torch.randint(0, 5, (2, 32, 32))
    target[:, :4] = 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = loss_fn(*model(torch.randn(2, 3, 32, 32)), target)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())


def test_small_model_overfits_one_batch():
    model, loss_fn = small_model(), FoRNetLoss(num_classes=5)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, :, 16:] = 1
    target[:, 20:, :] = 2
    target[0, :6, :6] = 255
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        total, _ = loss_fn(*model(x), target)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- pretrained weights


def test_load_backbone_from_local_path(tmp_path):
    """A GN checkpoint saved with OpenMMLab names (gn1, backbone. prefix) loads into our backbone."""
    torch.manual_seed(0)
    source = small_model().backbone.state_dict()
    mm = {"backbone." + k.replace("bn", "gn"): v for k, v in source.items()}
    torch.save({"state_dict": mm}, tmp_path / "r50_gn.pth")
    model = small_model(pretrained=str(tmp_path / "r50_gn.pth"))
    for k, v in source.items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    # BN-style weights (running stats) into GN: convs and affines load, stats are dropped
    bn = small_model(norm="bn").backbone.state_dict()
    torch.save(bn, tmp_path / "r50_bn.pth")
    gn = small_model(pretrained=str(tmp_path / "r50_bn.pth")).backbone.state_dict()
    assert torch.equal(gn["conv1.weight"], bn["conv1.weight"]) and torch.equal(gn["bn1.weight"], bn["bn1.weight"])
    torch.save({"something": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="match no parameter"):
        load_backbone(small_model().backbone, str(tmp_path / "junk.pth"), "resnet50")
    with pytest.raises(ValueError, match="cannot read"):
        load_backbone(small_model().backbone, str(tmp_path / "missing.pth"), "resnet50")


def test_load_backbone_imagenet_uses_torchvision_weights_api(monkeypatch):
    """`pretrained="imagenet"` goes through torchvision's weights API (network replaced here)."""
    import torchvision
    bn_state = small_model(norm="bn").backbone.state_dict()
    calls = []
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict",
                        lambda self, *a, **kw: calls.append(self) or bn_state)
    model = small_model(pretrained="imagenet")
    assert calls == [torchvision.models.ResNet50_Weights.IMAGENET1K_V2]
    assert torch.equal(model.backbone.state_dict()["layer4.2.conv3.weight"], bn_state["layer4.2.conv3.weight"])
