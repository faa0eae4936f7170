"""Training AlignSAM on a few labelled images (paper section 3, defaults of section 4.1).

For every episode, a batch of training images runs T prompting steps in the environment: the agent
samples a patch, the SRM labels its centre, SAM decodes, the reward is +1 / -1 from the ground
truth. After each action the SRM takes M gradient steps (Dice + BCE against the ground truth); after
each episode PPO runs K epochs on the episode's buffer. Each image is encoded by SAM once and its
CLIP-Surgery map computed once, for the whole run; rollouts are batched across images and the
buffers hold image indices and masks, not embeddings.

A validation split is held out. With ``branch="auto"`` both SRM branches are trained and the one
whose policy validates better (mIoU) is kept: the paper picks the branch per task by hand, we pick
by measurement.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from alignsam.agent import PromptAgent
from alignsam.clip_surgery import ClipSurgery
from alignsam.data import Sample
from alignsam.env import EnvConfig, PromptEnv
from alignsam.errors import DataError
from alignsam.metrics import iou as mask_iou
from alignsam.ppo import PPOConfig, RolloutBuffer, ppo_update
from alignsam.rollout import Encoded, SrmInputs, add_clip_maps, encode, rollout, srm_point_labels
from alignsam.sam import FrozenSam
from alignsam.srm import SRM, SRMConfig, srm_update, update_subsets

logger = logging.getLogger(__name__)

Branch = Literal["implicit", "explicit"]


@dataclass
class TrainConfig:
    """Everything that shapes a training run. PPO and SRM constants keep the paper's defaults."""

    ppo: PPOConfig = field(default_factory=PPOConfig)
    srm: SRMConfig = field(default_factory=SRMConfig)
    grid: tuple[int, int] = (10, 10)
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
        return cls(ppo=ppo, srm=srm, **d)


@dataclass
class Progress:
    """What a training run reports after each episode (and at stage changes)."""

    stage: str  # "encoding", "training", "validating", "done"
    branch: str | None = None
    episode: int = 0
    episodes: int = 0
    reward: float = 0.0  # mean reward per step this episode
    foreground_rate: float = 0.0  # FR of this episode's sampled actions
    srm_loss: float = 0.0
    actor_loss: float = 0.0
    value_loss: float = 0.0
    entropy: float = 0.0
    val_miou: float | None = None
    elapsed_s: float = 0.0


@dataclass
class Timings:
    """Wall time per part of a run, seconds (for the training benchmark)."""

    sam_encoding: float = 0.0
    clip: float = 0.0
    rollout_decode: float = 0.0  # SAM prompt encoder + mask decoder during rollouts
    rollout_other: float = 0.0  # agent forward, SRM labels, bookkeeping during rollouts
    srm_updates: float = 0.0
    ppo_updates: float = 0.0
    validation: float = 0.0


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


@dataclass
class TrainResult:
    policy: TrainedPolicy
    candidates: dict[str, dict[str, float]]  # branch -> validation metrics
    timings: Timings
    encoder_calls: int
    clip_calls: int
    baseline_metrics: dict[str, float] | None = None  # the ``baseline`` policy on the same validation images


