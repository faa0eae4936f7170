"""AlignSAM (CVPR 2024): a reinforcement-learning agent prompts a frozen Segment Anything Model with points, and a
Semantic Recalibration Module labels each point foreground or background.

    from alignsam import AlignSAM, ClipSurgery, FrozenSam, TrainConfig, load_sam, save_bundle, train

The method's parts, one per module: ``sam`` (frozen SAM, presets, embedding cache), ``clip_surgery``
(CLIP-Surgery similarity map), ``env`` (prompting environment), ``agent`` + ``ppo`` (actor-critic, PPO), ``srm``
(SRM), ``rollout`` (one episode of a policy), ``train``, ``policy`` (configuration and trained policy), ``bundle``
(policy files), ``predict`` (:class:`AlignSAM`, the front object), ``zeroshot`` (no policy yet), ``metrics`` and
``evaluate``. Around them: ``loading`` (models from presets), ``data`` (folders of images and masks), ``viz``,
``bench``, ``cli``, and the offline testbed ``synthetic``.
"""

from alignsam.bundle import Bundle, load_bundle, read_meta, save_bundle
from alignsam.clip_surgery import ClipSurgery
from alignsam.data import Sample, load_folder, read_image, read_mask
from alignsam.env import EnvConfig
from alignsam.errors import AlignSamError, BundleError, CheckpointError, DataError, ImageError
from alignsam.evaluate import evaluate
from alignsam.loading import load_clip, load_sam, resolve_device
from alignsam.policy import TrainConfig, TrainedPolicy
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM, Prediction
from alignsam.sam import FrozenSam
from alignsam.srm import SRMConfig
from alignsam.train import Progress, TrainResult, train
from alignsam.zeroshot import ZeroShot

__all__ = [
    "AlignSAM",
    "AlignSamError",
    "Bundle",
    "BundleError",
    "CheckpointError",
    "ClipSurgery",
    "DataError",
    "EnvConfig",
    "FrozenSam",
    "ImageError",
    "PPOConfig",
    "Prediction",
    "Progress",
    "SRMConfig",
    "Sample",
    "TrainConfig",
    "TrainResult",
    "TrainedPolicy",
    "ZeroShot",
    "evaluate",
    "load_bundle",
    "load_clip",
    "load_folder",
    "load_sam",
    "read_image",
    "read_mask",
    "read_meta",
    "resolve_device",
    "save_bundle",
    "train",
]
