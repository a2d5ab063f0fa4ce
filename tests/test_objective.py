"""Masking, in-batch noise mixture, heads and loss of the MERT objective."""
import math

import pytest
import torch
import torch.nn.functional as F

from mert_plugin import MERTModel
from mert_plugin.components import relax_attention
from mert_plugin.errors import ConfigError, MERTError
from mert_plugin.masking import compute_span_mask
from mert_plugin.mixture import mix_in_batch_noise
from mert_plugin.objective import MERTPretrainer, ObjectiveConfig
from test_teachers import fitted_generator, synth_music  # noqa: F401  (session fixture)


def one_second_batch(cqt_floor: float = 0.0):
    """Two 16,000-sample noise clips with random codes [2, 8, T], CQT magnitudes [2, T, 336] (plus
    ``cqt_floor``) and a fixed span mask [2, T] on mert-tiny's T frames: the heads' test batch."""
    wav = torch.randn(2, 16000) * 0.1
    t = MERTModel.from_preset("mert-tiny", seed=0).num_frames(16000)
    codes, cqt = torch.randint(0, 1024, (2, 8, t)), torch.rand(2, t, 336) + cqt_floor
    mask = compute_span_mask((2, t), 0.8, 5, 2, generator=torch.Generator().manual_seed(0))
    return wav, codes, cqt, mask


# ---------------------------------------------------------------- masking
def expected_masked_fraction(frames, mask_prob=0.8, span=5):
    """P(frame masked), averaged over frames: starts drawn without replacement from T - span positions."""
    room = frames - span
    base = mask_prob * frames / span
    counts = {math.floor(base): 1 - (base - math.floor(base)), math.floor(base) + 1: base - math.floor(base)}
    total = 0.0
    for count, p in counts.items():
        for j in range(frames):
            covering = sum(1 for s in range(max(0, j - span + 1), j + 1) if s < room)
            total += p * (1 - math.comb(room - covering, count) / math.comb(room, count))
    return total / frames


def test_masked_fraction_matches_fairseq_statistics():
    gen = torch.Generator().manual_seed(0)
    fractions = torch.cat([compute_span_mask((64, 374), 0.8, 5, 2, generator=gen).float().mean(1)
                           for _ in range(30)])
    expected = expected_masked_fraction(374)
    # 0.58 for 5 s: starts are drawn without replacement, so slightly more than the
    # with-replacement estimate 1 - exp(-0.8) = 0.55 quoted for HuBERT/MERT.
    assert 0.575 < expected < 0.59
    assert abs(float(fractions.mean()) - expected) < 0.004


def test_mask_spans_counts_and_padding():
    gen = torch.Generator().manual_seed(1)
    mask = compute_span_mask((32, 200), 0.8, 5, 2, generator=gen)
    for row in mask:  # every run of masked frames is at least one span long
        edges = torch.diff(torch.cat([torch.zeros(1), row.float(), torch.zeros(1)]))
        runs = (edges == -1).nonzero()[:, 0] - (edges == 1).nonzero()[:, 0]
        assert int(runs.min()) >= 5
    few = compute_span_mask((16, 40), 0.01, 5, 2, generator=gen)  # min_masks=2 spans
    assert int(few.sum(1).min()) >= 5
    valid = torch.arange(100)[None] < torch.tensor([100, 60, 30])[:, None]
    padded = compute_span_mask((3, 100), 0.8, 5, 2, frame_mask=valid, generator=gen)
    assert not (padded & ~valid).any()
    assert 0.35 < float(padded[2, :30].float().mean()) < 0.85
    same = compute_span_mask((8, 120), 0.8, 5, 2, require_same_masks=True, generator=gen)
    assert same.sum(1).unique().numel() == 1


def test_each_clip_draws_its_own_span_count_then_the_batch_minimum_is_kept():
    """The reference passes an all-False padding mask, so every clip draws its own span count;
    fairseq's require_same_masks then trims every clip to the batch's smallest masked count."""
    untrimmed = compute_span_mask((64, 374), 0.8, 5, 2, generator=torch.Generator().manual_seed(5))
    counts = untrimmed.sum(1)
    assert counts.unique().numel() > 1  # per-clip draws (one batch-wide draw would give ~equal counts)
    trimmed = compute_span_mask((64, 374), 0.8, 5, 2, require_same_masks=True,
                                generator=torch.Generator().manual_seed(5))
    assert (trimmed.sum(1) == counts.min()).all()  # every clip keeps exactly the batch minimum ...
    assert not (trimmed & ~untrimmed).any()  # ... of its own masked frames


