"""Training AlignSAM on a few labelled images (paper section 3, defaults of section 4.1).

For every episode, a batch of training images runs T prompting steps in the environment: the agent
samples a patch, the SRM labels its centre, SAM decodes, the reward is +1 / -1 from the ground
truth. After each action the SRM takes M gradient steps (Dice + BCE against the ground truth); after
each episode PPO runs K epochs on the episode's buffer. Each image is encoded by SAM once and its
CLIP-Surgery map computed once, for the whole run; rollouts are batched across images and the
buffers hold image indices and masks, not embeddings.

A validation split is held out. With ``branch="auto"`` both SRM branches are trained and the one
whose policy validates better (mIoU) is kept: the paper picks the branch per task by hand, we pick
by measurement. ``TrainConfig.grids`` adds action grids to the same choice (the paper fixes 10 x 10): every branch
is trained on every grid, on the same embeddings, and the best-validating (branch, grid) pair is kept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from alignsam.agent import PromptAgent
from alignsam.clip_surgery import ClipSurgery
from alignsam.data import Sample
from alignsam.env import PromptEnv
from alignsam.errors import DataError
from alignsam.instances import (
    WEAK_LOGIT,
    InstanceFilter,
    filter_instances,
    fit_filter_on,
    refine_instances,
    split_instances,
    with_weak_components,
)
from alignsam.metrics import iou as mask_iou
from alignsam.policy import TrainConfig, TrainedPolicy
from alignsam.ppo import RolloutBuffer, ppo_update
from alignsam.refine import REFINE_CANDIDATES
from alignsam.rollout import Encoded, SrmInputs, add_clip_maps, encode, label_actions, rollout
from alignsam.sam import FrozenSam
from alignsam.srm import SRM, Branch, SRMConfig, srm_update, update_subsets

logger = logging.getLogger(__name__)

INSTANCE_MARGIN = 0.01
"""Per-instance prompts replace the policy's own mask only when they validate this much higher (mIoU): on a handful
of held-out images a smaller gain is noise, and the paper's single mask is the default."""


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
    """Wall time per part of a run, seconds. Opt-in (``train(timings=Timings())``): measuring synchronises a GPU
    around every part, which a production run must not pay for."""

    sam_encoding: float = 0.0
    clip: float = 0.0
    rollout_decode: float = 0.0  # SAM prompt encoder + mask decoder during rollouts
    rollout_other: float = 0.0  # agent forward, SRM labels, bookkeeping during rollouts
    srm_updates: float = 0.0
    ppo_updates: float = 0.0
    validation: float = 0.0


@dataclass
class TrainResult:
    policy: TrainedPolicy
    candidates: dict[str, dict[str, float]]  # branch -> validation metrics
    timings: Timings | None  # what ``train(timings=...)`` was given, filled in; None when not measured
    encoder_calls: int
    clip_calls: int
    baseline_metrics: dict[str, float] | None = None  # the ``baseline`` policy on the same validation images
    # branch -> one statistics record per training episode (reward, FR, losses), every branch trained, the
    # chosen one too (``policy.history``). Validation runs once per branch, after its last episode: its mIoU is
    # in ``candidates``, not per episode.
    histories: dict[str, list[dict]] = field(default_factory=dict)
    val_names: list[str] = field(default_factory=list)  # the held-out images ``candidates`` were measured on
    # The chosen branch with SAM prompted once per instance (alignsam.instances), on the same images; None when
    # ``TrainConfig.instances`` is "off". ``policy.instances`` says whether it was kept.
    instance_metrics: dict[str, float] | None = None
    chosen: str = ""  # the key of ``candidates`` the policy is (:func:`candidate_name`)
    # Per candidate (as in ``candidates``), SAM prompted once per instance with points alone ("points") and with each
    # instance's box ("box"), on the same images; ``instance_metrics`` is the chosen candidate's better mode. Empty
    # when ``TrainConfig.instances`` is "off".
    instance_candidates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # The kept policy (in its kept instance mode) validated with SAM's previous low-res logits fed back as
    # ``mask_input`` ("on") and without ("off"), on the same images; None when ``TrainConfig.mask_feedback`` is
    # "off". ``policy.config.use_mask_input`` says which was kept.
    mask_feedback: dict[str, dict[str, float]] | None = None
    # The kept policy (in its kept modes, mask feedback included) validated with each count of SRM corrective
    # clicks (alignsam.refine.REFINE_CANDIDATES; keys "0", "3", ...), on the same images; None when
    # ``TrainConfig.refine`` is "off". ``policy.config.refine_clicks`` says which was kept.
    refine: dict[str, dict[str, float]] | None = None


