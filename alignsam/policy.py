"""What a policy is: the configuration that shapes it (:class:`TrainConfig`) and a trained agent + SRM
(:class:`TrainedPolicy`). Training produces them, bundles store them, inference reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from alignsam.agent import PromptAgent
from alignsam.env import EnvConfig
from alignsam.ppo import PPOConfig
from alignsam.srm import SRM, SRMConfig


@dataclass
class TrainConfig:
    """Everything that shapes a training run. PPO and SRM constants keep the paper's defaults."""

    ppo: PPOConfig = field(default_factory=PPOConfig)
    srm: SRMConfig = field(default_factory=SRMConfig)
    grid: tuple[int, int] = (10, 10)
    # Further action grids to train and validate besides ``grid`` (e.g. ``((16, 16),)``): every SRM branch is trained
    # once per grid on the same SAM embeddings and the one that validates best is kept, like the branch. Each grid
    # costs one more run of the agent's training (its rollouts decode T prompts per image whatever the grid; only
    # the agent's action head grows); inference is unchanged: T decodes per image. See benchmarks/results/grid.md.
    grids: tuple[tuple[int, int], ...] = ()
    branch: Literal["implicit", "explicit", "auto"] = "auto"
    agent_hidden: int = 16
    # r: SAM embedding channels the agent keeps (a fixed projection fitted per run; None: all). See
    # alignsam.projection and benchmarks/results/policy_choices.md.
    agent_state_channels: int | None = 32
    use_history: bool = True
    use_mask_input: bool = False
    # Who labels the chosen points during training rollouts: the SRM (paper) or the ground truth.
    point_labels: Literal["srm", "gt"] = "srm"
    val_fraction: float = 0.2
    rollout_batch: int = 64  # images per batched episode
    seed: int = 0
    # Prompt SAM once per instance of the SRM's map (alignsam.instances): "off" (the paper: the policy's own mask),
    # "auto" (validation decides: per instance only when it scores INSTANCE_MARGIN higher; what the backend's
    # training uses), "on".
    instances: Literal["auto", "off", "on"] = "off"
    # With per-instance prompts: also give SAM each instance's box (alignsam.instances.component_box): "auto" (kept
    # when it validates better than points alone), "off", "on". Unused while ``instances`` is "off".
    instance_boxes: Literal["auto", "off", "on"] = "auto"
    # With per-instance prompts: drop the instances a filter learned from the training tasks rejects
    # (alignsam.instances.filter_instances): "auto" (kept when it validates INSTANCE_MARGIN higher), "off", "on"
    # (whenever one can be fit). Unused while ``instances`` is "off".
    instance_filter: Literal["auto", "off", "on"] = "auto"
    # Feed SAM's previous low-res logits back as ``mask_input`` at inference: "off" (keep ``use_mask_input``), "auto"
    # (the kept policy is validated with the other setting too, switched when that scores INSTANCE_MARGIN higher;
    # what the backend's training uses). See alignsam.train._mask_feedback.
    mask_feedback: Literal["auto", "off"] = "off"
    # SRM corrective clicks after the episode (alignsam.refine): how many every inference adds (0: the paper).
    refine_clicks: int = 0
    # Choose ``refine_clicks`` at validation: "auto" (the kept policy, in its kept modes, validated with each of
    # alignsam.refine.REFINE_CANDIDATES; more clicks kept only when they score INSTANCE_MARGIN higher; what the
    # backend's training uses), "off" (keep ``refine_clicks``). See alignsam.train._refine_choice.
    refine: Literal["auto", "off"] = "off"

    def env_config(self) -> EnvConfig:
        return EnvConfig(grid=self.grid, steps=self.ppo.steps, use_mask_input=self.use_mask_input)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        ppo = PPOConfig(**d.pop("ppo", {}))
        srm = SRMConfig(**d.pop("srm", {}))
        if "grid" in d:
            d["grid"] = tuple(d["grid"])
        if "grids" in d:
            d["grids"] = tuple(tuple(g) for g in d["grids"])
        return cls(ppo=ppo, srm=srm, **d)


@dataclass
class TrainedPolicy:
    """A trained agent + SRM and what is known about them."""

    agent: PromptAgent
    srm: SRM
    branch: str
    config: TrainConfig
    val_metrics: dict[str, float]
    train_names: list[str]
    history: list[dict] = field(default_factory=list)
    instances: bool = False  # prompts SAM once per instance (alignsam.instances), chosen by validation
    instance_boxes: bool = False  # ... with each instance's box too, chosen by validation
    instance_filter: dict | None = None  # ... dropping the instances this filter rejects (InstanceFilter.to_dict())