def test_pretrainer_masks_like_the_reference():
    """MERT's objective trims to the batch minimum: ~54 % masked for 16 clips of 5 s (58 % per clip)."""
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig())
    assert trainer.config.require_same_masks
    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(16, 374, dtype=torch.bool)
    masks = [trainer.span_mask(valid, gen) for _ in range(40)]
    for m in masks:
        assert m.sum(1).unique().numel() == 1
    fraction = float(torch.stack(masks).float().mean())
    assert 0.525 < fraction < 0.555, fraction
    assert fraction < expected_masked_fraction(374) - 0.02


def test_eval_reports_copy_and_unigram_baselines_of_the_masked_codes():
    cfg = ObjectiveConfig(num_codebooks=2, codebook_size=16, final_dim=8, use_cqt=False, mixture_prob=0.0)
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), cfg).eval()
    wav = torch.randn(3, 16000) * 0.1
    t = trainer.student.num_frames(16000)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 2, t), generator=gen)
    codes[:, 1] = 3 + (torch.arange(t) >= t // 2).long()  # book 1: two long segments
    mask = compute_span_mask((3, t), 0.8, 5, 2, generator=gen)
    counts = torch.zeros(2, 16)
    counts[0, 5], counts[1, 3] = 10, 10  # the prior's favourite codes: 5 and 3
    trainer.set_code_prior(counts)
    out = trainer(wav, codes, mask=mask)
    hits, ce, uni_hits, n = 0, 0.0, 0, 0
    prior = (counts + 1) / (counts + 1).sum(-1, keepdim=True)
    for b in range(3):
        visible = [i for i in range(t) if not mask[b, i]]
        for i in range(t):
            if mask[b, i]:
                nearest = min(visible, key=lambda v: (abs(v - i), v))  # ties go left
                hits += int((codes[b, :, nearest] == codes[b, :, i]).sum())
                uni_hits += int(codes[b, 0, i] == 5) + int(codes[b, 1, i] == 3)
                ce -= float(prior[0, codes[b, 0, i]].log() + prior[1, codes[b, 1, i]].log())
                n += 1
    assert out.terms["copy_acc"] == pytest.approx(hits / (2 * n), abs=1e-6)
    assert out.terms["unigram_acc"] == pytest.approx(uni_hits / (2 * n), abs=1e-6)
    assert out.terms["unigram_ce"] == pytest.approx(ce / n, rel=1e-5)
    assert float(out.terms["copy_acc"]) > 0.4  # mean of book 0 (random, ~1/16) and book 1 (copyable, ~0.9)
    assert "copy_acc" not in trainer.train()(wav, codes, mask=mask).terms  # eval-only diagnostics


def test_db_cqt_target_is_level_free_and_bounded():
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig(cqt_target="db"))
    cqt = torch.rand(2, 20, 336) * torch.tensor([1.0, 0.01])[:, None, None]
    cqt[0, 5:8] = 0.0  # silent frames
    target = trainer.cqt_target(cqt)
    torch.testing.assert_close(trainer.cqt_target(cqt * 37.0), target)  # any gain: the same target
    peak = 1.0 + 20.0 * math.log10(1.0 + 1e-3) / 60.0  # the loudest bin; the floor offset adds 1e-3
    assert float(target.min()) >= 0.0 and float(target.max()) == pytest.approx(peak, rel=1e-6)
    assert (target[0, 5:8] == 0).all()  # silence is the floor (-60 dB), not noise
    linear = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig())
    assert torch.equal(linear.cqt_target(cqt), cqt)  # the reference target is untouched
    with pytest.raises(ConfigError, match="cqt_target"):
        ObjectiveConfig(cqt_target="log").validate()


