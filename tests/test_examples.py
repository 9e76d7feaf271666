"""The example scripts and notebooks run and learn (tiny settings).

`examples/train.py` runs as a subprocess (inheriting `KERAS_BACKEND`); the
other examples are imported and their `main()` called with small settings;
every notebook in `notebooks/` is executed with nbclient on a kernel that
runs this very Python interpreter.

The two slow parts, the `train.py` run and the notebooks, start in child
processes when the module's tests start and run while the in-process
examples train; their tests then wait for the results. On 2 cores this
keeps the file well within the time of running everything in turn.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
BACKEND = keras.backend.backend()
# Keras writes a TF SavedModel from the TensorFlow and JAX backends.
EXPORTS = BACKEND in ("tensorflow", "jax")


def _load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_train(*args):
    # The child inherits os.environ, KERAS_BACKEND included.
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )


def _validation_split(labels):
    """The held-out part of the data, as the examples split it."""
    return labels[int(0.8 * len(labels)) :]


def _assert_learned(result, val_labels):
    """Loss went down, and accuracy closed at least a quarter of the gap
    between the majority-class rate and 1."""
    assert result["loss"] < result["initial_loss"], result
    chance = np.bincount(np.ravel(val_labels)).max() / np.size(val_labels)
    assert result["accuracy"] > chance + 0.25 * (1.0 - chance), (
        result,
        chance,
    )


# --------------------------------------------------------------------------
# Slow runs, started in the background
# --------------------------------------------------------------------------

TRAIN_ARGS = [
    "--samples", "320", "--epochs", "2", "--batch-size", "64",
    "--experts", "4",
]  # fmt: skip

# Executes notebooks one after the other, each on a kernel from the
# kernelspec in argv[1], and writes `<notebook>.json` results to argv[2].
NOTEBOOK_RUNNER = """
import json, sys
from pathlib import Path

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

kernel_dir, results = sys.argv[1], Path(sys.argv[2])
for path in map(Path, sys.argv[3:]):
    nb = nbformat.read(path, as_version=4)
    specs = KernelSpecManager(kernel_dirs=[kernel_dir], ensure_native_kernel=False)
    workdir = results / path.stem
    workdir.mkdir()
    result = {"ok": True, "error": ""}
    try:
        nbclient.NotebookClient(
            nb,
            km=KernelManager(kernel_name="python3", kernel_spec_manager=specs),
            kernel_name="python3",
            timeout=300,
            resources={"metadata": {"path": str(workdir)}},
        ).execute()
    except Exception as error:
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    result["stdout"] = "".join(
        output.get("text", "")
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )
    partial = results / (path.name + ".partial")
    partial.write_text(json.dumps(result))
    partial.rename(results / (path.name + ".json"))
"""


def _child_env():
    """The environment of the background runs: this one (KERAS_BACKEND
    included), with XLA's CPU code generation at a lower optimisation level.

    On the JAX backend most of a tiny run is XLA compiling each train and
    predict step, and the LLVM optimisation passes are most of that; they
    change how fast the compiled code runs, not what it computes. Only the
    child processes get this; the tests in this process run as configured.
    """
    env = dict(os.environ)
    fast_compile = (
        "--xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"
    )
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {fast_compile}".strip()
    return env


def _write_kernelspec(directory):
    """A `python3` kernelspec that runs this interpreter, `sys.executable`,
    so the notebooks never run on another Python that a user-level
    `python3` kernelspec might point to."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = directory / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [
            sys.executable, "-m", "ipykernel_launcher", "-f",
            "{connection_file}",
        ],
        "display_name": "Python 3 (moe_keras tests)",
        "language": "python",
    }  # fmt: skip
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(
        kernel_dirs=[str(directory)], ensure_native_kernel=False
    )
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return directory