def candidate_name(branch: str, grid: Sequence[int], default_grid: Sequence[int]) -> str:
    """A candidate's key in :attr:`TrainResult.candidates` and ``histories``: the branch alone on the configured
    grid (what runs without ``TrainConfig.grids`` have always written), ``"<branch> <rows>x<cols>"`` on another."""
    if tuple(grid) == tuple(default_grid):
        return branch
    return f"{branch} {grid[0]}x{grid[1]}"


def action_grids(cfg: TrainConfig) -> list[tuple[int, int]]:
    """The action grids a run trains: ``cfg.grid`` first, then ``cfg.grids`` (duplicates dropped).

    Raises:
      DataError: a grid that is not two positive integers.
    """
    grids = list(dict.fromkeys([tuple(cfg.grid), *(tuple(g) for g in cfg.grids)]))
    for g in grids:
        if len(g) != 2 or not all(isinstance(n, int) and n > 0 for n in g):
            raise DataError(f"an action grid is two positive integers (rows, cols), not {g!r}")
    return grids  # type: ignore[return-value]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / validation split; at least 1 of each when n >= 2 and val_fraction > 0."""
    if n < 1:
        raise DataError("no training samples")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


class _Clock:
    """Adds the wall time of ``with clock("part"):`` blocks to ``timings.part``; does nothing without timings."""

    def __init__(self, timings: Timings | None, device: torch.device) -> None:
        self.timings, self.cuda = timings, device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            setattr(self.timings, part, getattr(self.timings, part) + time.perf_counter() - t0)


def evaluate_policy(
    sam: FrozenSam,
    enc: Encoded,
    srm_in: SrmInputs,
    agent: PromptAgent,
    srm: SRM,
    idx: Sequence[int],
    cfg: TrainConfig,
    batch: int = 32,
    instances: bool = False,
    boxes: bool = False,
    images: Sequence[np.ndarray] | None = None,
    instance_filter: InstanceFilter | None = None,
) -> dict[str, float]:
    """mIoU and FR of the deterministic policy on images ``idx`` (which have ground truth); ``instances``: with
    SAM prompted once per instance of the SRM's map (:mod:`alignsam.instances`), as inference then does, with
    ``boxes`` each instance's box too, and with ``instance_filter`` (which reads ``images``, all of the run's) the
    instances it rejects dropped."""
    if not idx:
        return {}
    ious, frs = [], []
    weak = instance_filter.weak if instance_filter is not None else None
    for chunk, probs, parts, fr in _rollouts(sam, enc, srm_in, agent, srm, idx, cfg, batch, instances, boxes, weak):
        if parts is not None:
            if instance_filter is not None:
                assert images is not None, "the instance filter reads the images"
                parts = [filter_instances(part, images[i], instance_filter) for part, i in zip(parts, chunk,
                                                                                            strict=True)]
            probs = [part.probs for part in parts]
        for i, p in zip(chunk, probs, strict=True):
            ious.append(mask_iou(p > 0.5, enc.masks[i]))
        frs += fr
    return {"miou": float(np.mean(ious)), "fr": float(np.mean(frs)) if frs else 0.0, "n": len(ious)}