def test_db_frame_target_is_the_spectral_shape_of_each_frame():
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig(cqt_target="db-frame"))
    cqt = torch.rand(1, 20, 336) + 0.01
    louder = cqt.clone()
    louder[0, 3] *= 30.0  # one frame 30 dB louder: the same shape
    cqt[0, 9] = 1e-6 * torch.rand(336)  # ~120 dB below the clip: silence
    louder[0, 9] = cqt[0, 9]
    target, target_louder = trainer.cqt_target(cqt), trainer.cqt_target(louder)
    torch.testing.assert_close(target[0, 3], target_louder[0, 3])
    assert (target[0, 9] == 0).all() and (target_louder[0, 9] == 0).all()
    peak = 1.0 + 20.0 * math.log10(1.0 + 1e-3) / 60.0
    assert torch.allclose(target[0, :9].amax(-1), torch.tensor(peak))  # every sounding frame has its peak at 1


def test_linear_frame_target_is_each_frames_linear_shape():
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig(cqt_target="linear-frame"))
    cqt = torch.rand(1, 20, 336) + 0.01
    louder = cqt.clone()
    louder[0, 3] *= 30.0  # one frame louder: the same shape
    cqt[0, 9] = 1e-6 * torch.rand(336)  # ~120 dB below the clip: silence
    louder[0, 9] = cqt[0, 9]
    target, target_louder = trainer.cqt_target(cqt), trainer.cqt_target(louder)
    torch.testing.assert_close(target[0, 3], target_louder[0, 3])
    assert (target[0, 9] == 0).all() and (target_louder[0, 9] == 0).all()
    assert torch.equal(target[0, :9].amax(-1), torch.ones(9))  # every sounding frame peaks at exactly 1
    # linear, not dB: a bin at half the frame's peak is 0.5 (in dB-frame it would be ~0.9)
    frame = torch.full((1, 1, 336), 0.5)
    frame[0, 0, 7] = 1.0
    assert float(trainer.cqt_target(frame)[0, 0, 0]) == pytest.approx(0.5)


