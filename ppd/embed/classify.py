"""Which user wrote these pairs? A classifier on frozen user embeddings (paper Fig. 2), with top-k accuracy vs chance.

Take the users with the most groups (paper: 300 users with the most pairs), hold out some groups of every user,
train a multinomial logistic regression (scikit-learn; a linear softmax layer, L2-regularised) on the rest, and report
top-k accuracy on the held-out groups for k = 1..16 against chance k / n_users. A linear probe keeps the question
about the embedding, not about the classifier.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import top_k_accuracy_score

Pooling = Literal["flatten", "mean"]


@dataclass
class ClassifierReport:
    """Top-k accuracy of the user classifier on held-out groups, beside chance."""

    n_users: int
    train_groups: int
    test_groups: int
    pooling: str
    top_k: dict[int, float] = field(default_factory=dict)
    chance: dict[int, float] = field(default_factory=dict)
    train_accuracy: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        """One line per k in (1, 5, 16) where available."""
        ks = [k for k in (1, 5, 16) if k in self.top_k]
        return "; ".join(f"top-{k} {self.top_k[k]:.1%} (chance {self.chance[k]:.1%})" for k in ks)


def features(embedding: np.ndarray, pooling: Pooling) -> np.ndarray:
    """[L, d] -> one vector: `flatten` keeps every layer/token ([L*d]); `mean` averages exchangeable tokens ([d])."""
    if pooling == "flatten":
        return embedding.reshape(-1)
    if pooling == "mean":
        return embedding.mean(axis=0)
    raise ValueError(f"unknown pooling {pooling!r}")


def split_by_user(
    group_users: dict[int, int], max_users: int, test_per_user: int, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """(users kept, train group ids, test group ids): the `max_users` users with the most groups; per user,
    `test_per_user` groups held out at random. Users need more than `test_per_user` groups."""
    groups_of: dict[int, list[int]] = defaultdict(list)
    for group_id, user_id in sorted(group_users.items()):
        groups_of[user_id].append(group_id)
    eligible = [u for u, g in groups_of.items() if len(g) > test_per_user]
    users = sorted(eligible, key=lambda u: (-len(groups_of[u]), u))[:max_users]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for user in users:
        held_out = set(rng.choice(groups_of[user], size=test_per_user, replace=False).tolist())
        test += [g for g in groups_of[user] if g in held_out]
        train += [g for g in groups_of[user] if g not in held_out]
    return sorted(users), train, test


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Share of rows whose true label is among the k highest scores, for each k. scores [n, C], labels [n]."""
    classes = np.arange(scores.shape[1])
    binary = scores.shape[1] == 2  # scikit-learn takes the positive class's score alone then
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # k >= classes: 1.0, as it should be
        return {
            k: float(top_k_accuracy_score(labels, scores[:, 1] if binary else scores, k=k, labels=classes)) for k in ks
        }


def fit_linear_probe(
    x: np.ndarray, y: np.ndarray, weight_decay: float = 1e-3, max_iter: int = 300
) -> LogisticRegression:
    """Multinomial logistic regression (softmax), L2-regularised, on standardised features x [n, f], labels y [n].

    The objective is mean cross-entropy + weight_decay / 2 · ‖W‖² (bias not penalised): scikit-learn's C is
    1 / (weight_decay · n). L-BFGS, deterministic."""
    probe = LogisticRegression(C=1.0 / (weight_decay * len(x)), solver="lbfgs", max_iter=max_iter, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a separable toy problem never stops improving
        return probe.fit(x, y)


def evaluate_user_classifier(
    embeddings: dict[tuple[int, int], np.ndarray],
    pooling: Pooling = "flatten",
    max_users: int = 300,
    test_per_user: int = 1,
    max_k: int = 16,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> ClassifierReport:
    """Train on the kept users' training groups, report top-k accuracy (k = 1..max_k) on their held-out groups."""
    group_users = {group_id: user_id for user_id, group_id in embeddings}
    vectors = {group_id: features(e, pooling) for (_, group_id), e in embeddings.items()}
    users, train, test = split_by_user(group_users, max_users, test_per_user, seed)
    if len(users) < 2:
        raise ValueError(
            f"need at least 2 users with more than {test_per_user} groups each; found {len(users)} "
            f"among {len(set(group_users.values()))} users"
        )
    label_of = {user: index for index, user in enumerate(users)}
    x_train = np.stack([vectors[g] for g in train])  # [n_train, f]
    x_test = np.stack([vectors[g] for g in test])  # [n_test, f]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = np.array([label_of[group_users[g]] for g in train])
    y_test = np.array([label_of[group_users[g]] for g in test])
    probe = fit_linear_probe(x_train, y_train, weight_decay=weight_decay)
    test_scores = probe.predict_proba(x_test)  # [n_test, n_users]: softmax of the logits, the same order per row
    train_scores = probe.predict_proba(x_train)
    ks = list(range(1, min(max_k, len(users)) + 1))
    return ClassifierReport(
        n_users=len(users),
        train_groups=len(train),
        test_groups=len(test),
        pooling=pooling,
        top_k=top_k_accuracy(test_scores, y_test, ks),
        chance={k: k / len(users) for k in ks},
        train_accuracy=top_k_accuracy(train_scores, y_train, [1])[1],
    )


def plot_top_k(report: ClassifierReport, path: str | Path, title: str = "") -> Path:
    """The top-k curve against chance (paper Fig. 2 style), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(report.top_k)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(ks, [report.top_k[k] for k in ks], marker="o", label="classifier on user embeddings")
    axis.plot(ks, [report.chance[k] for k in ks], linestyle="--", color="grey", label="chance (k / users)")
    axis.set_xlabel("k")
    axis.set_ylabel("top-k accuracy (held-out groups)")
    axis.set_ylim(0, 1.02)
    axis.set_title(title or f"Which user? {report.n_users} users, {report.test_groups} held-out groups")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def classifier_summary(classifier: dict, embedder: str) -> dict:
    """`ppd embed classify`'s output -> the results keys (top16 / chance16 at k = 16, or the largest k computed)."""
    top_k, chance = classifier["top_k"], classifier["chance"]
    k = "16" if "16" in top_k else max(top_k, key=int)
    return {
        "top16": top_k[k],
        "chance16": chance[k],
        "k": int(k),
        "users": classifier.get("n_users"),
        "embedder": classifier.get("embedder", embedder),
        "top_k": top_k,
        "chance": chance,
    }