def _rollouts(sam: FrozenSam, enc: Encoded, srm_in: SrmInputs, agent: PromptAgent, srm: SRM, idx: Sequence[int],
              cfg: TrainConfig, batch: int, instances: bool, boxes: bool, weak: float | None = None
              ) -> Iterator[tuple[list[int], list, list | None, list[float]]]:
    """The deterministic policy on images ``idx`` in chunks of ``batch``: per chunk its image indices, the policy's
    ``[H, W]`` probabilities, the per-instance results (``instances``; else None, split with the map's weak
    components at ``weak`` too: :func:`alignsam.instances.with_weak_components`) and the FR values."""
    env = PromptEnv(sam, enc.embeddings, enc.sizes, enc.masks, cfg.env_config())
    agent.eval()
    srm.eval()
    srm_in = srm_in.projected(srm)  # once, not in every chunk's rollout
    for start in range(0, len(idx), batch):
        chunk = torch.tensor(idx[start : start + batch], device=sam.device)
        res = rollout(sam, env, srm_in, agent, srm, chunk, cfg.ppo.steps, mask_repeats=cfg.ppo.mask_repeats,
                      refine=cfg.refine_clicks)
        probs = [p.float().cpu().numpy() for p in res.probs]
        parts = None
        if instances:
            points = [[(float(x), float(y), int(lab)) for (x, y), lab in zip(res.points[r].tolist(),
                                                                             res.labels[r].tolist(), strict=True)
                       if lab >= 0] for r in range(len(chunk))]
            with torch.no_grad():
                srm_logits = srm_in.forward(srm, chunk, None).logits[:, 0]
                if weak is not None:
                    srm_logits = with_weak_components(srm_logits, srm_in.valid[chunk, 0], weak)
            sizes = [enc.sizes[i] for i in chunk.tolist()]
            parts = split_instances(sam, enc.embeddings[chunk], sizes, srm_logits, srm_in.valid[chunk, 0], points,
                                    probs, [float(v) >= 0.5 for v in res.present], boxes=boxes)
            parts = refine_instances(sam, enc.embeddings[chunk], sizes, srm_logits, srm_in.valid[chunk, 0], parts,
                                     cfg.refine_clicks)
        fr = res.foreground_rate.tolist() if res.foreground_rate is not None else []
        yield chunk.tolist(), probs, parts, fr


def _same_projection(agent: PromptAgent, srm: SRM) -> bool:
    a, b = agent.projection, srm.projection
    return a is not None and b is not None and a.weight.dtype == b.weight.dtype and torch.equal(a.weight, b.weight)


