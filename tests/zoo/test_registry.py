"""The case registry and the model zoo: filters, errors, every case on the CPU, golden files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from align.errors import AlignError, UnknownCaseError
from align.numerics.names import PRECISIONS
from align.zoo import get_case, is_case, list_cases
from align.zoo.golden import golden_dir, load_golden

ZOO = {
    "classification": [
        "cspresnext50",
        "densenet121",
        "efficientnet_b4",
        "hrnet_w18",
        "mobilenetv2",
        "mobilenetv3_small",
        "resnet50",
        "resnet50_cifar100",
        "resnetv1d152",
        "resnext50_32x4d",
        "seresnet50",
        "shufflenetv2_1x",
        "spnasnet_100",
    ],
    "detection": [
        "fcos_r50",
        "retinanet_r50",
        "solov2_r50",
        "ssd300",
        "ssd512",
        "ssdlite_mobilenetv2",
    ],
}
ALL_ZOO = sorted(ZOO["classification"] + ZOO["detection"])
RUNNABLE = [n for n in ALL_ZOO if not get_case(n).skip]

# -- the registry -------------------------------------------------------------------------


def test_the_seed_zoo_is_registered_exactly() -> None:
    for family, names in ZOO.items():
        assert [n for n in list_cases() if get_case(n).family == family] == names
    assert len(ALL_ZOO) == 19


def test_list_cases_filters_with_fnmatch() -> None:
    assert list_cases("resnet*") == ["resnet50", "resnet50_cifar100", "resnetv1d152"]
    assert list_cases("ssd*") == ["ssd300", "ssd512", "ssdlite_mobilenetv2"]
    assert list_cases(["hrnet*", "*_r50"]) == [
        "fcos_r50",
        "hrnet_w18",
        "retinanet_r50",
        "solov2_r50",
    ]
    assert list_cases("no-such-*") == []
    assert list_cases() == sorted(list_cases())


def test_list_cases_exclusions() -> None:
    assert list_cases("resnet*", exclude="*cifar*") == ["resnet50", "resnetv1d152"]
    assert list_cases("ssd*", exclude=["ssd3*", "ssdlite*"]) == ["ssd512"]
    assert list_cases("resnet50", exclude="resnet50") == []


def test_list_cases_by_family() -> None:
    for family, names in ZOO.items():
        assert list_cases(family=family) == names
    assert list_cases("ssd*", exclude="ssdlite*", family="detection") == ["ssd300", "ssd512"]
    assert list_cases("resnet*", family="detection") == []
    with pytest.raises(AlignError, match="unknown case family 'segmentation'.*classification"):
        list_cases(family="segmentation")


def test_get_case_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownCaseError) as info:
        get_case("resnet51")
    err = info.value
    assert isinstance(err, AlignError) and isinstance(err, KeyError)
    text = str(err)
    assert text.startswith("unknown case 'resnet51'; registered cases: ")
    for name in ALL_ZOO:
        assert name in text
    assert "python -m align.list" in text
    assert not is_case("resnet51") and is_case("resnet50")


@pytest.mark.parametrize("name", ALL_ZOO)
def test_case_metadata(name: str) -> None:
    case = get_case(name)
    assert case.name == name
    assert case.figures, "every seed model has a documented figure"
    assert case.recipe is not None and case.recipe.source
    assert case.source_model and case.task in {
        "classification",
        "detection",
        "instance_segmentation",
    }
    assert case.test_batch >= 1 and len(case.input_size) == 3
    assert case.loss_fn is not None or case.skip


# -- every case on the CPU ----------------------------------------------------------------


def _call(model: nn.Module, inputs: object) -> object:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


# No `slow` mark: the largest (ssd512) builds and runs in about 9 CPU-seconds.
@pytest.mark.parametrize("name", RUNNABLE)
def test_case_runs_forward_and_backward_on_cpu(name: str) -> None:
    case = get_case(name)
    torch.manual_seed(0)
    model = case.build()
    assert model.training, "cases run in train mode (BatchNorm on batch statistics)"
    inputs = case.make_inputs(case.test_batch, 0)
    loss = case.loss_fn(_call(model, inputs), inputs)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "every trainable parameter gets a grad"
    assert any(g.abs().sum() > 0 for g in grads)


def _flat_tensors(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat_tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat_tensors(v)]
    return []


@pytest.mark.parametrize("name", RUNNABLE)
def test_inputs_are_fixed_by_the_seed(name: str) -> None:
    case = get_case(name)
    a = _flat_tensors(case.make_inputs(2, 0))
    b = _flat_tensors(case.make_inputs(2, 0))
    c = _flat_tensors(case.make_inputs(2, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    floats = [t for t in a if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    images = a[0] if case.family == "classification" else a[0][None]
    assert tuple(images.shape[1:]) == case.input_size


@pytest.mark.parametrize("name", ZOO["classification"])
def test_classification_loss_is_device_and_dtype_agnostic(name: str) -> None:
    case = get_case(name)
    inputs = case.make_inputs(4, 0)
    logits = torch.randn(
        4, 100 if "cifar" in name else 1000, generator=torch.Generator().manual_seed(1)
    )
    ref = case.loss_fn(logits, inputs)
    loss64 = case.loss_fn(logits.double(), inputs.double())
    assert loss64.dtype == torch.float64
    assert abs(loss64.item() - ref.item()) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):  # a cast never changes the labels
        low = case.loss_fn(logits.to(dtype), inputs.to(dtype))
        assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 0.05
    meta = case.loss_fn(logits.to("meta"), inputs)  # labels follow the output's device
    assert meta.device.type == "meta"


def test_detection_loss_sums_the_loss_dict() -> None:
    case = get_case("retinanet_r50")
    losses = {"classification": torch.tensor(1.5), "bbox_regression": torch.tensor(0.25)}
    assert case.loss_fn(losses, None).item() == 1.75
    with pytest.raises(AlignError, match="dict of losses"):
        case.loss_fn(torch.tensor(1.0), None)


def test_detection_targets_are_valid_boxes() -> None:
    for name in RUNNABLE:
        case = get_case(name)
        if case.family != "detection":
            continue
        images, targets = case.make_inputs(2, 0)
        _, height, width = case.input_size
        assert len(images) == len(targets) == 2
        for image, target in zip(images, targets):
            assert image.shape == (3, height, width) and 0 <= image.min() and image.max() <= 1
            boxes, labels = target["boxes"], target["labels"]
            assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
            first = 0 if case.source_model.startswith("mmdet") else 1  # torchvision: 0 = bg
            assert ((labels >= first) & (labels <= first + 89)).all()
            if first == 0:
                assert (labels <= 79).all()  # mmdet's 80 COCO classes
                assert target["masks"].shape == (2, height, width)


def test_cifar_variant_has_the_cifar_stem() -> None:
    case = get_case("resnet50_cifar100")
    model = case.build()
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1) and model.conv1.in_channels == 3
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 100
    assert case.input_size == (3, 32, 32)
    seen = {}

    def record(module: nn.Module, args: object, output: torch.Tensor) -> None:
        seen["layer1"] = output.shape

    model.layer1.register_forward_hook(record)
    out = model(case.make_inputs(2, 0))
    assert out.shape == (2, 100)
    assert seen["layer1"][-2:] == (32, 32), "no downsampling before layer1"


def test_solov2_without_mmcv_ops_skips_with_its_reason(monkeypatch) -> None:
    from align.zoo import solov2

    assert get_case("solov2_r50").skip == solov2.missing()  # None where mmdet runs
    monkeypatch.setattr(solov2.importlib.util, "find_spec", lambda name: None)
    reason = solov2.missing()
    assert "mmcv 2.1 with its compiled ops" in reason and "tools/install_mmdet.sh" in reason
    with pytest.raises(AlignError, match="solov2_r50 cannot run here: needs mmdet"):
        solov2.build()


# -- golden files -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_cases())
def test_every_case_reads_its_figures_from_its_golden_file(name: str) -> None:
    golden = load_golden(name)
    case = get_case(name)
    assert golden.figures == case.figures
    if name in ALL_ZOO:
        assert golden.recipe_source == case.recipe.source, "golden [recipe] source drifted"
        for precision in PRECISIONS:
            assert precision in golden.tolerances, f"{name}: no [tolerance.{precision}]"


def test_every_golden_file_belongs_to_a_case() -> None:
    files = {p.stem for p in golden_dir().glob("*.toml")}
    assert files == set(list_cases())


@pytest.mark.parametrize("name", ALL_ZOO)
def test_every_tolerance_value_says_where_it_comes_from(name: str) -> None:
    text = (golden_dir() / f"{name}.toml").read_text()
    value_lines = [ln for ln in text.splitlines() if ln.split("=")[0].strip() in ("k", "floor")]
    assert value_lines
    for line in value_lines:
        assert "#" in line, f"{name}: tolerance without a comment: {line!r}"


def _drop_path(model: nn.Module) -> float:
    return max(
        (float(m.drop_prob) for m in model.modules() if type(m).__name__ == "DropPath"),
        default=0.0,
    )


@pytest.mark.parametrize(
    "name,drop_rate,drop_path", [("efficientnet_b4", 0.4, 0.2), ("mobilenetv3_small", 0.2, 0.0)]
)
def test_cases_keep_their_recipes_dropout_and_drop_path(name, drop_rate, drop_path) -> None:
    """Random draws are replayed from the reference (align.numerics.decisions), so the cases train
    with their recipes' rates (timm's head dropout is functional, at `model.drop_rate`;
    drop-path rises linearly over the blocks towards its rate)."""
    model = get_case(name).build()
    assert model.drop_rate == drop_rate
    assert (0.75 * drop_path < _drop_path(model) <= drop_path) or drop_path == _drop_path(model)
