"""Which label-free criterion picks the trial that does best on the unlabelled images' setting?

Runs `autotransfer search` in this process (same flags) with `train_trial` wrapped: every complete trial's own
model is also scored on the pair's target test split (which the product never reads) and by candidate criteria
on the unlabelled split, stored as `x_*` user attributes of the study. `report` then prints, per study, each
criterion's Spearman correlation with target accuracy and the target accuracy of the trial it ranks first.
Criteria: the objective (mean of validation and reverse validation), each alone, the reverse head's
cross-entropy, mean prediction entropy, information maximisation, soft neighbourhood density (Saito et al.
2021), agreement with the 10 nearest unlabelled neighbours, validation cross-entropy, and DEV (importance-weighted
validation loss, You et al. 2019). Measurement only: nothing here is used by the product.

    python benchmarks/adapt_criteria.py search benchmarks/.data/adapt/digits/data \
        --unlabeled benchmarks/.data/adapt/digits/data/unlabeled --budget 50 --patience 0 --refit 0 --seed 2 \
        --out benchmarks/.work/criteria_digits
    python benchmarks/adapt_criteria.py report benchmarks/.work/criteria_digits/study.db

(the pair folders are those `benchmarks/adapt.py` builds).
"""

import math
import sys

import optuna
import torch
from scipy.stats import spearmanr

import autotransfer.study as study_mod
from autotransfer.adapt import information_loss, standardised
from autotransfer.data import UNLABELED
from autotransfer.evaluation import logits_of
from autotransfer.heads import build_head
from autotransfer.probe import fit_head
from autotransfer.unlabeled import _REVERSE_HEAD

_last: dict = {}


def feats(model, s, cache, split):
    model.eval()
    if not s.trains_backbone:
        return cache.pooled(len(model.groups), model.pool.kind, split)
    start = cache.start_boundary(s.freeze)
    x, y = cache.split(start, split)
    return logits_of(lambda b: model.features_from(b, start), x, cache, "cpu"), y


def entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(1)


@torch.no_grad()
def head_logits(model, f):
    model.head.eval()
    return model.head(f.float())


def extras(r, s, cache):
    model = r.model.cpu()
    fu, _ = feats(model, s, cache, UNLABELED)
    fv, yv = feats(model, s, cache, "val")
    ft, yt = feats(model, s, cache, "train")
    fte, yte = feats(model, s, cache, "test")
    lu, lv, lt = head_logits(model, fu), head_logits(model, fv), head_logits(model, fte)
    out = {"target_acc": float((lt.argmax(1) == yte).float().mean())}
    pu = lu.softmax(1)
    out["ent"] = float(entropy(pu).mean())
    out["im"] = -float(information_loss(lu))  # the product's loss, negated: higher is better
    # soft neighbourhood density (Saito et al. 2021) on the softmax outputs
    q = torch.nn.functional.normalize(pu, dim=1)
    sim = q @ q.T
    sim.fill_diagonal_(-math.inf)
    out["snd"] = float(entropy((sim / 0.05).softmax(1)).mean())
    # neighbourhood consistency: share of unlabelled rows whose prediction matches the majority of its 10
    # nearest neighbours (cosine, standardised features)
    z = torch.nn.functional.normalize(standardised(fu.float()), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-math.inf)
    nn_idx = sim.topk(10, dim=1).indices
    pred = lu.argmax(1)
    maj = torch.mode(pred[nn_idx], dim=1).values
    out["knn_agree"] = float((maj == pred).float().mean())
    # reverse validation's cross-entropy (continuous)
    xs, xv = standardised(fu.float()), standardised(fv.float())
    head = build_head("linear", xs.shape[1], len(cache.data.classes))
    fit_head(head, xs, pred, _REVERSE_HEAD)
    with torch.no_grad():
        head.eval()
        rl = head(xv)
    out["rev_nll"] = float(torch.nn.functional.cross_entropy(rl, yv))
    out["val_nll"] = float(torch.nn.functional.cross_entropy(lv, yv))
    # DEV (You et al. 2019): importance-weighted validation loss, domain classifier on train vs unlabelled
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    xd = torch.cat([ft, fu]).float()
    mu, sd = xd.mean(0), xd.std(0).clamp_min(1e-6)
    dom = LogisticRegression(C=1.0, max_iter=2000).fit(((xd - mu) / sd).numpy(),
                                                      np.r_[np.zeros(len(ft)), np.ones(len(fu))])
    pt = dom.predict_proba(((fv.float() - mu) / sd).numpy())[:, 1].clip(1e-4, 1 - 1e-4)
    w = torch.tensor(pt / (1 - pt) * len(ft) / len(fu), dtype=torch.float32)
    loss = torch.nn.functional.cross_entropy(lv, yv, reduction="none")
    wl = w * loss
    eta = -float(torch.cov(torch.stack([wl, w]))[0, 1] / w.var().clamp_min(1e-12))
    out["dev"] = float(wl.mean() + eta * w.mean() - eta)
    return out


_orig_train = study_mod.train_trial


def wrapped(strategy, backbone, cache, **kw):
    r = _orig_train(strategy, backbone, cache, **kw)
    _last.clear()
    try:
        _last.update(extras(r, strategy, cache))
    except Exception as e:  # noqa: BLE001
        _last["error"] = repr(e)[:200]
    return r


_orig_objective = study_mod._Objective._train


def _train(self, trial):
    _last.clear()
    v = _orig_objective(self, trial)
    for k, x in _last.items():
        trial.set_user_attr("x_" + k, x)
    return v


# +1: higher is better, -1: lower is better
CRITERIA = {"objective": 1, "val": 1, "rev": 1, "x_ent": -1, "x_im": 1, "x_snd": 1, "x_knn_agree": 1,
            "x_rev_nll": -1, "x_val_nll": -1, "x_dev": -1}


def report(dbs: list[str]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for db in dbs:
        s = optuna.load_study(study_name="data", storage=f"sqlite:///{db}")
        rows = []
        for t in s.trials:
            if t.state != optuna.trial.TrialState.COMPLETE or "x_target_acc" not in t.user_attrs:
                continue
            a = t.user_attrs
            r = {k: v for k, v in a.items() if k.startswith("x_")}
            r["objective"], r["rev"] = t.value, a.get("reverse_accuracy", 0.0)
            r["val"] = a.get("val_score", a.get("val_accuracy"))
            r["n"] = t.number
            r["ft"] = a["strategy"].get("freeze", 0) < a["strategy"].get("tap", 0)
            rows.append(r)
        tgt = [r["x_target_acc"] for r in rows]
        print(db, len(rows), "complete; target best", max(tgt), "mean", round(sum(tgt) / len(tgt), 4))
        for subset in ("all", "ft"):
            rs = rows if subset == "all" else [r for r in rows if r["ft"]]
            if len(rs) < 3:
                continue
            t_ = [r["x_target_acc"] for r in rs]
            print(f"  {subset} ({len(rs)}): best {max(t_):.4f}")
            for c, sign in CRITERIA.items():
                v = [sign * r[c] for r in rs]
                rho = spearmanr(v, t_).statistic
                order = sorted(range(len(rs)), key=lambda i: -v[i])
                top3 = sum(t_[i] for i in order[:3]) / 3
                print(f"    {c:12s} rho {rho:+.3f}  top1 {t_[order[0]]:.4f} (trial {rs[order[0]]['n']})  "
                      f"top3 mean {top3:.4f}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "report":
        report(sys.argv[2:])
        return 0
    study_mod.train_trial = wrapped
    study_mod._Objective._train = _train
    from autotransfer.cli.main import main as cli
    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