def _adam(module: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam, with the fused kernel where PyTorch has one: the agent and SRM take thousands of small steps per run,
    and the fused step is several times cheaper than the per-tensor loop (the update it computes is Adam's)."""
    device = next(module.parameters()).device
    return torch.optim.Adam(module.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


@dataclass
class _BranchRun:
    """One SRM branch's training state: the networks, their optimisers, the run's projected inputs, the RNGs."""

    agent: PromptAgent
    srm: SRM
    srm_cfg: SRMConfig  # the run's SRM settings for this branch
    opt_agent: torch.optim.Adam
    opt_srm: torch.optim.Adam
    agent_emb: torch.Tensor  # [N, r, h, w] every image's embedding on the agent's projection
    srm_in: SrmInputs  # the SRM's inputs, embeddings on the SRM's projection
    semantic: torch.Tensor | None  # the explicit branch's pooled semantic state per image (constant in a run)
    env: PromptEnv
    gen: torch.Generator  # episode images, initial points, actions, PPO minibatches
    srm_gen: torch.Generator  # the SRM's update rows: apart from the action stream


def _start_branch(sam: FrozenSam, enc: Encoded, srm_in: SrmInputs, train_idx: list[int], branch: Branch,
                  cfg: TrainConfig, clock: _Clock) -> _BranchRun:
    """Fresh agent + SRM with projections fitted on the training images; every image's embedding projected once
    for the run, so rollouts, the K PPO epochs and the SRM updates build states from r channels instead of C."""
    dev = sam.device
    torch.manual_seed(cfg.seed)
    agent = PromptAgent(sam.embed_dim, cfg.grid, hidden=cfg.agent_hidden, use_history=cfg.use_history,
                        state_channels=cfg.agent_state_channels).to(dev)
    srm_cfg = replace(cfg.srm, branch=branch)
    srm = SRM.from_config(sam.embed_dim, srm_cfg).to(dev)
    train_embeddings = enc.embeddings[torch.tensor(train_idx, device=enc.embeddings.device)]
    agent.fit_projection(train_embeddings, seed=cfg.seed)
    srm.fit_projection(train_embeddings, seed=cfg.seed)
    with clock("rollout_other"):
        agent_emb = agent.project(enc.embeddings)
        srm_emb = agent_emb if _same_projection(agent, srm) else srm.project(enc.embeddings)
    srm_in_run = copy.copy(srm_in)
    srm_in_run.embeddings = srm_emb
    semantic = None
    if branch == "explicit":
        with torch.no_grad():
            semantic = srm.pool_semantic(srm_emb, srm_in.clip)
    return _BranchRun(
        agent, srm, srm_cfg, _adam(agent, cfg.ppo.lr), _adam(srm, cfg.srm.lr), agent_emb, srm_in_run, semantic,
        PromptEnv(sam, enc.embeddings, enc.sizes, enc.masks, cfg.env_config()),
        torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1),
    )


def _srm_step(run: _BranchRun, idx: torch.Tensor, prev: torch.Tensor | None) -> float:
    """The paper's M SRM updates against the ground truth on images ``idx`` given SAM's previous probabilities
    ``prev [B, 1, h, w]`` (None: the blank state before any prompt). Returns the mean loss."""
    srm_cfg = run.srm_cfg
    emb = run.srm_in.embeddings[idx]
    prev = torch.ones_like(emb[:, :1]) if prev is None else prev
    sem = run.semantic[idx] if run.semantic is not None else None
    subsets = update_subsets(len(idx), srm_cfg.updates_per_step, srm_cfg.update_images, run.srm_gen)
    return srm_update(run.srm, run.opt_srm, emb, prev, None, run.srm_in.gt[idx], srm_cfg, semantic=sem,
                      subsets=subsets)


def _episode(sam: FrozenSam, run: _BranchRun, idx: torch.Tensor, cfg: TrainConfig, clock: _Clock) -> dict:
    """One training episode on images ``idx``: T sampled actions, each labelled, decoded, rewarded and followed by
    the SRM's M updates; then PPO's K epochs on the episode's buffer. Returns the episode's statistics."""
    env, agent, srm, steps = run.env, run.agent, run.srm, cfg.ppo.steps
    sizes = [env.sizes[i] for i in idx.tolist()]
    buffer = RolloutBuffer.allocate(steps, len(idx), tuple(env.embeddings.shape[-2:]), cfg.grid[0] * cfg.grid[1],
                                    sam.device)
    srm_losses = []
    with clock("rollout_decode"):
        env.reset(idx, generator=run.gen)
    with clock("srm_updates"):  # the blank state is what the SRM sees when it proposes the initial points
        srm_losses.append(_srm_step(run, idx, None))
    agent.eval()
    for t in range(steps):
        with clock("rollout_other"):
            prev, hist = env.prev_mask, env.history.clone()
            action, logprob, value = agent.act(run.agent_emb[idx], prev, hist, mask_repeats=cfg.ppo.mask_repeats,
                                               generator=run.gen)
            srm.eval()
            labels = label_actions(cfg.point_labels, sam, env, run.srm_in, srm, action, sizes)
        with clock("rollout_decode"):
            res = env.step(action, labels)
        with clock("rollout_other"):
            buffer.add(t, idx, prev, hist, action, logprob, value, res.reward)
        with clock("srm_updates"):
            srm_losses.append(_srm_step(run, idx, env.prev_mask))
    with clock("ppo_updates"):
        stats = ppo_update(agent, run.opt_agent, buffer, run.agent_emb, cfg.ppo, generator=run.gen)
    return {
        "reward": float(buffer.reward.mean()),
        "foreground_rate": float((buffer.reward > 0).float().mean()),
        "srm_loss": float(np.mean(srm_losses)),
        **stats,
    }


def train_branch(
    sam: FrozenSam,
    enc: Encoded,
    srm_in: SrmInputs,
    train_idx: list[int],
    branch: Branch,
    cfg: TrainConfig,
    timings: Timings | None = None,
    callback: Callable[[Progress], None] | None = None,
    t_start: float | None = None,
) -> tuple[PromptAgent, SRM, list[dict]]:
    """Fits one agent + SRM pair on images ``train_idx`` of ``enc``: E episodes, each on at most
    ``cfg.rollout_batch`` of them. Returns both networks in eval mode and one statistics record per episode."""
    clock = _Clock(timings, sam.device)
    run = _start_branch(sam, enc, srm_in, train_idx, branch, cfg, clock)
    train_set = torch.tensor(train_idx, device=sam.device)
    t_start = t_start or time.perf_counter()
    history: list[dict] = []
    for episode in range(cfg.ppo.episodes):
        idx = train_set
        if len(train_set) > cfg.rollout_batch:
            idx = train_set[torch.randperm(len(train_set), generator=run.gen)[: cfg.rollout_batch].to(sam.device)]
        record = {"branch": branch, "episode": episode + 1, **_episode(sam, run, idx, cfg, clock)}
        history.append(record)
        if callback is not None:
            callback(Progress(
                stage="training", branch=branch, episode=episode + 1, episodes=cfg.ppo.episodes,
                reward=record["reward"], foreground_rate=record["foreground_rate"], srm_loss=record["srm_loss"],
                actor_loss=record["actor_loss"], value_loss=record["value_loss"], entropy=record["entropy"],
                elapsed_s=time.perf_counter() - t_start,
            ))
    return run.agent.eval(), run.srm.eval(), history


def _check_samples(samples: Sequence[Sample]) -> None:
    if not samples:
        raise DataError("no training samples")
    for s in samples:
        if s.mask.shape != s.image.shape[:2]:
            raise DataError(f"sample {s.name!r}: mask {s.mask.shape} does not match image {s.image.shape[:2]}")


def _branches(cfg: TrainConfig, clip: ClipSurgery | None) -> list[Branch]:
    """The SRM branches to train: both for ``auto`` (the explicit one only with CLIP)."""
    branches: list[Branch] = ["implicit", "explicit"] if cfg.branch == "auto" else [cfg.branch]
    if "explicit" in branches and clip is None:
        if cfg.branch == "explicit":
            raise DataError("the explicit SRM branch needs a CLIP-Surgery model (clip=...)")
        logger.warning("no CLIP model given: training the implicit SRM branch only")
        return ["implicit"]
    return branches


def train(
    sam: FrozenSam,
    samples: Sequence[Sample],
    cfg: TrainConfig | None = None,
    clip: ClipSurgery | None = None,
    callback: Callable[[Progress], None] | None = None,
    baseline: tuple[PromptAgent, SRM, TrainConfig] | tuple[PromptAgent, SRM, TrainConfig, InstanceFilter | None]
    | None = None,
    timings: Timings | None = None,
) -> TrainResult:
    """Trains AlignSAM on ``samples`` and returns the policy that validates best.

    Arguments:
      sam: the frozen SAM (its embedding cache makes repeated runs cheap).
      samples: labelled images, all with the same target text (one policy per label).
      cfg: the run's configuration.
      clip: a :class:`~alignsam.clip_surgery.ClipSurgery`; required for the explicit branch.
      callback: called with :class:`Progress` after each episode.
      baseline: an existing policy (agent, SRM, its config, optionally its instance filter) to validate on the same
        held-out images, so a caller can keep whichever is better on equal terms.
      timings: filled in with the wall time of each part of the run (benchmarks); None: not measured.

    Raises:
      DataError: no samples, a mask that does not fit its image, or the explicit branch without ``clip``.
    """
    cfg = cfg or TrainConfig()
    _check_samples(samples)
    branches = _branches(cfg, clip)
    clock = _Clock(timings, sam.device)
    t0 = time.perf_counter()
    if callback:
        callback(Progress(stage="encoding"))
    calls0 = sam.stats.encoder_calls
    images = [s.image for s in samples]
    with clock("sam_encoding"):
        enc = encode(sam, images, masks=[s.mask for s in samples])
    clip_calls = 0
    if "explicit" in branches:
        assert clip is not None
        misses0 = clip.cache_misses
        with clock("clip"):
            add_clip_maps(enc, sam, clip, images, [s.text for s in samples])
        clip_calls = clip.cache_misses - misses0
    srm_in = SrmInputs(sam, enc)
    train_idx, val_idx = split_indices(len(samples), cfg.val_fraction, cfg.seed)
    held_out = val_idx or train_idx
    candidates: dict[str, dict[str, float]] = {}
    histories: dict[str, list[dict]] = {}
    best: TrainedPolicy | None = None
    best_score = -1.0
    chosen = ""
    instance_candidates: dict[str, dict[str, dict[str, float]]] = {}
    kept_modes: dict[str, str | None] = {}
    for grid in action_grids(cfg):
        # Each grid's policy keeps only its own grid in its config: that is what inference and bundles read.
        cfg_g = replace(cfg, grid=grid, grids=())
        for branch in branches:
            name = candidate_name(branch, grid, cfg.grid)
            report = _renamed(callback, name) if callback and name != branch else callback
            agent, srm, hist = train_branch(sam, enc, srm_in, train_idx, branch, cfg_g, timings, report, t0)
            for record in hist:
                record["branch"] = name
            if callback:
                callback(Progress(stage="validating", branch=name, elapsed_s=time.perf_counter() - t0))
            on = "validation" if val_idx else "training"
            with clock("validation"):
                metrics = evaluate_policy(sam, enc, srm_in, agent, srm, held_out, cfg_g)
                modes, filters = _instance_modes(sam, enc, srm_in, agent, srm, held_out, cfg_g, images, train_idx)
            metrics["on"] = on  # type: ignore[assignment]
            for m in modes.values():
                m["on"] = on  # type: ignore[assignment]
            candidates[name] = metrics
            histories[name] = hist
            policy = TrainedPolicy(agent, srm, branch, cfg_g, metrics, [samples[i].name for i in train_idx], hist)
            if modes:
                instance_candidates[name] = modes
                # Every instance prompted on its own (alignsam.instances), with points alone or with boxes too, and
                # with the learned instance filter or not: each kept only when it validates clearly better.
                mode = kept_instance_mode(modes, metrics["miou"], cfg)
                kept_modes[name] = mode
                if mode is not None:
                    policy.instances, policy.instance_boxes = True, mode.startswith("box")
                    policy.instance_filter = filters[mode].to_dict() if mode in filters else None
                    policy.val_metrics = dict(modes[mode])
            logger.info("candidate %s: %s; per instance: %s", name, metrics, modes)
            # The pair kept is the one whose kept mode validates best, so a grid can win through its instances.
            if policy.val_metrics["miou"] > best_score:
                best, best_score, chosen = policy, policy.val_metrics["miou"], name
    assert best is not None
    instance_metrics = None
    if chosen in instance_candidates:  # the kept per-instance mode's, or (one mask kept) the best per-instance one's
        modes = instance_candidates[chosen]
        instance_metrics = modes[kept_modes.get(chosen) or max(modes, key=lambda k: modes[k]["miou"])]
    mask_feedback = None
    if cfg.mask_feedback == "auto":
        with clock("validation"):
            mask_feedback = _mask_feedback(sam, enc, srm_in, best, held_out, "validation" if val_idx else "training",
                                           images)
    refine = None
    if cfg.refine == "auto":
        with clock("validation"):
            refine = _refine_choice(sam, enc, srm_in, best, held_out, "validation" if val_idx else "training", images)
    logger.info("kept %s, instances: %s, boxes: %s, mask feedback: %s, SRM clicks: %d", chosen, best.instances,
                best.instance_boxes, best.config.use_mask_input, best.config.refine_clicks)
    baseline_metrics = None
    if baseline is not None:
        agent_b, srm_b, cfg_b, *rest = baseline
        flt_b = rest[0] if rest else None
        if srm_b.branch == "explicit" and enc.clip_maps is None:
            if clip is None:
                raise DataError("the baseline policy uses the explicit SRM branch: pass clip=...")
            add_clip_maps(enc, sam, clip, images, [s.text for s in samples])
            srm_in = SrmInputs(sam, enc)
        with clock("validation"):
            baseline_metrics = evaluate_policy(sam, enc, srm_in, agent_b, srm_b, held_out, cfg_b)
            if cfg.instances != "off":  # the active policy gets its better mode too (its bundle may use either)
                for boxes in (False, True) if cfg.instance_boxes != "off" else (False,):
                    for flt_used in (None, flt_b) if flt_b is not None else (None,):
                        split_b = evaluate_policy(sam, enc, srm_in, agent_b, srm_b, held_out, cfg_b, instances=True,
                                                  boxes=boxes, images=images, instance_filter=flt_used)
                        if split_b["miou"] > baseline_metrics["miou"]:
                            baseline_metrics = split_b
    if callback:
        callback(Progress(stage="done", branch=best.branch, val_miou=best.val_metrics["miou"],
                          elapsed_s=time.perf_counter() - t0))
    return TrainResult(best, candidates, timings, sam.stats.encoder_calls - calls0, clip_calls, baseline_metrics,
                       histories, [samples[i].name for i in held_out], instance_metrics, chosen, instance_candidates,
                       mask_feedback, refine)


def _mask_feedback(sam: FrozenSam, enc: Encoded, srm_in: SrmInputs, policy: TrainedPolicy, held_out: Sequence[int],
                   on: str, images: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """Validates ``policy`` (in its kept instance mode) with the other setting of mask feedback (SAM's previous
    low-res logits as ``mask_input`` at every step) and switches its config to it when it scores
    ``INSTANCE_MARGIN`` higher. Returns ``{"off": metrics, "on": metrics}``; changes ``policy`` in place.

    An inference-time choice: the agent was trained with ``policy.config.use_mask_input`` (the paper: off) and is
    validated, not retrained, with the other setting; one more validation pass instead of one more training run
    per candidate. Measured when trained with it: within noise on the testbed (benchmarks/results/choices.md)."""
    current = "on" if policy.config.use_mask_input else "off"
    other_cfg = replace(policy.config, use_mask_input=not policy.config.use_mask_input)
    other = evaluate_policy(sam, enc, srm_in, policy.agent, policy.srm, held_out, other_cfg,
                            instances=policy.instances, boxes=policy.instance_boxes, images=images,
                            instance_filter=InstanceFilter.from_dict(policy.instance_filter)
                            if policy.instance_filter else None)
    other["on"] = on  # type: ignore[assignment]
    scores = {current: dict(policy.val_metrics), ("off" if current == "on" else "on"): other}
    if other["miou"] >= policy.val_metrics["miou"] + INSTANCE_MARGIN:
        policy.config, policy.val_metrics = other_cfg, dict(other)
    return scores


def _refine_choice(sam: FrozenSam, enc: Encoded, srm_in: SrmInputs, policy: TrainedPolicy, held_out: Sequence[int],
                   on: str, images: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """Validates ``policy`` (in its kept instance mode and mask feedback) with each count of SRM corrective clicks in
    :data:`alignsam.refine.REFINE_CANDIDATES` (and its current count) and keeps one by :func:`kept_refine`: a larger
    count only when it scores ``INSTANCE_MARGIN`` higher, since each click is one more decode per image.
    Returns ``{"0": metrics, "3": metrics, ...}``; changes ``policy.config.refine_clicks`` and ``policy.val_metrics``
    in place.

    An inference-time choice like mask feedback: the agent is not retrained; the clicks come after its episode."""
    flt = InstanceFilter.from_dict(policy.instance_filter) if policy.instance_filter else None
    scores: dict[str, dict[str, float]] = {}
    current = policy.config.refine_clicks
    for clicks in sorted(set(REFINE_CANDIDATES) | {current}):
        if clicks == current:
            scores[str(clicks)] = dict(policy.val_metrics)
            continue
        metrics = evaluate_policy(sam, enc, srm_in, policy.agent, policy.srm, held_out,
                                  replace(policy.config, refine_clicks=clicks), instances=policy.instances,
                                  boxes=policy.instance_boxes, images=images, instance_filter=flt)
        metrics["on"] = on  # type: ignore[assignment]
        scores[str(clicks)] = metrics
    kept = kept_refine(scores)
    if kept != current:
        policy.config = replace(policy.config, refine_clicks=kept)
        policy.val_metrics = dict(scores[str(kept)])
    return scores


def kept_refine(scores: dict[str, dict[str, float]]) -> int:
    """The click count training keeps from validation ``scores`` (:func:`_refine_choice`): the smallest, unless a
    larger one scores ``INSTANCE_MARGIN`` above the best kept so far (ascending)."""
    ordered = sorted(scores, key=int)
    best = ordered[0]
    for clicks in ordered[1:]:
        if scores[clicks]["miou"] >= scores[best]["miou"] + INSTANCE_MARGIN:
            best = clicks
    return int(best)


def _instance_modes(sam: FrozenSam, enc: Encoded, srm_in: SrmInputs, agent: PromptAgent, srm: SRM,
                    held_out: Sequence[int], cfg: TrainConfig, images: Sequence[np.ndarray],
                    train_idx: Sequence[int]) -> tuple[dict[str, dict[str, float]], dict[str, InstanceFilter]]:
    """Validation metrics of one candidate prompted per instance: ``{"points": ..., "box": ...}`` as
    ``cfg.instances`` / ``cfg.instance_boxes`` allow ({} when instances are off), and, unless
    ``cfg.instance_filter`` is "off", the better of the two with an instance filter fit on the training images
    ``train_idx``: ``"points+filter"`` (or ``"box+filter"``) over the SRM map's own components, and
    ``"points+filter+weak"`` with its weak components as candidates too (:data:`alignsam.instances.WEAK_LOGIT`),
    each filter fit on the candidates it then judges. Returns the metrics and each filtered mode's filter (no entry
    where none could be fit)."""
    if cfg.instances == "off":
        return {}, {}
    modes = {}
    if cfg.instance_boxes != "on":
        modes["points"] = evaluate_policy(sam, enc, srm_in, agent, srm, held_out, cfg, instances=True)
    if cfg.instance_boxes != "off":
        modes["box"] = evaluate_policy(sam, enc, srm_in, agent, srm, held_out, cfg, instances=True, boxes=True)
    if cfg.instance_filter == "off" or not held_out:
        return modes, {}
    base = max(modes, key=lambda k: modes[k]["miou"])
    filters: dict[str, InstanceFilter] = {}
    for suffix, weak in (("+filter", None), ("+filter+weak", WEAK_LOGIT)):
        flt, _ = fit_filter_on(((images[i], part.masks, enc.masks[i])
                                for chunk, _, parts, _ in _rollouts(sam, enc, srm_in, agent, srm, train_idx, cfg, 32,
                                                                    True, base == "box", weak)
                                for i, part in zip(chunk, parts or [], strict=True) if part.split), weak=weak)
        if flt is not None:
            filters[base + suffix] = flt
            modes[base + suffix] = evaluate_policy(sam, enc, srm_in, agent, srm, held_out, cfg, instances=True,
                                                   boxes=base == "box", images=images, instance_filter=flt)
    return modes, filters


def kept_instance_mode(modes: dict[str, dict[str, float]], whole_miou: float, cfg: TrainConfig) -> str | None:
    """The instance mode training keeps from validation metrics ``modes`` (:func:`_instance_modes`) against the
    policy's own mask's ``whole_miou``: None (one mask), or "points" / "box" (the better; points on a tie), kept only
    at ``INSTANCE_MARGIN`` above one mask (or ``cfg.instances`` "on"), then its filtered form when that scores
    ``INSTANCE_MARGIN`` higher again (or ``cfg.instance_filter`` "on"): "+filter", or "+filter+weak" where that
    scores ``INSTANCE_MARGIN`` above "+filter" (its weak components cost decodes) or is the only one."""
    base_modes = [m for m in ("points", "box") if m in modes]
    if not base_modes:
        return None
    base = max(base_modes, key=lambda k: modes[k]["miou"])
    filtered = f"{base}+filter"
    weak = f"{base}+filter+weak"
    if weak in modes and (filtered not in modes or modes[weak]["miou"] >= modes[filtered]["miou"] + INSTANCE_MARGIN):
        filtered = weak
    if filtered in modes and (cfg.instance_filter == "on"
                              or modes[filtered]["miou"] >= modes[base]["miou"] + INSTANCE_MARGIN):
        base_score, base = modes[filtered]["miou"], filtered
    else:
        base_score = modes[base]["miou"]
    if cfg.instances == "on" or base_score >= whole_miou + INSTANCE_MARGIN:
        return base
    return None


def _renamed(callback: Callable[[Progress], None], name: str) -> Callable[[Progress], None]:
    """``callback`` seeing ``name`` (a candidate on another grid) as the branch of every report."""
    def report(p: Progress) -> None:
        callback(replace(p, branch=name))
    return report