def test_pred_nomask_weight_adds_the_visible_frames_loss():
    wav, codes, cqt, mask = one_second_batch()
    outs = {}
    for w in (0.0, 0.5):
        trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0),
                                 ObjectiveConfig(pred_nomask_weight=w, mixture_prob=0.0)).eval()
        outs[w] = trainer(wav, codes, cqt, mask=mask)
    plain, both = outs[0.0].terms, outs[0.5].terms
    assert "unmasked_acoustic_ce" not in plain
    expected = plain["loss"] + 0.5 * (both["unmasked_acoustic_ce"] + both["unmasked_cqt_mse"])
    assert float(both["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(both["unmasked_acoustic_ce"]) != float(plain["acoustic_ce"])  # other frames, other loss



def test_codebook_weights_scale_each_codebooks_cross_entropy():
    wav, codes, cqt, mask = one_second_batch()
    weights = (1.0, 0.25, 0.0, 2.0, 1.0, 1.0, 0.5, 1.0)
    outs = {}
    for w in (None, weights):
        trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0),
                                 ObjectiveConfig(codebook_weights=w, mixture_prob=0.0)).eval()
        outs[w] = trainer(wav, codes, cqt, mask=mask).terms
    plain, weighted = outs[None], outs[weights]
    per_book = torch.stack([plain[f"acoustic_ce_{k}"] for k in range(8)])
    rest = plain["loss"] - per_book.sum()  # CQT MSE and feature penalty: untouched by the weights
    expected = rest + (per_book * torch.tensor(weights)).sum()
    assert float(weighted["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(weighted["acoustic_ce"]) == pytest.approx(float(plain["acoustic_ce"]), rel=1e-6)  # logged unweighted
    for bad in ((1.0,) * 7, (1.0,) * 7 + (-1.0,)):
        with pytest.raises(ConfigError, match="codebook_weights"):
            ObjectiveConfig(codebook_weights=bad).validate()


# ---------------------------------------------------------------- mixture
def test_mixture_only_borrows_from_other_clips_and_leaves_input_alone():
    bsz, num = 4, 30000
    # Sample i of clip b holds (b + 1) * 1e6 + i, so any added value names its source.
    clean = torch.stack([(b + 1) * 1e6 + torch.arange(num, dtype=torch.float64) for b in range(bsz)])
    before = clean.clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        noisy = mix_in_batch_noise(clean, prob=1.0, min_samples=1000, max_samples=3000, min_count=1,
                                   max_count=1, generator=gen)
        assert torch.equal(clean, before)
        for b in range(bsz):
            added = noisy[b] - clean[b]
            where = added.nonzero()[:, 0]
            assert 1000 <= where.numel() <= 3000 and int(where[-1] - where[0]) + 1 == where.numel()
            values = added[where]
            src_clip = (values // 1e6 - 1).long()
            assert not (src_clip == b).any()
            index = values - (src_clip + 1) * 1e6
            steps = torch.diff(index)  # consecutive pool samples; may cross into the next clip
            assert bool(((steps == 1) | (torch.diff(src_clip) != 0)).all())


def test_mixture_rate_counts_and_unit_gain():
    gen = torch.Generator().manual_seed(2)
    wav = torch.randn(8, 48000)
    mixed = total = 0
    for _ in range(40):
        noisy = mix_in_batch_noise(wav, 0.5, 12000, 24000, 1, 3, generator=gen)
        changed = (noisy != wav).any(1)
        mixed += int(changed.sum())
        total += changed.numel()
        for b in changed.nonzero()[:, 0]:
            n = int((noisy[b] != wav[b]).sum())
            assert 12000 <= n <= 3 * 24000
    assert abs(mixed / total - 0.5) < 0.08
    assert torch.equal(mix_in_batch_noise(wav[:1], 1.0, generator=gen), wav[:1])  # nothing to borrow from


def test_pretrainer_mixes_the_input_but_not_the_targets(fitted_generator):
    wav = torch.stack([synth_music(1.0, s) for s in range(3)])
    codes, cqt = fitted_generator(wav)
    copies = [t.clone() for t in (wav, codes, cqt)]
    cfg = ObjectiveConfig(mixture_prob=1.0, mixture_min_samples=4000, mixture_max_samples=8000)
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), cfg).train()
    mask = compute_span_mask((3, codes.shape[-1]), 0.8, 5, 2, generator=torch.Generator().manual_seed(3))
    seen = []
    hook = trainer.student.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].clone()),
                                                     with_kwargs=True)
    out = trainer(wav, codes, cqt, mask=mask, generator=torch.Generator().manual_seed(5))
    hook.remove()
    for before, after in zip(copies, (wav, codes, cqt)):
        assert torch.equal(before, after)
    noisy = trainer.mix(wav, generator=torch.Generator().manual_seed(5))
    assert torch.equal(seen[0], noisy) and not torch.equal(noisy, wav)
    # Same loss as feeding the noisy audio by hand with the clean targets (tiny has no dropout).
    reference = trainer.eval()(noisy, codes, cqt, mask=mask)
    torch.testing.assert_close(out.loss, reference.loss)


# ------------------------------------------------------------------- loss
def reference_loss(hidden, conv_features, loss_mask, codes, cqt, trainer):
    """The reference criterion written out with torch.cosine_similarity, per codebook."""
    cfg, head = trainer.config, trainer.codebook_head
    h = hidden[loss_mask]
    proj = head.final_proj(h).chunk(cfg.num_codebooks, dim=-1)  # untie_final_proj
    total = 0.0
    for k in range(cfg.num_codebooks):
        logits = torch.cosine_similarity(proj[k][:, None, :], head.label_embs[k][None], dim=-1) / cfg.logit_temp
        total = total + F.cross_entropy(logits, codes[:, :, k][loss_mask], reduction="sum")
    n_m = h.shape[0]
    mse = F.mse_loss(trainer.cqt_head(h), cqt[loss_mask])
    pen = conv_features.float().pow(2).mean()
    return (total + 10 * pen * n_m + 1.0 * mse * n_m) / n_m


