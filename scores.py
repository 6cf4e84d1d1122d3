"""
Scores of an answer, shared by the evaluation and the RL stage: exact match (memory recall, the probe's MRL reward),
BLEU on token ids (the MRL reward of other turns), and the normalisation that text answers are compared under.
"""

import re

import torch


def normalize(text):
    """Lower case, letters, digits and spaces only: how a one-word answer is compared with the gold word."""
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def exact_match(ans, ans_len, ref, ref_mask):
    """(B,) bool: the answer equals the reference token for token, [EOS] included on both sides (an answer cut short
    is not right). ans (B, N) with lengths counting [EOS]; ref (B, R) right-padded, ref_mask (B, R)."""
    L = min(ans.size(1), ref.size(1))
    return ((ans[:, :L] == ref[:, :L]) | ~ref_mask[:, :L]).all(dim=1) & (ans_len == ref_mask.sum(dim=1))


def bleu(cand, cand_len, ref, ref_len, max_n=4):
    """Per-sentence BLEU on token ids, vectorised as in TensorBLEU (Filipek, arXiv:2510.05485): n-grams by unfold,
    counted per sentence through torch.unique, clipped by the reference counts; brevity penalty; add-one smoothing
    for n > 1.
    cand (B, Lc), ref (B, Lr) right-padded (pads must never match), lengths (B,) -> (B,) in [0, 1]."""
    B, device = cand.size(0), cand.device
    rows = torch.arange(B, device=device)[:, None]
    log_p = []
    for n in range(1, max_n + 1):
        grams, owners, totals = [], [], []
        for seq, length in ((cand, cand_len), (ref, ref_len)):
            g = seq.unfold(1, n, 1) if seq.size(1) >= n else seq.new_zeros(B, 0, n)  # (B, L-n+1, n)
            valid = torch.arange(g.size(1), device=device)[None] + n <= length[:, None]
            grams.append(g[valid])
            owners.append(rows.expand_as(valid)[valid])
            totals.append(valid.sum(dim=1))
        uniq, inverse = torch.unique(torch.cat(grams), dim=0, return_inverse=True)
        U, n_cand = max(1, uniq.size(0)), grams[0].size(0)
        c_counts = torch.bincount(owners[0] * U + inverse[:n_cand], minlength=B * U).view(B, U)
        r_counts = torch.bincount(owners[1] * U + inverse[n_cand:], minlength=B * U).view(B, U)
        matches, total = torch.minimum(c_counts, r_counts).sum(dim=1).float(), totals[0].float()
        p = matches / total.clamp(min=1) if n == 1 else (matches + 1) / (total + 1)
        log_p.append(torch.log(p.clamp(min=1e-30)) if n > 1 else torch.log(p).nan_to_num(neginf=-1e30))
    c, r = cand_len.float(), ref_len.float()
    bp = torch.where(c > r, torch.ones_like(c), torch.exp(1 - r / c.clamp(min=1)))
    score = bp * torch.exp(torch.stack(log_p).mean(dim=0))
    return torch.where(cand_len > 0, score, torch.zeros_like(score))
