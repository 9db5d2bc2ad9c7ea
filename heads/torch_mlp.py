"""A small MLP trained with torch (GPU when present), fitted to look like scikit-learn's.

scikit-learn's ``MLPClassifier`` is single-threaded numpy: fine for thousands of rows, slow for
100k x 4096 features. :class:`TorchMLP` trains the same network (ReLU hidden layers, Glorot
init, Adam, L2 penalty ``alpha``, early stopping on a held-out 10 %) with torch on the GPU, then
keeps only numpy arrays in scikit-learn's attribute names (``coefs_``, ``intercepts_``,
``activation``, ``out_activation_``), so predicting, saving (``heads.serialize``) and the ONNX export
(``heads.export``) need neither torch nor a GPU and treat both MLPs alike.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit, softmax

#: rows x features above which ``mlp_backend="auto"`` trains with torch when a GPU is present
LARGE_DATA = 20_000_000


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_mlp_backend(backend: str, n: int, d: int) -> str:
    """``auto``: torch when a GPU is present and the data is large, else scikit-learn."""
    if backend not in ("auto", "sklearn", "torch"):
        raise ValueError(f"mlp_backend must be 'auto', 'sklearn' or 'torch', got {backend!r}")
    if backend == "auto":
        return "torch" if n * d >= LARGE_DATA and cuda_available() else "sklearn"
    return backend


class TorchMLP:
    """Fit with torch, predict with numpy. ``task``: "classification" or "regression".

    Classification targets are integer codes 0..k-1 (the estimator encodes labels); two classes
    use one logistic output, as scikit-learn does.
    """

    activation = "relu"

    def __init__(
        self,
        task: str,
        hidden_layer_sizes: tuple[int, ...] = (256,),
        alpha: float = 1e-4,
        max_iter: int = 200,
        batch_size: int = 200,
        learning_rate_init: float = 1e-3,
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        random_state: int = 0,
        device: str | None = None,
    ):
        self.task = task
        self.hidden_layer_sizes = tuple(hidden_layer_sizes)
        self.alpha = alpha
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ fit
    def fit(self, Z: np.ndarray, y: np.ndarray) -> TorchMLP:
        import torch
        from torch import nn

        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gen = torch.Generator().manual_seed(int(self.random_state))
        rng = np.random.default_rng(self.random_state)
        Z = np.ascontiguousarray(Z, np.float32)
        n, d = Z.shape
        clf = self.task == "classification"
        if clf:
            y = np.asarray(y, np.int64)
            k = int(y.max()) + 1
            out = 1 if k == 2 else k
            self.out_activation_ = "logistic" if k == 2 else "softmax"
        else:
            y = np.asarray(y, np.float32).reshape(n, -1)
            out = y.shape[1]
            self.out_activation_ = "identity"

        val = np.zeros(n, bool)
        if self.early_stopping and n >= 20:
            val = self._validation_rows(y if clf else None, n, rng)
        sizes = [d, *self.hidden_layer_sizes, out]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            lin = nn.Linear(a, b)
            # scikit-learn's Glorot-uniform init (factor 2 for a logistic output)
            bound = math.sqrt((2.0 if (i == len(sizes) - 2 and out == 1 and clf) else 6.0) / (a + b))
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=gen)
                lin.bias.uniform_(-bound, bound, generator=gen)
            layers += [lin, nn.ReLU()]
        net = nn.Sequential(*layers[:-1]).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=self.learning_rate_init, betas=(0.9, 0.999), eps=1e-8)
        weights = [m.weight for m in net if isinstance(m, nn.Linear)]

        Xt = torch.from_numpy(Z[~val]).to(device)
        Yt = torch.from_numpy(y[~val]).to(device)
        Xv = torch.from_numpy(Z[val]).to(device) if val.any() else None
        yv = y[val]
        if clf:
            loss_fn = nn.BCEWithLogitsLoss() if out == 1 else nn.CrossEntropyLoss()
        else:
            loss_fn = nn.MSELoss()
        m = len(Xt)
        bs = int(min(self.batch_size, m))
        best_score, best_state, stall = -np.inf, None, 0
        best_loss = np.inf
        self.loss_curve_ = []
        self.validation_scores_ = []
        self.n_iter_ = 0
        for epoch in range(int(self.max_iter)):
            net.train()
            order = torch.randperm(m, generator=gen).to(device)
            total = 0.0
            for s in range(0, m, bs):
                idx = order[s : s + bs]
                logits = net(Xt[idx])
                target = Yt[idx]
                if clf and out == 1:
                    loss = loss_fn(logits[:, 0], target.float())
                elif clf:
                    loss = loss_fn(logits, target)
                else:
                    loss = 0.5 * loss_fn(logits, target) * out  # scikit-learn's squared_error / 2, summed over outputs
                # scikit-learn: + alpha / 2 * ||W||^2 / batch size
                loss = loss + 0.5 * self.alpha * sum((w * w).sum() for w in weights) / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            self.loss_curve_.append(total / m)
            self.n_iter_ = epoch + 1
            if Xv is not None:
                self._store(net)
                score = self._score(Z[val], yv)
                self.validation_scores_.append(score)
                if score > best_score + self.tol:
                    best_score, stall = score, 0
                    best_state = ([w.copy() for w in self.coefs_], [b.copy() for b in self.intercepts_])
                else:
                    stall += 1
            else:
                if self.loss_curve_[-1] > best_loss - self.tol:
                    stall += 1
                else:
                    stall = 0
                best_loss = min(best_loss, self.loss_curve_[-1])
            if stall >= self.n_iter_no_change:
                break
        self._store(net)
        if best_state is not None:  # scikit-learn keeps the best validation weights
            self.coefs_, self.intercepts_ = best_state
        return self

    def _validation_rows(self, y: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
        """A random (stratified for classes) ``validation_fraction`` of the rows."""
        val = np.zeros(n, bool)
        if y is None:
            val[rng.permutation(n)[: max(1, int(round(self.validation_fraction * n)))]] = True
            return val
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            take = int(round(self.validation_fraction * len(rows)))
            if 0 < take < len(rows):
                val[rng.permutation(rows)[:take]] = True
        return val

    def _store(self, net) -> None:
        lins = [m for m in net if hasattr(m, "weight")]
        self.coefs_ = [m.weight.detach().float().cpu().numpy().T.copy() for m in lins]
        self.intercepts_ = [m.bias.detach().float().cpu().numpy().copy() for m in lins]

    def _score(self, Z: np.ndarray, y: np.ndarray) -> float:
        if self.task == "classification":
            return float(np.mean(self.predict(Z) == y))
        p = self._forward(Z).reshape(len(y), -1)
        y = y.reshape(len(y), -1)
        ss = ((y - y.mean(axis=0)) ** 2).sum()
        return float(1.0 - ((y - p) ** 2).sum() / ss) if ss > 0 else 0.0

    # -------------------------------------------------------------- predict
    def _forward(self, Z: np.ndarray) -> np.ndarray:
        a = np.asarray(Z, np.float32)
        last = len(self.coefs_) - 1
        for i, (W, b) in enumerate(zip(self.coefs_, self.intercepts_)):
            a = a @ W + b
            if i < last:
                np.maximum(a, 0, out=a)
        return a

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        s = self._forward(Z).astype(np.float64)
        if self.out_activation_ == "logistic":
            p = expit(s[:, 0])
            return np.c_[1.0 - p, p]
        return softmax(s, axis=1)

    def predict(self, Z: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return np.argmax(self.predict_proba(Z), axis=1)
        s = self._forward(Z).astype(np.float64)
        return s[:, 0] if s.shape[1] == 1 else s