def test_loss_equals_reference_criterion():
    torch.manual_seed(0)
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=1), ObjectiveConfig()).eval()
    wav = torch.randn(2, 16000) * 0.1
    t = trainer.student.num_frames(16000)
    codes = torch.randint(0, 1024, (2, 8, t + 2))  # EnCodec-like: 2 extra tail frames
    cqt = torch.rand(2, t + 1, 336)
    captured = {}
    hook = trainer.student.register_forward_hook(lambda m, a, out: captured.update(out=out))
    out = trainer(wav, codes, cqt)
    hook.remove()
    ref = reference_loss(captured["out"].last_hidden_state, captured["out"].conv_features, out.mask,
                         codes[:, :, :t].transpose(1, 2), cqt[:, :t], trainer)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert set(out.terms) >= {"loss", "acoustic_ce", "acoustic_acc", "cqt_mse", "feature_penalty"}
    assert all(not v.requires_grad for v in out.terms.values())
    total = out.terms["acoustic_ce"] + out.terms["cqt_mse"] + 10 * out.terms["feature_penalty"]
    torch.testing.assert_close(out.terms["loss"], total)


def test_loss_decreases_when_overfitting_one_batch(fitted_generator):
    torch.manual_seed(0)
    wav = torch.stack([synth_music(1.0, 100 + s) for s in range(4)])
    codes, cqt = fitted_generator(wav)
    for k in range(8):  # the labels are informative, not the all-zero codes of a random EnCodec
        assert codes[:, k].unique().numel() >= 10
    cfg = ObjectiveConfig.from_preset("mert-tiny")
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), cfg).train()
    opt = torch.optim.Adam(trainer.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    mask = compute_span_mask((4, codes.shape[-1]), 0.8, 5, 2, generator=gen)
    history = []
    for _ in range(30):
        out = trainer(wav, codes, cqt, mask=mask, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in out.terms.items()})
    assert history[-1]["acoustic_ce"] < 0.8 * history[0]["acoustic_ce"]
    # 0.54 of the start with this mask draw (0.46-0.5 with others): the linear-magnitude CQT is learnt slowly
    assert history[-1]["cqt_mse"] < 0.65 * history[0]["cqt_mse"]
    assert history[-1]["acoustic_acc"] > history[0]["acoustic_acc"] + 0.1


def test_label_alignment_and_input_checks():
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig()).eval()
    wav = torch.randn(2, 16000) * 0.1
    t = trainer.student.num_frames(16000)
    cqt = torch.rand(2, t, 336)
    short = trainer(wav, torch.randint(0, 1024, (2, 8, t - 1)), cqt)
    assert not short.mask[:, t - 1:].any()  # frames without labels are left out of the loss
    with pytest.raises(MERTError, match="student produces"):
        trainer(wav, torch.randint(0, 1024, (2, 8, t + 20)), cqt)  # e.g. uncropped whole-file labels
    with pytest.raises(MERTError, match=r"\[0, 1024\)"):
        trainer(wav, torch.full((2, 8, t), 1024), cqt)
    with pytest.raises(MERTError, match="codes are required"):
        trainer(wav, None, cqt)
    with pytest.raises(MERTError, match="cqt must be"):
        trainer(wav, torch.zeros(2, 8, t, dtype=torch.long), torch.rand(2, t, 84))


def test_padded_frames_never_enter_the_loss():
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig()).train()
    wav = torch.randn(2, 24000) * 0.1
    padding = torch.zeros(2, 24000, dtype=torch.bool)
    padding[1, 12000:] = True
    wav[1, 12000:] = 0
    t = trainer.student.num_frames(24000)
    out = trainer(wav, torch.randint(0, 1024, (2, 8, t)), torch.rand(2, t, 336), padding_mask=padding)
    assert not out.mask[1, trainer.student.num_frames(12000):].any()
    assert out.mask[0, trainer.student.num_frames(12000):].any()


