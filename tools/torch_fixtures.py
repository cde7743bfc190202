"""PyTorch fixtures (called by make_fixtures.py): small MLPs trained on
scikit-learn data sets, saved as TorchScript (one traced, the others
scripted) with golden predictions made by Python torch on 1,000 rows.

Every model takes raw features as float32 [N, n_features] and standardises
them itself (the training mean and scale are buffers of the module), as a
model exported from a real training pipeline would.

Cases (tests/fixtures/<case>.pt + <case>.golden.json):
  torch_mlp_regressor   diabetes, output [N] (traced)
  torch_mlp_classifier  wine, 3 classes, logits [N, 3] (scripted)
  torch_binary_sigmoid  breast cancer, P(class 1) [N, 1] (scripted)
The shipped models/wine_mlp.pt is torch_mlp_classifier. torch_tuple_output.pt
returns a tuple (refused at load).
"""
import numpy as np
import torch
from torch import nn

ROWS = 1000


class MLP(nn.Module):
    def __init__(self, mean, scale, sizes, out_scale: float = 1.0, out_shift: float = 0.0,
                 squeeze: bool = False, sigmoid: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.out_scale = out_scale
        self.out_shift = out_shift
        self.squeeze = squeeze
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net((x - self.mean) / self.scale) * self.out_scale + self.out_shift
        if self.sigmoid:
            y = torch.sigmoid(y)
        if self.squeeze:
            y = y.squeeze(-1)
        return y


def train(model, x, y, loss_fn, epochs=400):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y)
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model, xt, yt)
        loss.backward()
        opt.step()
    return model.eval()


def rows(x_te, x_tr, rng):
    """The held-out rows, then rows drawn from training data with noise of a
    tenth of each feature's spread, up to ROWS."""
    extra = x_tr[rng.integers(0, len(x_tr), ROWS - len(x_te))]
    extra = extra + rng.normal(size=extra.shape) * x_tr.std(axis=0) * 0.1
    return np.vstack([x_te, extra])[:ROWS]


def run(module, x):
    with torch.no_grad():
        return module(torch.tensor(x, dtype=torch.float32))


def make(fix, models, write_golden, write_samples, data, seed):
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    ver = f"torch {torch.__version__}"
    (xd_tr, xd_te, yd_tr), fd = data["diabetes"]
    (xw_tr, xw_te, yw_tr), fw = data["wine"]
    (xb_tr, xb_te, yb_tr), fb = data["breast_cancer"]

    # regression, output [N], traced
    m = MLP(xd_tr.mean(0), xd_tr.std(0), [len(fd), 32, 16, 1], float(yd_tr.std()), float(yd_tr.mean()),
            squeeze=True)
    train(m, xd_tr, yd_tr.astype(np.float32),
          lambda m, x, y: nn.functional.mse_loss((m(x) - m.out_shift) / m.out_scale, (y - m.out_shift) / m.out_scale))
    x = rows(xd_te, xd_tr, rng)
    traced = torch.jit.trace(m, torch.tensor(x[:4], dtype=torch.float32))
    traced.save(str(fix / "torch_mlp_regressor.pt"))
    out = run(torch.jit.load(str(fix / "torch_mlp_regressor.pt")), x).numpy().astype(np.float64)
    write_golden("torch_mlp_regressor", "torch", ["torch_mlp_regressor.pt"], "regression", fd, x, out, None, ver)

    # 3 classes, logits, scripted
    m = MLP(xw_tr.mean(0), xw_tr.std(0), [len(fw), 32, 16, 3])
    train(m, xw_tr, yw_tr.astype(np.int64), lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    x = rows(xw_te, xw_tr, rng)
    torch.jit.script(m).save(str(fix / "torch_mlp_classifier.pt"))
    torch.jit.script(m).save(str(models / "wine_mlp.pt"))
    logits = run(torch.jit.load(str(fix / "torch_mlp_classifier.pt")), x)
    probs = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    write_golden("torch_mlp_classifier", "torch", ["torch_mlp_classifier.pt"], "classification", fw, x,
                 probs.argmax(1), probs, ver, n_classes=3, csv=True, extra={"torch_output": "logits"})
    wine = torch.softmax(run(torch.jit.load(str(models / "wine_mlp.pt")), xw_te), dim=1).numpy().astype(np.float64)
    write_samples("wine_mlp", fw, xw_te, wine.argmax(1), wine)

    # binary, P(class 1) [N, 1], scripted
    m = MLP(xb_tr.mean(0), xb_tr.std(0), [len(fb), 16, 1], sigmoid=True)
    train(m, xb_tr, yb_tr.astype(np.float32).reshape(-1, 1),
          lambda m, x, y: nn.functional.binary_cross_entropy(m(x), y))
    x = rows(xb_te, xb_tr, rng)
    torch.jit.script(m).save(str(fix / "torch_binary_sigmoid.pt"))
    p1 = run(torch.jit.load(str(fix / "torch_binary_sigmoid.pt")), x).numpy().reshape(-1).astype(np.float64)
    probs = np.column_stack([1 - p1, p1])
    write_golden("torch_binary_sigmoid", "torch", ["torch_binary_sigmoid.pt"], "classification", fb, x,
                 probs.argmax(1), probs, ver, n_classes=2, extra={"torch_output": "probabilities"})

    # hostile-shape fixture: a valid TorchScript module that returns a tuple
    torch.jit.script(Pair()).save(str(fix / "torch_tuple_output.pt"))
    return ver


class Pair(nn.Module):
    """Returns (sum, mean) per row: not one tensor, so ml-worker refuses it."""

    def forward(self, x: torch.Tensor):
        return x.sum(1), x.mean(1)