class _Background:
    """Child processes started once for the module, awaited by tests."""

    def __init__(self, root):
        self.root = root
        self.train = None
        self.notebooks = None

    def _start(self, name, argv):
        # Output goes to files (a full pipe would block the child); a new
        # session lets teardown stop the child and its kernels together.
        return subprocess.Popen(
            argv,
            stdout=(self.root / f"{name}.out").open("w"),
            stderr=(self.root / f"{name}.err").open("w"),
            env=_child_env(),
            start_new_session=True,
        )

    def _read(self, name):
        return (
            (self.root / f"{name}.out").read_text(),
            (self.root / f"{name}.err").read_text(),
        )

    def start_train(self):
        self.train_out = self.root / "train_outputs"
        self.train = self._start(
            "train",
            [sys.executable, str(EXAMPLES / "train.py"), *TRAIN_ARGS,
             "--output-dir", str(self.train_out)],
        )  # fmt: skip

    def train_result(self):
        """`(output dir, exit code, stdout, stderr)` of the train.py run."""
        returncode = self.train.wait(timeout=600)
        return (self.train_out, returncode, *self._read("train"))

    def start_notebooks(self, paths):
        kernels = _write_kernelspec(self.root / "kernels")
        self.notebook_results = self.root / "notebooks"
        self.notebook_results.mkdir()
        self.notebooks = self._start(
            "notebooks",
            [sys.executable, "-c", NOTEBOOK_RUNNER, str(kernels),
             str(self.notebook_results), *map(str, paths)],
        )  # fmt: skip

    def notebook_result(self, path):
        result = self.notebook_results / (path.name + ".json")
        deadline = time.monotonic() + 900
        while not result.exists():
            if self.notebooks.poll() is not None and not result.exists():
                _, stderr = self._read("notebooks")
                pytest.fail(f"notebook runner exited early:\n{stderr[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {path.name}")
            time.sleep(0.2)
        return json.loads(result.read_text())

    def stop(self):
        for proc in (self.train, self.notebooks):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            if proc is not None:
                proc.wait()


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Starts the slow runs that the selected tests need, right away."""
    selected = [
        item
        for item in request.session.items
        if item.module.__name__ == __name__
    ]
    names = {item.originalname for item in selected}
    runs = _Background(tmp_path_factory.mktemp("background"))
    if "test_notebook_executes" in names:
        runs.start_notebooks(
            item.callspec.params["path"]
            for item in selected
            if item.originalname == "test_notebook_executes"
        )
    if "test_train_script_tiny_run" in names:
        runs.start_train()
    yield runs
    runs.stop()


# --------------------------------------------------------------------------
# The examples other than train.py, imported (these run while the
# background runs go on)
# --------------------------------------------------------------------------


def _run_example(name, samples, epochs):
    """Runs `examples/<name>.py`'s `main()` small; returns the module, its
    result and the validation labels (regenerated from its `make_data`)."""
    example = _load_example(name)
    result = example.main(
        ["--samples", str(samples), "--epochs", str(epochs), "--verbose", "0"]
    )
    labels = example.make_data(samples, seed=0)[1]
    return example, result, _validation_split(labels)


# Learning is the same on every backend; on JAX each of these costs tens
# of seconds of compiles. JAX still runs the mixed-precision example (its
# bfloat16 path differs), the example trainer's tiny run and the notebooks.
_NOT_ON_JAX = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="learning checked on TensorFlow and torch (CI time on JAX)",
)


@_NOT_ON_JAX
def test_sequential_sigmoid_learns():
    _, result, y_val = _run_example("sequential_sigmoid", 1600, epochs=10)
    _assert_learned(result, y_val)


@_NOT_ON_JAX
def test_topk_classifier_learns():
    _, results, y_val = _run_example("topk_classifier", 1600, epochs=14)
    assert set(results) == {"top1", "top2"}
    for result in results.values():
        _assert_learned(result, y_val)


@_NOT_ON_JAX
def test_text_classification_learns():
    example, result, y_val = _run_example("text_classification", 1280, epochs=3)
    tokens, _ = example.make_data(1280, seed=0)
    assert (tokens == 0).any()  # padded, so the mask is exercised
    _assert_learned(result, y_val)


@_NOT_ON_JAX
def test_binary_784_learns(capsys):
    example, result, y_val = _run_example("binary_784", 1600, epochs=3)
    assert example.make_data(4, seed=0)[0].shape == (4, 784)
    assert "Total params" in capsys.readouterr().out  # summary() printed
    _assert_learned(result, y_val)


def test_regression_mixed_precision_learns():
    _, result, y_val = _run_example(
        "regression_mixed_precision", 1600, epochs=20
    )
    # Clearly better than predicting the mean, and than the untrained model.
    assert result["loss"] < 0.6 * np.var(y_val), result
    assert result["loss"] < 0.5 * result["initial_loss"], result
    assert result["prediction_dtype"] == "float32"
    # The example set `mixed_bfloat16` and restored the policy it found.
    assert keras.config.dtype_policy().name == "float32"


LM_TINY_ARGS = [
    "--steps", "40", "--eval-every", "20", "--batch-size", "16",
    "--seq-len", "32", "--d-model", "32", "--heads", "2", "--layers", "1",
    "--experts", "4", "--top-k", "2", "--hidden", "32", "--timing-rounds", "1",
    "--verbose", "0",
]  # fmt: skip


@_NOT_ON_JAX
def test_language_model_learns(tmp_path, capsys):
    example = _load_example("language_model")
    # With spilled overflow (`--overflow`), so the flag is exercised too.
    result = example.main(
        [*LM_TINY_ARGS, "--overflow", "spill", "--output-dir", str(tmp_path)]
    )
    assert result["config"]["overflow"] == "spill"
    uniform = np.log(result["vocab_size"])
    assert 60 < result["vocab_size"] < 200  # characters of English text
    for name in ("dense", "moe"):
        curve = result[name]
        assert curve["steps"] == [0, 20, 40]
        # Untrained, the model is close to guessing uniformly; both learn
        # well past that within 40 steps.
        assert abs(curve["val_ce"][0] - uniform) < 0.5, curve
        assert curve["val_ce"][-1] < 0.8 * uniform, curve
        assert curve["val_ppl"][-1] == pytest.approx(
            np.exp(curve["val_ce"][-1])
        )
        assert curve["step_ms"] > 0 and curve["fit_step_ms"] > 0
    dense, moe = result["dense"], result["moe"]
    # Same FFN weights per token: the MoE only adds its routers (d_model x
    # experts, no bias), and holds its other experts besides.
    assert dense["router_params"] == 0
    assert moe["router_params"] == 32 * 4
    assert moe["active_params"] == dense["active_params"] + moe["router_params"]
    assert moe["params"] > moe["active_params"] == dense["params"] + 32 * 4
    # The MoE's routing statistics, on every backend.
    routing = {"moe_0_dropped_fraction", "moe_0_load_imbalance"}
    assert set(moe["routing"]) == routing
    assert moe["routing"]["moe_0_load_imbalance"] >= 1.0
    saved = json.loads((tmp_path / "lm_experiment.json").read_text())
    assert saved["moe"]["val_ce"] == moe["val_ce"]
    assert (tmp_path / "lm_experiment.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "active/tok" in printed and "step ms" in printed


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "0"],
        ["--steps", "100", "--eval-every", "30"],
        ["--top-k", "3", "--experts", "2"],
        ["--d-model", "30", "--heads", "4"],
        ["--seq-len", "1"],
        ["--seq-len", "100000"],
        ["--learning-rate", "0"],
        ["--learning-rate", "nan"],
        ["--batch-size", "many"],
        ["--capacity-factor", "0"],
        ["--overflow", "bounce"],
    ],
    ids=" ".join,
)
def test_language_model_rejects_bad_flags(args, tmp_path, capsys):
    example = _load_example("language_model")
    out = tmp_path / "outputs"
    with pytest.raises(SystemExit) as exit_info:
        example.main([*args, "--output-dir", str(out)])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], printed.err
    assert not out.exists()  # rejected before anything was written


# --------------------------------------------------------------------------
# examples/train.py
# --------------------------------------------------------------------------


def test_train_script_tiny_run(background):
    out, returncode, stdout, stderr = background.train_result()
    assert returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert f"backend={BACKEND}" in stdout
    assert (out / "expert_load.png").stat().st_size > 0
    for kind in ("sequential", "functional"):
        assert (out / f"moe_{kind}.keras").is_file()
        assert f"[moe_{kind}] saved" in stdout
        saved_model = out / f"moe_{kind}_savedmodel" / "saved_model.pb"
        assert saved_model.is_file() == EXPORTS
    assert "reloaded predictions identical: False" not in stdout
    assert "matches predict(): False" not in stdout
    if EXPORTS:
        assert stdout.count("serve() matches predict(): True") == 2
    else:
        assert "SavedModel export skipped" in stdout
    # The comparison table: one row per (architecture, variant), with
    # accuracy, loss, parameters, active parameters and step time.
    rows = {
        tuple(line.split()[:2]): line.split()[2:]
        for line in stdout.splitlines()
        if line.split()[:1] in (["sequential"], ["functional"])
    }
    assert set(rows) == {
        (kind, variant)
        for kind in ("sequential", "functional")
        for variant in ("MoE", "dense")
    }, stdout
    assert all(len(values) == 5 for values in rows.values()), stdout
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--experts", "0"],
        ["--top-k", "9", "--experts", "4"],
        ["--top-k", "-1"],
        ["--top-k", "two"],
        ["--gate", "relu"],
        ["--dispatch", "fast"],
        ["--dispatch", "sparse", "--top-k", "none"],
        ["--epochs", "0"],
        ["--batch-size", "0"],
        ["--samples", "3"],
        ["--mixed-precision", "float8"],
        ["--model", "recurrent"],
        ["--no-such-flag"],
    ],
    ids=" ".join,
)
def test_train_script_rejects_bad_flags(args, tmp_path):
    out = tmp_path / "outputs"
    proc = _run_train(*args, "--output-dir", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error:" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert not out.exists()  # rejected before anything was built


def test_train_script_accepts_top_k_none():
    train = _load_example("train")
    args = train.build_parser().parse_args(["--top-k", "none"])
    assert args.top_k is None
    assert train.build_parser().parse_args(["--top-k", "0"]).top_k is None
    assert train.build_parser().parse_args(["--top-k", "3"]).top_k == 3


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="slow on JAX's eager compiles; tests/test_keras_hub.py covers "
    "sparsify and upcycle on JAX",
)
def test_sparsify_keras_hub_example():
    pytest.importorskip("keras_hub")
    example = _load_example("sparsify_keras_hub")
    result = example.main(["--steps", "12", "--batch-size", "8"])
    # The sparsified and the upcycled models match their originals...
    assert result["sparsify_max_abs_diff"] < 1e-4
    assert result["upcycle_max_abs_diff"] < 1e-4
    # ...and both train.
    for name in ("mixtral_loss", "upcycled_loss"):
        before, after = result[name]
        assert after < before, (name, before, after)
    assert result["generated"].startswith("The ")


# --------------------------------------------------------------------------
# Notebooks
# --------------------------------------------------------------------------

# Notebooks that need keras-hub; they are committed executed, with their
# outputs (the others are committed with outputs cleared).
KERAS_HUB_NOTEBOOKS = {"keras_hub_sparsify.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda path: path.name)
def test_notebook_executes(path, background):
    nb = json.loads(path.read_text())
    if path.name in KERAS_HUB_NOTEBOOKS:
        pytest.importorskip("keras_hub")
    else:
        # Committed with outputs cleared.
        for cell in nb["cells"]:
            assert not cell.get("outputs") and not cell.get("execution_count")
    result = background.notebook_result(path)
    assert result["ok"], result["error"][-6000:]
    printed = result["stdout"]
    assert f"backend: {BACKEND}" in printed  # honours KERAS_BACKEND
    if path.name == "export_and_serve.ipynb":
        if EXPORTS:
            assert "serve() matches" in printed
        else:
            assert "Skipping SavedModel export" in printed