def test_presets_and_state_dict_layout():
    assert ObjectiveConfig.from_preset("mert-v1-330m").final_dim == 128
    assert ObjectiveConfig.from_preset("mert-v1-330m").mixture_max_samples == 36000
    assert ObjectiveConfig.from_preset("mert-v1-95m") == ObjectiveConfig()
    with pytest.raises(ConfigError):
        ObjectiveConfig.from_preset("mert-v2")
    with pytest.raises(ConfigError):
        ObjectiveConfig(use_acoustic=False, use_cqt=False).validate()
    trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig())
    assert trainer.student.feature_grad_mult == 0.1
    heads = {k for k in trainer.state_dict() if not k.startswith("student.")}
    assert heads == {"codebook_head.final_proj.weight", "codebook_head.final_proj.bias",
                     "codebook_head.label_embs", "cqt_head.weight", "cqt_head.bias"}
    assert trainer.codebook_head.final_proj.out_features == 8 * 64
    student_keys = {k[len("student."):] for k in trainer.state_dict() if k.startswith("student.")}
    assert student_keys == set(MERTModel.from_preset("mert-tiny").state_dict())


# -------------------------------------------------------- attention relax
def test_attention_relax_switch_equals_plain_attention():
    torch.manual_seed(0)
    wav = torch.randn(2, 16000) * 0.1
    plain = MERTModel.from_preset("mert-tiny", seed=3).eval()
    relaxed = MERTModel.from_preset("mert-tiny", seed=3).eval()
    MERTPretrainer(relaxed, ObjectiveConfig(attention_relax=32.0))
    alphas = {m.relax_alpha for m in relaxed.modules() if hasattr(m, "relax_alpha")}
    assert alphas == {32.0}
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 9000:] = True
    a = plain(wav, padding_mask=padding).hidden_states
    b = relaxed(wav, padding_mask=padding).hidden_states
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_relax_attention_survives_fp16_logits_that_overflow_plain_matmul():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 16, 64) * 40
    k = torch.randn(1, 2, 16, 64) * 40
    v = torch.randn(1, 2, 16, 64)
    k[..., 3, :] = q[..., 5, :]  # one huge logit: |q.k| ~ 1e5 > fp16 max
    assert torch.isinf(torch.matmul(q.half(), k.half().transpose(-1, -2))).any()
    reference = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
    out = relax_attention(q.half(), k.half(), v.half(), None, alpha=32.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_level_target_is_each_frames_level_within_its_crop():
    cqt = torch.rand(2, 20, 336) + 0.01
    cqt[0, 10:] *= 0.1                                                    # the second half 20 dB quieter
    level = MERTPretrainer.level_target(cqt)
    assert level.shape == (2, 20) and float(level.max()) <= 1.0 + 1e-3 and float(level.min()) >= 0.0
    torch.testing.assert_close(MERTPretrainer.level_target(cqt * 50.0), level)  # gain-free
    drop = level[0, :10].mean() - level[0, 10:].mean()
    assert float(drop) == pytest.approx(20.0 / 60.0, abs=0.02)            # -20 dB = -1/3 of the 60 dB range
    assert float((level[1, :10].mean() - level[1, 10:].mean()).abs()) < 0.02


def test_level_weight_adds_a_level_head_and_its_loss():
    wav, codes, cqt, mask = one_second_batch(cqt_floor=0.01)
    outs = {}
    for w in (0.0, 2.0):
        trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0),
                                 ObjectiveConfig(level_weight=w, mixture_prob=0.0, cqt_target="db-frame")).eval()
        assert (trainer.level_head is None) == (w == 0)
        outs[w] = (trainer, trainer(wav, codes, cqt, mask=mask).terms)
    plain, (trainer, with_level) = outs[0.0][1], outs[2.0]
    assert "level_mse" not in plain
    assert float(with_level["loss"]) == pytest.approx(float(plain["loss"] + 2.0 * with_level["level_mse"]), rel=1e-5)
    # the term is the MSE of the level head at the masked frames against level_target
    with torch.no_grad():
        student = trainer.student(wav, mask_time_indices=mask)
        pred = trainer.level_head(student.last_hidden_state[mask])[:, 0]
        expected = torch.nn.functional.mse_loss(pred, MERTPretrainer.level_target(cqt)[mask])
    assert float(with_level["level_mse"]) == pytest.approx(float(expected), rel=1e-5)
    for bad in (dict(level_weight=-1.0), dict(level_weight=1.0, use_cqt=False)):
        with pytest.raises(ConfigError, match="level_weight"):
            ObjectiveConfig(**bad).validate()


