"""Parse a Label Studio labelling config into what AlignSAM needs: one image, one mask control, its targets.

The config must contain an ``<Image>`` object and a ``<BrushLabels>`` control (preferred when both exist) or a
``<PolygonLabels>`` control whose ``toName`` is that image. Every ``<Label>`` of the control is a *target*: AlignSAM
learns one policy per target and segments it from a text prompt.

Text prompt of a target, first match wins:

1. ``extra_params["prompts"][<label value>]`` from Label Studio's model settings ("Extra params" of the ML
   backend, sent to ``/setup``), e.g. ``{"prompts": {"Shadow": "dark shadow on the ground"}}``;
2. the ``hint`` attribute of the ``<Label>`` tag (Label Studio shows it to annotators on hover, so it doubles
   as documentation), e.g. ``<Label value="Shadow" hint="dark shadow on the ground"/>``;
3. the label value itself (``Shadow``).

Smart tools for interactive correction sit next to the mask control, with the same label values (as Label Studio's
SAM examples use them): ``<KeyPointLabels name="kp" toName="image" smart="true">`` and/or ``<RectangleLabels
name="box" toName="image" smart="true">``. They are recorded as :class:`SmartControl` s; a click or box made with
them reaches ``/predict`` in ``params.context`` (:mod:`ml_backend.interactive`) and is answered with the clicked
label's mask on the mask control. A config with a smart tool and no mask control is refused like any config without
a mask control.

One region per instance: for projects that label every object of a class separately (every car, every cell),
``extra_params["instance_regions"]`` is ``true`` (every label), a list of labels, or ``false``; a label then gets one
brush region per instance its policy found instead of one region for their union (PolygonLabels always get one
polygon per connected piece). Unset, a label gets one region per instance when its policy prompts per instance
(its training chose that on the project's own held-out tasks: :mod:`alignsam.instances`).

A ``<Label value="Glass" alias="G">`` appears in results as its alias (``G``), as Label Studio stores it; its
prompt defaults to the value (``Glass``), and results naming either are accepted when annotations are read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from label_studio_sdk.label_interface import LabelInterface

from ml_backend.errors import LabelConfigError

MaskControlType = Literal["BrushLabels", "PolygonLabels"]
MASK_CONTROL_TYPES: tuple[MaskControlType, ...] = ("BrushLabels", "PolygonLabels")
SMART_CONTROL_TYPES = ("KeyPointLabels", "RectangleLabels")


@dataclass(frozen=True)
class SmartControl:
    """A smart ``<KeyPointLabels>`` / ``<RectangleLabels>`` control on the mask control's image.

    ``labels`` are its label names (aliases when given) that are also targets of the mask control: a click with
    any other label is not answered.
    """

    name: str
    tag: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One label of the mask control: what to segment and the text prompt that describes it.

    ``label`` is the name in results (the alias when the <Label> has one), ``value`` the <Label>'s value.
    """

    label: str
    prompt: str
    value: str | None = None


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a labelling config AlignSAM serves.

    ``control_name``/``image_name`` are the ``from_name``/``to_name`` of every result; ``image_key`` is the key of
    ``task["data"]`` holding the image URL (``$image`` -> ``image``).
    """

    control_name: str
    control_type: MaskControlType
    image_name: str
    image_key: str
    targets: tuple[Target, ...]
    config_hash: str = field(default="")
    smart_controls: tuple[SmartControl, ...] = ()
    instance_regions: tuple[str, ...] | None = None  # labels answered one region per instance; None: the policy's

    @property
    def result_type(self) -> str:
        """Label Studio's result ``type``: ``brushlabels`` or ``polygonlabels``."""
        return self.control_type.lower()

    @property
    def labels(self) -> list[str]:
        """Label values in config order."""
        return [t.label for t in self.targets]

    def target_for(self, label: str) -> Target | None:
        """The target a result label (value or alias) refers to, if any."""
        for target in self.targets:
            if label in (target.label, target.value):
                return target
        return None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (stored in Redis, passed to jobs)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelConfig:
        """Inverse of :meth:`to_json`."""
        targets = tuple(Target(**t) for t in data["targets"])
        smart = tuple(
            SmartControl(name=c["name"], tag=c["tag"], labels=tuple(c["labels"]))
            for c in data.get("smart_controls") or ()
        )
        return cls(
            control_name=data["control_name"],
            control_type=data["control_type"],
            image_name=data["image_name"],
            image_key=data["image_key"],
            targets=targets,
            config_hash=data.get("config_hash", ""),
            smart_controls=smart,
            instance_regions=None if data.get("instance_regions") is None else tuple(data["instance_regions"]),
        )

    def regions_per_instance(self, label: str, split: bool) -> bool:
        """Whether ``label``'s prediction is one region per instance (``split``: its policy found instances)."""
        return split if self.instance_regions is None else label in self.instance_regions

    def smart_control(self, name: str) -> SmartControl | None:
        """The smart control called ``name`` (a context result's ``from_name``), if any."""
        return next((c for c in self.smart_controls if c.name == name), None)