def make_srm(embed_dim: int, cfg: SRMConfig) -> SRM:
    return SRM.from_config(embed_dim, cfg)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / validation split; at least 1 of each when n >= 2 and val_fraction > 0."""
    if n < 1:
        raise DataError("no training samples")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


class _Timer:
    def __init__(self, timings: Timings, name: str, device: torch.device) -> None:
        self.timings, self.name, self.device = timings, name, device

    def __enter__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        setattr(self.timings, self.name, getattr(self.timings, self.name) + time.perf_counter() - self.t0)


def evaluate_policy(
    sam: FrozenSam,
    enc: Encoded,
    srm_in: SrmInputs,
    agent: PromptAgent,
    srm: SRM,
    idx: Sequence[int],
    cfg: TrainConfig,
    batch: int = 32,
) -> dict[str, float]:
    """mIoU and FR of the deterministic policy on images ``idx`` (which have ground truth)."""
    if not idx:
        return {}
    env = PromptEnv(sam, enc.embeddings, enc.sizes, enc.masks, cfg.env_config())
    ious, frs = [], []
    agent.eval()
    srm.eval()
    for start in range(0, len(idx), batch):
        chunk = torch.tensor(idx[start : start + batch], device=sam.device)
        res = rollout(sam, env, srm_in, agent, srm, chunk, cfg.ppo.steps, mask_repeats=cfg.ppo.mask_repeats)
        for i, p in zip(chunk.tolist(), res.probs, strict=True):
            ious.append(mask_iou(p.cpu().numpy() > 0.5, enc.masks[i]))
        if res.foreground_rate is not None:
            frs += res.foreground_rate.tolist()
    return {"miou": float(np.mean(ious)), "fr": float(np.mean(frs)) if frs else 0.0, "n": len(ious)}


def _same_projection(agent: PromptAgent, srm: SRM) -> bool:
    a, b = agent.projection, srm.projection
    return a is not None and b is not None and a.weight.dtype == b.weight.dtype and torch.equal(a.weight, b.weight)


def _adam(module: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam, with the fused kernel where PyTorch has one: the agent and SRM take thousands of small steps per run,
    and one fused step over the SRM's ~30 parameter tensors costs 0.2 ms on a CPU thread against 1.0 ms for the
    per-tensor loop (0.6 ms with ``foreach``); the update it computes is Adam's."""
    device = next(module.parameters()).device
    return torch.optim.Adam(module.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


def train_branch(
    sam: FrozenSam,
    enc: Encoded,
    srm_in: SrmInputs,
    train_idx: list[int],
    branch: Branch,
    cfg: TrainConfig,
    timings: Timings,
    callback: Callable[[Progress], None] | None = None,
    t_start: float | None = None,
) -> tuple[PromptAgent, SRM, list[dict]]:
    """Fits one agent + SRM pair on images ``train_idx`` of ``enc``."""
    dev = sam.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    srm_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the SRM's update rows: apart from the action stream
    c = sam.embed_dim
    agent = PromptAgent(c, cfg.grid, hidden=cfg.agent_hidden, use_history=cfg.use_history,
                        state_channels=cfg.agent_state_channels).to(dev)
    srm_cfg = replace(cfg.srm, branch=branch)
    srm = make_srm(c, srm_cfg).to(dev)
    train_embeddings = enc.embeddings[torch.tensor(train_idx, device=enc.embeddings.device)]
    agent.fit_projection(train_embeddings, seed=cfg.seed)
    srm.fit_projection(train_embeddings, seed=cfg.seed)
    # Every image's embedding is projected once for the run: the rollouts, the K PPO epochs and the SRM updates
    # then build each state from r channels instead of C (the same states: see PromptAgent.pool_state).
    with _Timer(timings, "rollout_other", dev):  # overhead like the rest: counted
        agent_emb = agent.project(enc.embeddings)
        srm_emb = agent_emb if _same_projection(agent, srm) else srm.project(enc.embeddings)
    srm_in_run = copy.copy(srm_in)
    srm_in_run.embeddings = srm_emb
    opt_agent = _adam(agent, cfg.ppo.lr)
    opt_srm = _adam(srm, cfg.srm.lr)
    semantic = None
    if branch == "explicit":
        with torch.no_grad():  # the semantic state is constant per image: pool it once
            semantic = srm.pool_semantic(srm_emb, srm_in.clip)
    env = PromptEnv(sam, enc.embeddings, enc.sizes, enc.masks, cfg.env_config())
    train = torch.tensor(train_idx, device=dev)
    steps = cfg.ppo.steps
    t_start = t_start or time.perf_counter()
    history: list[dict] = []

    def srm_step(idx: torch.Tensor, prev: torch.Tensor | None) -> float:
        """The paper's M SRM updates against the ground truth, after an action (or at the blank state)."""
        emb = srm_emb[idx]
        prev = torch.ones_like(emb[:, :1]) if prev is None else prev
        sem = semantic[idx] if semantic is not None else None
        subsets = update_subsets(len(idx), srm_cfg.updates_per_step, srm_cfg.update_images, srm_gen)
        return srm_update(srm, opt_srm, emb, prev, None, srm_in.gt[idx], srm_cfg, semantic=sem, subsets=subsets)

    for episode in range(cfg.ppo.episodes):
        if len(train) > cfg.rollout_batch:
            idx = train[torch.randperm(len(train), generator=gen)[: cfg.rollout_batch].to(dev)]
        else:
            idx = train
        b = len(idx)
        buffer = RolloutBuffer.allocate(steps, b, tuple(env.embeddings.shape[-2:]), cfg.grid[0] * cfg.grid[1], dev)
        srm_losses = []
        with _Timer(timings, "rollout_decode", dev):
            env.reset(idx, generator=gen)
        with _Timer(timings, "srm_updates", dev):
            # The blank state (no mask yet) is what the SRM sees when it proposes the initial points.
            srm_losses.append(srm_step(idx, None))
        agent.eval()
        for t in range(steps):
            with _Timer(timings, "rollout_other", dev):
                prev, hist = env.prev_mask, env.history.clone()
                action, logprob, value = agent.act(agent_emb[idx], prev, hist,
                                                   mask_repeats=cfg.ppo.mask_repeats, generator=gen)
                xy = env.action_xy[idx, action]
                if cfg.point_labels == "srm":
                    srm.eval()
                    labels = srm_point_labels(sam, srm_in_run, srm, idx, prev, xy, [enc.sizes[i] for i in idx.tolist()])
                else:
                    labels = env.gt_at(action).long()
            with _Timer(timings, "rollout_decode", dev):
                res = env.step(action, labels)
            with _Timer(timings, "rollout_other", dev):
                buffer.add(t, idx, prev, hist, action, logprob, value, res.reward)
            with _Timer(timings, "srm_updates", dev):
                srm_losses.append(srm_step(idx, env.prev_mask))
        with _Timer(timings, "ppo_updates", dev):
            stats = ppo_update(agent, opt_agent, buffer, agent_emb, cfg.ppo, generator=gen)
        record = {
            "branch": branch,
            "episode": episode + 1,
            "reward": float(buffer.reward.mean()),
            "foreground_rate": float((buffer.reward > 0).float().mean()),
            "srm_loss": float(np.mean(srm_losses)),
            **stats,
        }
        history.append(record)
        if callback is not None:
            callback(Progress(
                stage="training", branch=branch, episode=episode + 1, episodes=cfg.ppo.episodes,
                reward=record["reward"], foreground_rate=record["foreground_rate"], srm_loss=record["srm_loss"],
                actor_loss=stats["actor_loss"], value_loss=stats["value_loss"], entropy=stats["entropy"],
                elapsed_s=time.perf_counter() - t_start,
            ))
    agent.eval()
    srm.eval()
    return agent, srm, history


def train(
    sam: FrozenSam,
    samples: Sequence[Sample],
    cfg: TrainConfig | None = None,
    clip: ClipSurgery | None = None,
    callback: Callable[[Progress], None] | None = None,
    baseline: tuple[PromptAgent, SRM, TrainConfig] | None = None,
) -> TrainResult:
    """Trains AlignSAM on ``samples`` and returns the policy that validates best.

    Arguments:
      sam: the frozen SAM (its embedding cache makes repeated runs cheap).
      samples: labelled images, all with the same target text (one policy per label).
      cfg: the run's configuration.
      clip: a :class:`~alignsam.clip_surgery.ClipSurgery`; required for the explicit branch.
      callback: called with :class:`Progress` after each episode.
      baseline: an existing policy (agent, SRM, its config) to validate on the same held-out images,
        so a caller can keep whichever is better on equal terms.
    """
    cfg = cfg or TrainConfig()
    if not samples:
        raise DataError("no training samples")
    for s in samples:
        if s.mask.shape != s.image.shape[:2]:
            raise DataError(f"sample {s.name!r}: mask {s.mask.shape} does not match image {s.image.shape[:2]}")
    branches: list[Branch] = ["implicit", "explicit"] if cfg.branch == "auto" else [cfg.branch]
    if "explicit" in branches and clip is None:
        if cfg.branch == "explicit":
            raise DataError("the explicit SRM branch needs a CLIP-Surgery model (clip=...)")
        branches = ["implicit"]
        logger.warning("no CLIP model given: training the implicit SRM branch only")
    timings = Timings()
    t0 = time.perf_counter()
    dev = sam.device
    if callback:
        callback(Progress(stage="encoding"))
    calls0 = sam.stats.encoder_calls
    with _Timer(timings, "sam_encoding", dev):
        enc = encode(sam, [s.image for s in samples], masks=[s.mask for s in samples])
    clip_calls = 0
    if "explicit" in branches:
        misses0 = getattr(clip, "cache_misses", 0)
        with _Timer(timings, "clip", dev):
            add_clip_maps(enc, sam, clip, [s.image for s in samples], [s.text for s in samples])
        clip_calls = getattr(clip, "cache_misses", 0) - misses0
    srm_in = SrmInputs(sam, enc)
    train_idx, val_idx = split_indices(len(samples), cfg.val_fraction, cfg.seed)
    candidates: dict[str, dict[str, float]] = {}
    best: TrainedPolicy | None = None
    for branch in branches:
        agent, srm, hist = train_branch(sam, enc, srm_in, train_idx, branch, cfg, timings, callback, t0)
        if callback:
            callback(Progress(stage="validating", branch=branch, elapsed_s=time.perf_counter() - t0))
        with _Timer(timings, "validation", dev):
            metrics = evaluate_policy(sam, enc, srm_in, agent, srm, val_idx or train_idx, cfg)
        metrics["on"] = "validation" if val_idx else "training"  # type: ignore[assignment]
        candidates[branch] = metrics
        logger.info("branch %s: %s", branch, metrics)
        if best is None or metrics["miou"] > best.val_metrics["miou"]:
            best = TrainedPolicy(agent, srm, branch, cfg, metrics, [samples[i].name for i in train_idx], hist)
    assert best is not None
    baseline_metrics = None
    if baseline is not None:
        agent_b, srm_b, cfg_b = baseline
        if srm_b.branch == "explicit" and enc.clip_maps is None:
            if clip is None:
                raise DataError("the baseline policy uses the explicit SRM branch: pass clip=...")
            add_clip_maps(enc, sam, clip, [s.image for s in samples], [s.text for s in samples])
            srm_in = SrmInputs(sam, enc)
        with _Timer(timings, "validation", dev):
            baseline_metrics = evaluate_policy(sam, enc, srm_in, agent_b, srm_b, val_idx or train_idx, cfg_b)
    if callback:
        callback(Progress(stage="done", branch=best.branch, val_miou=best.val_metrics["miou"],
                          elapsed_s=time.perf_counter() - t0))
    return TrainResult(best, candidates, timings, sam.stats.encoder_calls - calls0, clip_calls, baseline_metrics)