def test_envelope_target_summarises_each_crops_level_curve_over_its_valid_frames():
    import numpy as np

    curves = torch.tensor([[1.0, 0.9, 0.5, 0.2, 0.1, 0.0],     # a decaying (plucked) note
                           [0.2, 0.9, 1.0, 0.95, 0.9, 0.7]])   # a swell that holds; the last frame is padding
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5] = False
    stats = MERTPretrainer.envelope_target(curves, valid)
    assert stats.shape == (2, 8)
    for row, curve, keep in zip(stats, curves.numpy(), valid.numpy()):
        x = curve[keep]
        step = np.diff(x)
        expected = [x.mean(), x.std(), *np.quantile(x, [0.1, 0.5, 0.9]), np.clip(step, 0, None).mean(),
                    np.clip(-step, 0, None).mean(), (x >= x.max() - 0.2).mean()]
        np.testing.assert_allclose(row.numpy(), expected, atol=1e-6)
    assert float(stats[0, 6]) > float(stats[1, 6]) and float(stats[1, 7]) > float(stats[0, 7])  # decays vs holds
    # from the CQT, through level_target: gain-free
    cqt = torch.rand(2, 20, 336) + 0.01
    cqt[:, 10:] *= torch.linspace(1.0, 0.01, 10)[None, :, None]
    full = torch.ones(2, 20, dtype=torch.bool)
    torch.testing.assert_close(MERTPretrainer.envelope_target(MERTPretrainer.level_target(cqt * 30.0), full),
                               MERTPretrainer.envelope_target(MERTPretrainer.level_target(cqt), full))


@pytest.mark.parametrize("dims", [0, 16])
def test_envelope_weight_adds_a_head_on_the_time_averaged_last_layer(dims):
    wav, codes, cqt, mask = one_second_batch(cqt_floor=0.01)
    t = mask.shape[1]
    cqt[0, t // 2:] *= 0.05  # a quiet second half: a level curve that moves
    outs = {}
    for w in (0.0, 4.0):
        trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0),
                                 ObjectiveConfig(envelope_weight=w, envelope_dims=dims, mixture_prob=0.0,
                                                 cqt_target="db-frame")).eval()
        assert (trainer.envelope_head is None) == (w == 0)
        outs[w] = (trainer, trainer(wav, codes, cqt, mask=mask).terms)
    plain, (trainer, with_envelope) = outs[0.0][1], outs[4.0]
    assert "envelope_mse" not in plain
    assert float(with_envelope["loss"]) == pytest.approx(float(plain["loss"] + 4.0 * with_envelope["envelope_mse"]),
                                                         rel=1e-5)
    assert trainer.envelope_head.in_features == (dims or trainer.student.config.hidden_size)
    with torch.no_grad():
        pooled = trainer.student(wav, mask_time_indices=mask).last_hidden_state.mean(1)
        pred = trainer.envelope_head(pooled[:, : dims or None])
        target = MERTPretrainer.envelope_target(MERTPretrainer.level_target(cqt), torch.ones(2, t, dtype=torch.bool))
    assert float(with_envelope["envelope_mse"]) == pytest.approx(float(F.mse_loss(pred, target)), rel=1e-5)
    # only the head's dimensions of the last hidden state receive the envelope's gradient
    if dims:
        trainer.zero_grad()
        hidden = trainer.student(wav, mask_time_indices=mask).last_hidden_state.detach().requires_grad_()
        level = MERTPretrainer.level_target(cqt)
        trainer._envelope_loss(hidden, level, torch.ones(2, t, dtype=torch.bool)).backward()
        assert float(hidden.grad[..., :dims].abs().sum()) > 0 and float(hidden.grad[..., dims:].abs().sum()) == 0
    for bad in (dict(envelope_weight=-1.0), dict(envelope_weight=1.0, use_cqt=False), dict(envelope_dims=-2)):
        with pytest.raises(ConfigError, match="envelope"):
            ObjectiveConfig(**bad).validate()
    with pytest.raises(ConfigError, match="envelope_dims"):
        MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0), ObjectiveConfig(envelope_weight=1.0, envelope_dims=4096))


