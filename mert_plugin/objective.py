"""The MERT pretraining objective (MERT_SPEC.md §4.3, §5.3-5.4).

:class:`MERTPretrainer` wraps a :class:`~mert_plugin.model.MERTModel` student
with the prediction heads and computes, for a batch of clean clips and their
teacher labels::

    noisy = in-batch noise mixture(clean)           (training only, targets stay clean)
    mask  = span mask over the student's frames     (mask_prob 0.8, span 5, >= 2 spans)
    h     = student(noisy, masked frames -> learned mask embedding).last_hidden_state
    loss  = sum_k CE_k  +  cqt_weight * MSE_cqt  +  feature_penalty_weight * mean(conv_features^2)
            (+ level_weight * MSE_level + mfcc_weight * MSE_mfcc + envelope_weight * MSE_envelope:
               small-scale extras, off by default)

CE_k and MSE are means over the masked (non-padded) frames; CE_k is a softmax
cross-entropy whose logits are the cosine similarities between the untied
projection of ``h`` for codebook k and every label embedding of that codebook,
divided by ``logit_temp`` (fairseq HuBERT's ``compute_nce`` with all classes).
This is the reference's ``[sum_k CE_k + 10 * features_pen * N_m + MSE * N_m] / N_m``.

Label alignment: labels are indexed by student frame. A label sequence may
be up to ``LABEL_SLACK`` frames longer than the student's T (EnCodec and the
centred CQT give 1-2 extra tail frames; they are dropped) or shorter (the
missing tail frames are left out of the loss, as the reference crops
features to the labels). Anything further off is an alignment error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .components import SelfAttention
from .errors import ConfigError, MERTError
from .masking import compute_span_mask
from .mixture import mix_in_batch_noise
from .model import MERTModel, conv_output_lengths

LABEL_SLACK = 2  # frames a label sequence may differ from the student's T (see module docstring)
CQT_TARGETS = ("linear", "linear-frame", "db", "db-frame")  # see MERTPretrainer.cqt_target
ENVELOPE_STATS = 8  # see MERTPretrainer.envelope_target


@dataclass
class ObjectiveConfig:
    """Objective hyper-parameters; the defaults are the MERT-v1-95M recipe."""

    num_codebooks: int = 8
    codebook_size: int = 1024
    final_dim: int = 64
    logit_temp: float = 0.1
    cqt_bins: int = 336
    cqt_weight: float = 1.0
    feature_penalty_weight: float = 10.0
    mask_prob: float = 0.8
    mask_length: int = 5
    min_masks: int = 2
    mixture_prob: float = 0.5  # probability that a clip gets in-batch noise mixed in
    mixture_min_samples: int = 12000
    mixture_max_samples: int = 24000
    mixture_min_count: int = 1
    mixture_max_count: int = 3
    feature_grad_mult: float = 0.1
    use_acoustic: bool = True
    use_cqt: bool = True
    # fairseq's default, kept by the reference: every clip of a batch keeps the batch's smallest masked count
    require_same_masks: bool = True
    # Deviations for small-scale runs (the reference values are the defaults), see docs/OBJECTIVE.md:
    cqt_target: str = "linear"  # "linear" (reference) | "linear-frame" | "db" | "db-frame" (see MERTPretrainer.cqt_target)
    pred_nomask_weight: float = 0.0  # fairseq HuBERT option; > 0 also predicts the labels of unmasked frames
    codebook_weights: Optional[Tuple[float, ...]] = None  # one weight per codebook CE (None: all 1, the reference)
    # > 0: also regress each masked frame's level (its loudest CQT bin in dB re the crop's loudest,
    # in [0, 1]; MERTPretrainer.level_target) from a 1-dim head, with this weight. Needs use_cqt.
    level_weight: float = 0.0
    # > 0: also regress each masked frame's MFCCs 1-19 of the clean audio (a continuous timbre target,
    # teachers.MFCCTarget), standardised with running training statistics, from a linear head.
    mfcc_weight: float = 0.0
    # > 0: also regress 8 statistics of each crop's level curve (MERTPretrainer.envelope_target) from the
    # time-averaged last hidden state (its first ``envelope_dims`` dimensions; 0 = all), with this weight.
    # A clip-level target: the level target above is per frame and does not survive mean pooling. Needs use_cqt.
    envelope_weight: float = 0.0
    envelope_dims: int = 0
    # Extras (not in the shared contract; off by default).
    attention_relax: float = 0.0  # > 0: PB-relax attention in the student (fp16 overflow guard), e.g. 32

    @classmethod
    def from_preset(cls, name: str) -> "ObjectiveConfig":
        """``mert-v1-95m``, ``mert-v1-330m``, ``mert-tiny`` or ``mert-v0`` (see docs/OBJECTIVE.md)."""
        key = name.lower().replace("_", "-")
        if key.startswith("m-a-p/"):
            key = key[len("m-a-p/"):]
        presets = {
            "mert-v1-95m": {},
            "mert-v1-330m": dict(final_dim=128, mixture_max_samples=36000, feature_grad_mult=1.0),
            "mert-tiny": {},
            # MERT-v0's targets are unverified (MERT_SPEC.md §4.4): one k-means label per 16 kHz
            # frame (MFCC k=500), HuBERT-base head size, no CQT; noise lengths 0.5-1.0 s at 16 kHz.
            "mert-v0": dict(num_codebooks=1, codebook_size=500, final_dim=256, use_cqt=False,
                            mixture_min_samples=8000, mixture_max_samples=16000),
        }
        if key not in presets:
            raise ConfigError(f"unknown objective preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[key]).validate()

    def validate(self) -> "ObjectiveConfig":
        problems = []
        if not (self.use_acoustic or self.use_cqt):
            problems.append("at least one of use_acoustic / use_cqt must be on")
        for name in ("num_codebooks", "codebook_size", "final_dim", "cqt_bins", "mask_length",
                     "mixture_min_samples", "mixture_max_samples"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mask_prob", "mixture_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.logit_temp <= 0:
            problems.append(f"logit_temp must be > 0, got {self.logit_temp}")
        if self.mixture_min_samples > self.mixture_max_samples or self.mixture_min_count > self.mixture_max_count:
            problems.append("mixture ranges must have min <= max")
        if self.level_weight < 0 or (self.level_weight > 0 and not self.use_cqt):
            problems.append(f"level_weight must be >= 0 and needs use_cqt (the level is read from the CQT), "
                            f"got {self.level_weight}")
        if self.mfcc_weight < 0:
            problems.append(f"mfcc_weight must be >= 0, got {self.mfcc_weight}")
        if self.envelope_weight < 0 or (self.envelope_weight > 0 and not self.use_cqt):
            problems.append(f"envelope_weight must be >= 0 and needs use_cqt (the level is read from the CQT), "
                            f"got {self.envelope_weight}")
        if self.envelope_dims < 0:
            problems.append(f"envelope_dims must be >= 0 (0 = the whole hidden state), got {self.envelope_dims}")
        if self.cqt_target not in CQT_TARGETS:
            problems.append(f"cqt_target must be one of {', '.join(CQT_TARGETS)}, got {self.cqt_target!r}")
        if self.pred_nomask_weight < 0:
            problems.append(f"pred_nomask_weight must be >= 0, got {self.pred_nomask_weight}")
        if self.codebook_weights is not None and (len(self.codebook_weights) != self.num_codebooks
                                                  or any(float(w) < 0 for w in self.codebook_weights)):
            problems.append(f"codebook_weights must be {self.num_codebooks} weights >= 0, got {list(self.codebook_weights)}")
        if self.attention_relax < 0:
            problems.append(f"attention_relax must be >= 0 (0 = off), got {self.attention_relax}")
        if problems:
            raise ConfigError("invalid objective config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PretrainOutput:
    """loss: scalar (differentiable); terms: detached scalars for logging; mask: [B, T] loss frames."""

    loss: Tensor
    terms: Dict[str, Tensor]
    mask: Tensor


class CodebookHead(nn.Module):
    """Untied projections + label embeddings -> cosine logits.

    h [N, D] -> logits [N, K, C] = cos(proj_k(h), emb_k[c]) / temp.
    ``final_proj`` is one Linear(D, K * final_dim) cut into K chunks (the
    reference's ``untie_final_proj``); ``label_embs`` [K, C, final_dim] starts
    uniform in [0, 1) as the reference's ``label_embs_concat``.
    """

    def __init__(self, hidden_size: int, num_codebooks: int, codebook_size: int, final_dim: int, temp: float):
        super().__init__()
        self.num_codebooks, self.final_dim, self.temp = num_codebooks, final_dim, temp
        self.final_proj = nn.Linear(hidden_size, num_codebooks * final_dim)
        self.label_embs = nn.Parameter(torch.empty(num_codebooks, codebook_size, final_dim).uniform_())

    def forward(self, h: Tensor) -> Tensor:
        proj = self.final_proj(h).view(h.shape[0], self.num_codebooks, self.final_dim).float()
        emb = self.label_embs.float()
        with torch.autocast(h.device.type, enabled=False):  # cosine logits in fp32 under mixed precision
            return torch.einsum("nkd,kcd->nkc", F.normalize(proj, dim=-1), F.normalize(emb, dim=-1)) / self.temp


class MERTPretrainer(nn.Module):
    """Student + prediction heads; ``state_dict()`` = ``student.*`` + heads.

    Example::

        student = MERTModel.from_preset("mert-v1-95m")
        trainer = MERTPretrainer(student, ObjectiveConfig.from_preset("mert-v1-95m")).train()
        codes, cqt = label_generator(wav)           # clean targets (or offline labels)
        out = trainer(wav, codes, cqt)
        out.loss.backward(); log(out.terms)
    """

    def __init__(self, student: MERTModel, config: ObjectiveConfig):
        super().__init__()
        config.validate()
        if student.masked_spec_embed is None:
            raise ConfigError("the student has no mask embedding: build it with mask_time_prob > 0")
        self.student = student
        self.config = config
        student.feature_grad_mult = config.feature_grad_mult
        for module in student.modules():
            if isinstance(module, SelfAttention):
                module.relax_alpha = config.attention_relax
        d = student.config.hidden_size
        self.codebook_head = (CodebookHead(d, config.num_codebooks, config.codebook_size, config.final_dim,
                                           config.logit_temp) if config.use_acoustic else None)
        self.cqt_head = nn.Linear(d, config.cqt_bins) if config.use_cqt else None
        self.level_head = nn.Linear(d, 1) if config.level_weight > 0 else None
        if config.envelope_dims > d:
            raise ConfigError(f"envelope_dims ({config.envelope_dims}) exceeds the student's hidden size ({d})")
        self.envelope_head = (nn.Linear(config.envelope_dims or d, ENVELOPE_STATS)
                              if config.envelope_weight > 0 else None)
        self.mfcc_head = self.mfcc_teacher = None
        if config.mfcc_weight > 0:
            from .teachers import MFCCTarget

            self.mfcc_teacher = MFCCTarget(student.config.sample_rate)
            self.mfcc_head = nn.Linear(d, self.mfcc_teacher.dims)
            # running mean / sum of squared deviations of the training frames' MFCCs (checkpointed)
            self.register_buffer("mfcc_count", torch.zeros((), dtype=torch.float64))
            self.register_buffer("mfcc_mean", torch.zeros(self.mfcc_teacher.dims, dtype=torch.float64))
            self.register_buffer("mfcc_m2", torch.zeros(self.mfcc_teacher.dims, dtype=torch.float64))
        self.code_log_prior: Optional[Tensor] = None  # [K, C] log frequencies, see set_code_prior

    # ------------------------------------------------------------------ steps
    def span_mask(self, frame_valid: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """[B, T] bool valid frames -> [B, T] bool span mask (see :mod:`mert_plugin.masking`)."""
        c = self.config
        return compute_span_mask(tuple(frame_valid.shape), c.mask_prob, c.mask_length, c.min_masks,
                                 frame_valid, c.require_same_masks, generator, device=frame_valid.device)

    def mix(self, wav: Tensor, lengths: Optional[Tensor] = None,
            generator: Optional[torch.Generator] = None) -> Tensor:
        """In-batch noise mixture of the config (see :mod:`mert_plugin.mixture`); returns a new tensor."""
        c = self.config
        return mix_in_batch_noise(wav, c.mixture_prob, c.mixture_min_samples, c.mixture_max_samples,
                                  c.mixture_min_count, c.mixture_max_count, lengths, generator)

    def forward(self, wav: Tensor, codes: Optional[Tensor] = None, cqt: Optional[Tensor] = None,
                padding_mask: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> PretrainOutput:
        """One objective evaluation.

        Args:
            wav: [B, N] CLEAN audio at the student's rate (noise is mixed in here in training mode).
            codes: [B, K, T'] integer acoustic labels (needed when ``use_acoustic``).
            cqt: [B, T'', bins] float CQT targets of the clean audio (needed when ``use_cqt``).
            padding_mask: optional [B, N] bool, True at padded samples.
            mask: optional precomputed [B, T] span mask (else drawn, in train and eval mode).
            generator: optional CPU generator for the mask and mixture draws.
        Returns:
            :class:`PretrainOutput`.
        """
        c = self.config
        wav = self.student._check_waveform(wav)
        bsz, num = wav.shape
        frames = self.student.num_frames(num)
        lengths = None
        frame_valid = torch.ones(bsz, frames, dtype=torch.bool, device=wav.device)
        if padding_mask is not None:
            if padding_mask.shape != wav.shape:
                raise MERTError(f"padding_mask must be {list(wav.shape)}, got {list(padding_mask.shape)}")
            lengths = (~padding_mask.bool()).sum(-1)
            frame_valid = (torch.arange(frames, device=wav.device)[None]
                           < conv_output_lengths(lengths, self.student.config)[:, None])
        label_frames = frames
        if c.use_acoustic:
            codes = self._check_codes(codes, bsz, frames)
            label_frames = min(label_frames, codes.shape[-1])
        if c.use_cqt:
            cqt = self._check_cqt(cqt, bsz, frames)
            label_frames = min(label_frames, cqt.shape[1])

        if mask is None:
            mask = self.span_mask(frame_valid, generator)
        elif mask.shape != (bsz, frames) or mask.dtype != torch.bool:
            raise MERTError(f"mask must be bool [B, T] = {[bsz, frames]}, got {mask.dtype} {list(mask.shape)}")
        noisy = self.mix(wav, lengths, generator) if self.training and c.mixture_prob > 0 else wav
        out = self.student(noisy, padding_mask=padding_mask, mask_time_indices=mask)

        loss_mask = mask & frame_valid
        loss_mask[:, label_frames:] = False
        feature_penalty = out.conv_features.float().pow(2).mean()
        loss = c.feature_penalty_weight * feature_penalty
        terms = {"feature_penalty": feature_penalty.detach(),
                 "masked_frames": loss_mask.sum().detach().float(),
                 "masked_fraction": (mask & frame_valid).sum().float() / frame_valid.sum().clamp(min=1)}
        regressions = {}  # name -> [B, T, dims] target of the head `<name>_head`, weighted by `<name>_weight`
        if c.use_cqt:
            regressions["cqt"] = self.cqt_target(cqt[:, :frames].float())
        # each frame's level in its crop: the level head's target and the envelope head's curve
        level = (self.level_target(cqt[:, :frames].float())
                 if self.level_head is not None or self.envelope_head is not None else None)
        if self.level_head is not None:
            regressions["level"] = level[..., None]
        if self.mfcc_head is not None:
            regressions["mfcc"] = self.standardized_mfcc(wav, frame_valid)
        codes = codes[:, :, :frames] if c.use_acoustic else None
        predicted, predicted_terms = self._prediction_loss(out.last_hidden_state, loss_mask, codes, regressions)
        loss = loss + predicted
        terms.update(predicted_terms)
        if self.envelope_head is not None:
            envelope_mse = self._envelope_loss(out.last_hidden_state, level, frame_valid)
            loss = loss + c.envelope_weight * envelope_mse
            terms["envelope_mse"] = envelope_mse.detach()
        if c.pred_nomask_weight > 0:  # fairseq HuBERT's pred_nomask_weight: also predict the visible frames
            visible = frame_valid & ~mask
            visible[:, label_frames:] = False
            predicted, predicted_terms = self._prediction_loss(out.last_hidden_state, visible, codes, regressions,
                                                               baselines=False)
            loss = loss + c.pred_nomask_weight * predicted
            terms.update({f"unmasked_{k}": v for k, v in predicted_terms.items() if not k[-1].isdigit()})
        terms["loss"] = loss.detach()
        return PretrainOutput(loss, terms, loss_mask)

    def cqt_target(self, cqt: Tensor) -> Tensor:
        """The CQT regression target [B, T, bins] from the teacher's linear magnitudes.

        ``linear``: the reference (level-dependent: a gain-invariant student cannot predict it).
        ``db``: dB re each crop's loudest bin, -60 dB floor, in [0, 1] (gain-free, but a frame's
        level relative to the crop remains, and dominates the target's variance).
        ``db-frame``: dB re each frame's own loudest bin (spectral shape), silent frames 0.
        ``linear-frame``: linear magnitudes re each frame's loudest bin (level-free; the harmonic
        peaks dominate, as in the reference's linear target), silent frames 0.
        See :func:`mert_plugin.teachers.db_spectrum` and :func:`~mert_plugin.teachers.shape_spectrum`.
        """
        from .teachers import db_spectrum, shape_spectrum

        if self.config.cqt_target == "linear":
            return cqt
        if self.config.cqt_target == "linear-frame":
            return shape_spectrum(cqt)
        return db_spectrum(cqt, per_frame=self.config.cqt_target == "db-frame")

    @staticmethod
    def level_target(cqt: Tensor, floor_db: float = 60.0) -> Tensor:
        """Linear CQT magnitudes [B, T, bins] -> each frame's level [B, T]: its loudest bin in dB re
        the crop's loudest bin, floored at ``-floor_db``, in [0, 1] (1 = the crop's loudest frame).

        Gain-free, like the ``db-frame`` spectrum, but it keeps what ``db-frame`` removes: how the
        level moves within the crop (attack, decay, rests), which is part of an instrument's timbre."""
        frame_peak = cqt.amax(dim=2)
        clip_peak = frame_peak.amax(dim=1, keepdim=True).clamp(min=1e-8)
        return (20.0 * torch.log10(frame_peak / clip_peak + 10 ** (-floor_db / 20)) / floor_db + 1.0).clamp(min=0.0)

    @staticmethod
    def envelope_target(level: Tensor, valid: Tensor, near_peak: float = 0.2) -> Tensor:
        """Level curves [B, T] (:meth:`level_target`) and their valid frames [B, T] bool -> 8
        statistics per crop [B, 8]: mean, std, 10/50/90 % quantiles, mean rise and mean fall between
        successive frames, share of frames within ``near_peak`` of the crop's loudest. All in [0, 1]:
        how a crop's level moves (a plucked note decays, a bowed one holds), whatever its gain."""
        rows = []
        for curve, keep in zip(level.float(), valid):
            x = curve[keep[: curve.shape[0]]]
            if x.numel() == 0:
                rows.append(level.new_zeros(ENVELOPE_STATS))
                continue
            step = x.diff() if x.numel() > 1 else x.new_zeros(1)
            q = torch.quantile(x, x.new_tensor([0.1, 0.5, 0.9]))
            rows.append(torch.stack([x.mean(), x.std(unbiased=False), *q, step.clamp(min=0).mean(),
                                     (-step).clamp(min=0).mean(), (x >= x.max() - near_peak).float().mean()]))
        return torch.stack(rows)

    def _envelope_loss(self, hidden: Tensor, level: Tensor, frame_valid: Tensor) -> Tensor:
        """MSE of the envelope head on the time-averaged ``hidden`` [B, T, D] (valid frames up to the
        level curve's length) against :meth:`envelope_target` of ``level`` [B, T'] (:meth:`level_target`)."""
        frames = min(hidden.shape[1], level.shape[1])
        valid = frame_valid[:, :frames]
        with torch.no_grad():
            target = self.envelope_target(level[:, :frames], valid)
        weights = valid.to(hidden.dtype)[..., None]
        pooled = (hidden[:, :frames] * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, D]
        if self.config.envelope_dims:
            pooled = pooled[:, : self.config.envelope_dims]
        return F.mse_loss(self.envelope_head(pooled).float(), target)

    @torch.no_grad()
    def standardized_mfcc(self, wav: Tensor, frame_valid: Tensor) -> Tensor:
        """The MFCC target [B, T, 19] of the CLEAN ``wav`` [B, N] on the student's T frames, each
        coefficient standardised with the running mean and variance of every valid training frame
        seen so far (updated here in training mode; a batch before any training uses its own).
        Running, not per-batch, statistics: a batch of a few clips of one instrument must keep what
        sets that instrument apart in its target."""
        frames = frame_valid.shape[1]
        with torch.autocast(wav.device.type, enabled=False):
            mfcc = self.mfcc_teacher(wav.float())
        self._check_length("mfcc", mfcc.shape[1], frames)
        mfcc = mfcc[:, :frames]
        x = mfcc[frame_valid[:, : mfcc.shape[1]]].double()  # [n, 19]
        count, mean, m2 = self.mfcc_count, self.mfcc_mean, self.mfcc_m2
        if x.shape[0] and (self.training or count == 0):  # Chan et al.'s pairwise update of mean and M2
            n = float(x.shape[0])
            delta = x.mean(0) - mean
            total = count + n
            mean = mean + delta * n / total
            m2 = m2 + ((x - x.mean(0)) ** 2).sum(0) + delta ** 2 * count * n / total
            count = total
            if self.training:
                self.mfcc_count.copy_(count), self.mfcc_mean.copy_(mean), self.mfcc_m2.copy_(m2)
        std = (m2 / count.clamp(min=1)).sqrt().clamp(min=1e-6)
        return ((mfcc - mean) / std).float()

    def _prediction_loss(self, hidden: Tensor, select: Tensor, codes: Optional[Tensor],
                         regressions: Dict[str, Tensor], baselines: bool = True):
        """Prediction losses at the ``select`` [B, T] frames of ``hidden`` [B, T, D]: (sum of the
        codebook CEs + for each regression target (``cqt``, ``level``, ``mfcc``: [B, T', dims]) its
        weight x the MSE of its head, detached terms for logging)."""
        c = self.config
        h = hidden[select]  # [N, D]
        loss, terms = hidden.new_zeros(()), {}
        if codes is not None:
            target = codes.transpose(1, 2)[select[:, : codes.shape[-1]]]  # [N, K]
            logits = self.codebook_head(h)  # [N, K, C]
            if h.shape[0]:
                per_book = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(0)  # [K]
                acc = (logits.argmax(-1) == target).float().mean()
            else:  # no loss frame in this batch: zeros that keep the graph
                per_book, acc = logits.sum((0, 2)), logits.new_zeros(())
            weights = c.codebook_weights
            loss = loss + (per_book.sum() if weights is None else (per_book * per_book.new_tensor(weights)).sum())
            terms["acoustic_ce"] = per_book.sum().detach()
            terms["acoustic_acc"] = acc.detach()
            for k, v in enumerate(per_book.detach()):
                terms[f"acoustic_ce_{k}"] = v
            if baselines and not self.training and h.shape[0]:
                terms.update(self.baselines(codes, select, target))
        for name, target in regressions.items():
            pred = getattr(self, f"{name}_head")(h).float()
            target = target[select[:, : target.shape[1]]]
            mse = F.mse_loss(pred, target) if h.shape[0] else pred.sum()
            loss = loss + getattr(c, f"{name}_weight") * mse
            terms[f"{name}_mse"] = mse.detach()
        return loss, terms

    # ------------------------------------------------------------- baselines
    def set_code_prior(self, counts: Optional[Tensor]) -> None:
        """Code frequencies of the training labels, [K, C] counts (or None): in eval mode the
        objective then also reports the unigram baseline (``unigram_ce``, ``unigram_acc``)."""
        if counts is None:
            self.code_log_prior = None
            return
        counts = torch.as_tensor(counts, dtype=torch.float64)
        c = self.config
        if counts.shape != (c.num_codebooks, c.codebook_size):
            raise MERTError(f"code counts must be [{c.num_codebooks}, {c.codebook_size}], got {list(counts.shape)}")
        # add-one smoothing: a code unseen in training costs log(N + C) nats, not infinity
        self.code_log_prior = ((counts + 1) / (counts + 1).sum(-1, keepdim=True)).log().float()

    @torch.no_grad()
    def baselines(self, codes: Tensor, loss_mask: Tensor, target: Tensor) -> Dict[str, Tensor]:
        """Cheap predictors of the masked codes, to read the student's accuracy against.

        ``copy_acc``: the true label of the nearest unmasked frame of the same clip (a predictor
        that sees the labels, so an upper reference for "uses context", not a baseline to beat);
        ``unigram_ce`` / ``unigram_acc``: the training codes' frequencies, when
        :meth:`set_code_prior` was given them. codes [B, K, T], loss_mask [B, T], target [N_m, K].
        """
        bsz, _, frames = codes.shape
        pos = torch.arange(frames, device=codes.device)
        copied = []
        for b in range(bsz):
            masked = loss_mask[b, :frames]
            if not masked.any():
                continue
            visible = (~loss_mask[b, :frames]).nonzero()[:, 0]
            if visible.numel() == 0:  # the whole clip is masked: nothing to copy, count as wrong
                copied.append(torch.full_like(codes[b, :, masked].T, -1))
                continue
            right = torch.searchsorted(visible, pos[masked]).clamp(max=visible.numel() - 1)
            left = (right - 1).clamp(min=0)
            take = torch.where((pos[masked] - visible[left]).abs() <= (visible[right] - pos[masked]).abs(),
                               visible[left], visible[right])
            copied.append(codes[b][:, take].T)  # [n_b, K]
        out = {"copy_acc": (torch.cat(copied) == target).float().mean()}
        if self.code_log_prior is not None:
            prior = self.code_log_prior.to(codes.device)  # [K, C]
            books = torch.arange(prior.shape[0], device=codes.device)
            out["unigram_ce"] = -prior[books, target].mean(0).sum()
            out["unigram_acc"] = (prior.argmax(-1)[None] == target).float().mean()
        return out

    # ---------------------------------------------------------------- checks
    def _check_codes(self, codes: Optional[Tensor], bsz: int, frames: int) -> Tensor:
        c = self.config
        if codes is None:
            raise MERTError("codes are required (use_acoustic=True); pass labels from LabelGenerator or mert-labels")
        if codes.dim() != 3 or codes.shape[0] != bsz or codes.shape[1] != c.num_codebooks:
            raise MERTError(f"codes must be [B, K, T] = [{bsz}, {c.num_codebooks}, ~{frames}], "
                            f"got {list(codes.shape)}")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise MERTError(f"codes must be integers, got {codes.dtype}")
        self._check_length("codes", codes.shape[-1], frames)
        codes = codes.long()
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= c.codebook_size:
            raise MERTError(f"codes must lie in [0, {c.codebook_size}), got values in [{lo}, {hi}]")
        return codes

    def _check_cqt(self, cqt: Optional[Tensor], bsz: int, frames: int) -> Tensor:
        c = self.config
        if cqt is None:
            raise MERTError("cqt targets are required (use_cqt=True); pass them from LabelGenerator or mert-labels")
        if cqt.dim() != 3 or cqt.shape[0] != bsz or cqt.shape[2] != c.cqt_bins:
            raise MERTError(f"cqt must be [B, T, bins] = [{bsz}, ~{frames}, {c.cqt_bins}], got {list(cqt.shape)}")
        self._check_length("cqt", cqt.shape[1], frames)
        return cqt

    @staticmethod
    def _check_length(name: str, label_frames: int, frames: int) -> None:
        if abs(label_frames - frames) > LABEL_SLACK:
            raise MERTError(f"{name} has {label_frames} frames but the student produces {frames} for this audio: "
                            "labels must be at the student's frame rate and cropped with the audio "
                            "(frame start = sample start // 320)")