def config_hash(xml: str, extra_params: Mapping[str, Any] | None = None) -> str:
    """Short stable hash of a config (and the prompt overrides), to notice config changes."""
    payload = json.dumps({"xml": xml, "prompts": _prompt_overrides(extra_params),
                          "instance_regions": _instance_setting(extra_params)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _prompt_overrides(extra_params: Mapping[str, Any] | None) -> dict[str, str]:
    if not isinstance(extra_params, Mapping):
        return {}
    prompts = extra_params.get("prompts")
    if not isinstance(prompts, Mapping):
        return {}
    return {str(k): str(v) for k, v in prompts.items() if isinstance(v, str) and v.strip()}


def _instance_setting(extra_params: Mapping[str, Any] | None) -> bool | list[str] | None:
    value = extra_params.get("instance_regions") if isinstance(extra_params, Mapping) else None
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    if value is not None:
        raise LabelConfigError('extra_params "instance_regions" must be true, false or a list of label names, got '
                               f"{ascii(value)[:60]}")
    return None


def _instance_labels(extra_params: Mapping[str, Any] | None, targets: tuple[Target, ...]) -> tuple[str, ...] | None:
    setting = _instance_setting(extra_params)
    if setting is None:
        return None
    if setting is True:
        return tuple(t.label for t in targets)
    if setting is False:
        return ()
    known = {t.label for t in targets} | {t.value for t in targets if t.value}
    unknown = [v for v in setting if v not in known]
    if unknown:
        raise LabelConfigError(f'extra_params "instance_regions" names labels that are not in the config: {unknown}')
    return tuple(t.label for t in targets if t.label in setting or t.value in setting)


def parse_label_config(xml: str, extra_params: Mapping[str, Any] | None = None) -> LabelConfig:
    """Parse ``xml`` (Label Studio's ``schema`` / ``label_config``) into a :class:`LabelConfig`.

    Raises :class:`LabelConfigError` naming what is missing when the config cannot be served.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError(
            "The labelling config is empty. Send the project's label config XML "
            "(`schema` in /setup, `label_config` in /predict)."
        )
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several XML/validation error types
        raise LabelConfigError(
            f"The labelling config is not valid Label Studio XML ({type(exc).__name__}: {exc}). "
            "Fix it in the project's Labeling Interface settings."
        ) from exc

    images = {obj.name: obj for obj in interface.objects if obj.tag == "Image"}
    controls = [c for c in interface.controls if c.tag in MASK_CONTROL_TYPES]
    if not images and not controls:
        raise LabelConfigError(
            "The labelling config has no <Image> object tag and no <BrushLabels> or <PolygonLabels> control "
            'tag. Use e.g. <View><Image name="image" value="$image"/><BrushLabels name="tag" '
            'toName="image"><Label value="Object"/></BrushLabels></View>.'
        )
    if not images:
        raise LabelConfigError(
            'The labelling config has no <Image> object tag. Add <Image name="image" value="$image"/> and point '
            "the BrushLabels/PolygonLabels toName at it."
        )
    if not controls:
        raise LabelConfigError(
            "The labelling config has no <BrushLabels> or <PolygonLabels> control tag, so there is nothing to "
            'segment. Add e.g. <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>.'
        )
    # BrushLabels is the primary control: masks are what AlignSAM produces.
    controls.sort(key=lambda c: MASK_CONTROL_TYPES.index(c.tag))
    for control in controls:
        image_names = [name for name in control.to_name if name in images]
        if not image_names:
            continue
        image = images[image_names[0]]
        value = str(image.value or "")
        if not value.startswith("$") or len(value) < 2:
            raise LabelConfigError(
                f'The <Image name="{image.name}"> tag must take its URL from task data, e.g. value="$image"; '
                f"got value={value!r}."
            )
        targets = _targets(control, _prompt_overrides(extra_params))
        if not targets:
            raise LabelConfigError(
                f'The <{control.tag} name="{control.name}"> control has no <Label> tags. Add one <Label '
                'value="..."/> per thing to segment.'
            )
        return LabelConfig(
            control_name=control.name,
            control_type=control.tag,
            image_name=image.name,
            image_key=value[1:],
            targets=targets,
            config_hash=config_hash(xml, extra_params),
            smart_controls=_smart_controls(interface, image.name, targets),
            instance_regions=_instance_labels(extra_params, targets),
        )
    names = ", ".join(f"<{c.tag} name={c.name!r} toName={c.to_name!r}>" for c in controls)
    raise LabelConfigError(
        f"No BrushLabels/PolygonLabels control points at an <Image> tag ({names}; images: "
        f"{sorted(images)}). Set toName to the image tag's name."
    )


def _targets(control: Any, overrides: Mapping[str, str]) -> tuple[Target, ...]:
    targets: list[Target] = []
    attrs: Mapping[str, Any] = getattr(control, "labels_attrs", None) or {}
    for label in control.labels or []:
        label_tag = attrs.get(label)
        tag_attrs: Mapping[str, Any] = getattr(label_tag, "attr", None) or {}
        hint = str(tag_attrs.get("hint") or "").strip()
        value = str(tag_attrs.get("value") or label).strip()
        prompt = overrides.get(label) or overrides.get(value) or hint or value
        targets.append(Target(label=label, prompt=prompt, value=value))
    return tuple(targets)


def _smart_controls(interface: Any, image_name: str, targets: tuple[Target, ...]) -> tuple[SmartControl, ...]:
    """Every ``smart="true"`` KeyPointLabels / RectangleLabels control on ``image_name``, with the labels it shares
    with the mask control's targets (by name or value)."""
    names = {t.label for t in targets} | {t.value for t in targets if t.value}
    out: list[SmartControl] = []
    for control in interface.controls:
        if control.tag not in SMART_CONTROL_TYPES or image_name not in (control.to_name or []):
            continue
        attrs: Mapping[str, Any] = getattr(control, "attr", None) or {}
        if "true" not in (str(attrs.get("smart", "")).lower(), str(attrs.get("smartOnly", "")).lower()):
            continue
        out.append(SmartControl(name=control.name, tag=control.tag,
                                labels=tuple(label for label in control.labels or [] if label in names)))
    return tuple(out)