def test_level_and_envelope_heads_together_add_both_terms():
    wav, codes, cqt, mask = one_second_batch(cqt_floor=0.01)
    terms = {}
    for weights in ((0.0, 0.0), (2.0, 0.0), (2.0, 4.0)):
        torch.manual_seed(0)  # the same level head with or without the envelope head (built after it)
        trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0),
                                 ObjectiveConfig(level_weight=weights[0], envelope_weight=weights[1],
                                                 mixture_prob=0.0, cqt_target="db-frame")).eval()
        terms[weights] = trainer(wav, codes, cqt, mask=mask).terms
    both = terms[(2.0, 4.0)]
    assert float(both["level_mse"]) == pytest.approx(float(terms[(2.0, 0.0)]["level_mse"]), rel=1e-5)
    assert float(both["loss"]) == pytest.approx(
        float(terms[(0.0, 0.0)]["loss"] + 2.0 * both["level_mse"] + 4.0 * both["envelope_mse"]), rel=1e-5)


def test_mfcc_weight_adds_a_head_on_running_standardised_mfccs_of_the_clean_audio():
    from mert_plugin.teachers import MFCCTarget
    from test_teachers import synth_music

    wavs = [torch.stack([synth_music(1.0, s), synth_music(1.0, s + 1) * 0.3]) for s in (0, 2)]
    t = MERTModel.from_preset("mert-tiny", seed=0).num_frames(24000)
    codes, cqt = torch.randint(0, 1024, (2, 8, t)), torch.rand(2, t, 336) + 0.01
    mask = compute_span_mask((2, t), 0.8, 5, 2, generator=torch.Generator().manual_seed(0))
    outs = {}
    for w in (0.0, 3.0):
        torch.manual_seed(0)
        trainer = MERTPretrainer(MERTModel.from_preset("mert-tiny", seed=0),
                                 ObjectiveConfig(mfcc_weight=w, mixture_prob=0.0, cqt_target="db-frame")).eval()
        assert (trainer.mfcc_head is None) == (w == 0) and ("mfcc_mean" in trainer.state_dict()) == (w > 0)
        outs[w] = (trainer, trainer(wavs[0], codes, cqt, mask=mask).terms)
    plain, (trainer, with_mfcc) = outs[0.0][1], outs[3.0]
    assert "mfcc_mse" not in plain
    assert float(with_mfcc["loss"]) == pytest.approx(float(plain["loss"] + 3.0 * with_mfcc["mfcc_mse"]), rel=1e-5)
    assert float(trainer.mfcc_count) == 0  # eval mode before any training: the batch's own statistics
    mfccs = [MFCCTarget()(w)[:, :t] for w in wavs]  # the clean audio's MFCCs on the student's frames
    with torch.no_grad():
        h = trainer.student(wavs[0], mask_time_indices=mask).last_hidden_state
        x = mfccs[0].reshape(-1, 19)
        target = (mfccs[0] - x.mean(0)) / x.std(0, unbiased=False)
        expected = F.mse_loss(trainer.mfcc_head(h[mask]), target[mask])
    assert float(with_mfcc["mfcc_mse"]) == pytest.approx(float(expected), rel=1e-4)

    # training: the statistics run over every valid frame seen (noise is mixed into the input only)
    trainer.config.mixture_prob = 1.0
    trainer.train()
    for wav in wavs:
        out = trainer(wav, codes, cqt, generator=torch.Generator().manual_seed(1))
    seen = torch.cat(mfccs).reshape(-1, 19).double()
    assert float(trainer.mfcc_count) == seen.shape[0]
    torch.testing.assert_close(trainer.mfcc_mean, seen.mean(0))
    torch.testing.assert_close(trainer.mfcc_m2 / trainer.mfcc_count, seen.var(0, unbiased=False))
    out.loss.backward()
    assert float(trainer.mfcc_head.weight.grad.abs().sum()) > 0
    trainer.eval()
    trainer(wavs[0], codes, cqt, mask=mask)
    assert float(trainer.mfcc_count) == seen.shape[0]  # evaluation does not move them
    with pytest.raises(ConfigError, match="mfcc_weight"):
        ObjectiveConfig(mfcc_weight=-1.0).validate()
